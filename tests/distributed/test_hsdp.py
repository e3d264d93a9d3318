"""HSDP (fully_shard on a (replicate, shard) mesh): four gloo processes, 2 replicas x 2 shards, against a
float64 run of every rank's micro-batches. The three ways a loop accumulates under HSDP: sync on every
micro-step, sync off (set_requires_gradient_sync(False)), and set_requires_all_reduce(False)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.sharded import assert_grads_and_norm, weighted_mean
from helpers.spawn import spawn

K, WORLD = 3, 4
MODES = ("sync", "no_sync", "no_all_reduce")


def net():
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 5))


def data(rank, mode, k):
    g = torch.Generator().manual_seed(1000 * MODES.index(mode) + 100 * rank + k)
    return torch.randn(4, 24, generator=g), torch.randn(4, 5, generator=g)


def weight_of(mode, rank, k):
    """Per-rank weights where gacc sees each rank's grads before the sum; the same on every rank under
    sync, where FSDP sums them first."""
    return 1.0 + 0.5 * k + (0.0 if mode == "sync" else rank)


def _train(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replicas = dist.get_process_group_ranks(mesh.get_group(0))
    all_reduces = []  # the ranks of each all-reduce's group, for the replicas' one per window
    original = dist.all_reduce

    def counting(tensor, *args, group=None, **kwargs):
        all_reduces.append(dist.get_process_group_ranks(group) if group is not None else "world")
        return original(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counting
    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = net()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=K, reduction="mean")
        all_reduces.clear()
        for k in range(K):
            last = k == K - 1
            if mode == "no_sync":
                model.set_requires_gradient_sync(last)
            elif mode == "no_all_reduce":
                model.set_requires_all_reduce(last)
            acc.set_weight(weight_of(mode, rank, k))
            x, y = data(rank, mode, k)
            F.mse_loss(model(x), y).backward()
        out[mode] = {"grads": [p.grad.full_tensor().clone() for p in model.parameters()],
                     "replica_all_reduces": sum(r == replicas for r in all_reduces),
                     "norm": acc.total_norm()}
        opt.step()
        opt.zero_grad()
        acc.remove()
    dist.all_reduce = original
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


def reference(mode):
    torch.manual_seed(0)
    return weighted_mean(net(), [(*data(r, mode, k), weight_of(mode, r, k)) for r in range(WORLD)
                                 for k in range(K)])


def test_hsdp_against_float64(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    results = str(tmp_path / "out")
    spawn(_train, WORLD, results)
    for mode in MODES:
        expected = reference(mode)
        for rank in range(WORLD):
            got = torch.load(f"{results}.{rank}")[mode]
            assert_grads_and_norm(got, expected, f"{mode}, rank {rank}")
            if mode != "sync":  # gacc's one all-reduce of the window's fp32 shards over the replicas
                assert got["replica_all_reduces"] == 1, f"{mode}: {got['replica_all_reduces']} all-reduces"
