"""FSDP2 over a tensor-parallel model (torchtitan's 2-D layout: parallelize_module on the tp dimension, then
fully_shard on the dp dimension of a (dp, tp) mesh): four gloo processes, 2 x 2, against a float64 run of
every data-parallel rank's micro-batches (the tp ranks of one dp rank see the same data), with gradient
sync on and off."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.sharded import assert_grads_and_norm, weighted_mean
from helpers.spawn import spawn

K, WORLD, DP = 3, 4, 2
MODES = ("sync", "no_sync")


def net():
    # 10 rows: tp shards of 5, then dp shards of 3 and 2 (uneven); the rowwise bias is tp-replicated
    return torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.GELU(), torch.nn.Linear(10, 6))


def data(mode, dp_rank, k):
    g = torch.Generator().manual_seed(1000 * MODES.index(mode) + 100 * dp_rank + k)
    return torch.randn(4, 8, generator=g), torch.randn(4, 6, generator=g)


def weight_of(mode, dp_rank, k):
    return 1.0 + 0.5 * k + (dp_rank if mode == "no_sync" else 0.0)  # per-rank weights where sync is off


def _train(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (DP, WORLD // DP), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = net()
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=K, reduction="mean")
        for k in range(K):
            if mode == "no_sync":
                model.set_requires_gradient_sync(k == K - 1)
            acc.set_weight(weight_of(mode, dp_rank, k))
            x, y = data(mode, dp_rank, k)
            F.mse_loss(model(x), y).backward()
        out[mode] = {"grads": [p.grad.full_tensor().clone() for p in model.parameters()],
                     "norm": acc.total_norm()}
        opt.zero_grad()
        acc.remove()
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


def reference(mode):
    torch.manual_seed(0)
    return weighted_mean(net(), [(*data(mode, r, k), weight_of(mode, r, k)) for r in range(DP)
                                 for k in range(K)])


def test_fsdp2_over_tensor_parallel_against_float64(tmp_path):
    pytest.importorskip("torch.distributed.tensor.parallel", reason="needs DTensor")
    results = str(tmp_path / "out")
    spawn(_train, WORLD, results)
    for mode in MODES:
        expected = reference(mode)
        for rank in range(WORLD):
            got = torch.load(f"{results}.{rank}")[mode]
            assert_grads_and_norm(got, expected, f"{mode}, rank {rank}")
