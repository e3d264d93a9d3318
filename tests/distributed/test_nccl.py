"""The distributed paths over NCCL on one GPU (world size 1): the same bits as the one-process path.

The multi-GPU runs are in bench/bench_dist.py; this checks the CUDA side of the reducers (async
collectives, streams, FSDP2's reduce-scatter stream) on the GPU that CI's GPU runs have.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.models import MLP, batches
from helpers.spawn import spawn

K = 3


class Net(torch.nn.Module):
    """bf16 Linears and an fp32 gain: two segments of the buffer."""

    def __init__(self, device):
        super().__init__()
        self.mlp = MLP().to(device, torch.bfloat16)
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 5, device=device))

    def forward(self, x):
        return self.mlp(x.bfloat16()).float() * self.gain


def run(setup, device):
    torch.manual_seed(0)
    model, kw = setup(Net(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=K, bucket_bytes=4096, **kw)
    out = []
    for window in range(2):
        for i, (x, y) in enumerate(batches("mlp", K, device, seed=window)):
            acc.set_weight(1.0 + i)
            F.mse_loss(model(x), y).backward()
        out.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                    for p in model.parameters()] + [acc.total_norm()])
        opt.step()
        opt.zero_grad()
    acc.remove()
    return out


def local(model):
    return model, {}


def group(model):
    return model, {"process_group": dist.group.WORLD}


def group_bf16(model):
    return model, {"process_group": dist.group.WORLD, "comm_dtype": torch.bfloat16}


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model), {}


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model, {}


def _worker(rank, results, device, backend):
    dist.init_process_group(backend, rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    runs = {s.__name__: run(s, device) for s in (local, group, group_bf16, ddp, fsdp2)}
    torch.save(runs, results)
    dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_world_size_one_matches_one_process(tmp_path):
    check(tmp_path, "cuda", "nccl")


def check(tmp_path, device, backend):
    results = str(tmp_path / "runs")
    spawn(_worker, 1, results, device, backend)
    runs = torch.load(results)
    base = runs.pop("local")
    for name, got in runs.items():
        for window, (g_run, b_run) in enumerate(zip(got, base)):
            for j, (g, b) in enumerate(zip(g_run, b_run)):
                where = f"{name}, window {window}, tensor {j}"
                # one rank: the sums are the same numbers; bf16 on the wire rounds each fp32 sum once
                # more, before the scale and the cast (window 1 then starts from other parameters)
                if name == "group_bf16" and window == 1:
                    continue
                if name == "group_bf16":
                    torch.testing.assert_close(g.float(), b.float(), rtol=2 ** -7, atol=1e-6,
                                               msg=lambda m, where=where: f"{where}: {m}")
                else:
                    assert torch.equal(g.cpu(), b.cpu()), f"{where}: {float((g.float() - b.float()).abs().max())}"
