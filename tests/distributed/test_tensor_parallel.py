"""Tensor parallelism (parallelize_module on a 1-D mesh of two gloo processes): colwise and rowwise Linears,
a SequenceParallel LayerNorm (its grads come Partial) and a plain replicated parameter, against a float64
run of the whole model. Both ranks see the same micro-batches, as tensor-parallel ranks do."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.spawn import spawn

K, WORLD, CLIP = 3, 2, 0.05


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 6)  # 16 rows: 8 per rank
        self.norm = torch.nn.LayerNorm(6)
        self.scale = torch.nn.Parameter(torch.randn(6))  # a plain parameter, replicated

    def forward(self, x):  # x: (batch, sequence, 8)
        y = self.norm(self.down(F.gelu(self.up(x))))
        return (y.full_tensor() if hasattr(y, "full_tensor") else y) * self.scale


def data(window, k):
    g = torch.Generator().manual_seed(100 * window + k)
    return torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 6, generator=g)


def _train(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = Net()
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel(output_layouts=Shard(1)),
                                     "norm": SequenceParallel(use_local_output=False)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    acc = gacc_kernels.attach(model, opt, steps=K, scaler=scaler, reduction="mean")
    out = {"grads": []}
    for window in range(3):
        for k in range(K):
            x, y = data(window, k)
            loss = F.mse_loss(model(x), y)
            if window == 2 and k == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        if window == 0:
            out["norm"] = acc.clip_grad_norm_(CLIP)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if window == 2:
            out["skipped"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        else:
            out["grads"].append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                                 for p in model.parameters()])
        opt.zero_grad()
    out["params"] = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                     for p in model.parameters()]
    acc.remove()
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


def test_tensor_parallel_against_float64(tmp_path):
    pytest.importorskip("torch.distributed.tensor.parallel", reason="needs DTensor")
    results = str(tmp_path / "out")
    spawn(_train, WORLD, results)
    torch.manual_seed(0)
    model = Net().double()
    params = list(model.parameters())
    expected = []
    for window in range(2):
        total = [torch.zeros_like(p) for p in params]
        for k in range(K):
            x, y = data(window, k)
            for t, g in zip(total, torch.autograd.grad(F.mse_loss(model(x.double()), y.double()), params)):
                t += g / K
        if window == 0:
            norm = torch.stack([g.norm() for g in total]).norm()
            total = [g * min(1.0, CLIP / (float(norm) + 1e-6)) for g in total]
        expected.append(total)
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= 0.1 * g
    for rank in range(WORLD):
        got = torch.load(f"{results}.{rank}")
        for window, (grads, exp) in enumerate(zip(got["grads"], expected)):
            for j, (g, e) in enumerate(zip(grads, exp)):
                torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, w=f"rank {rank}, window {window}, parameter {j}": f"{w}: {m}")
        torch.testing.assert_close(got["norm"].double(), norm, rtol=1e-5, atol=0)
        assert got["skipped"], "an inf on the ranks skips the step everywhere"
        for p, e in zip(got["params"], params):
            torch.testing.assert_close(p.double(), e.detach(), rtol=1e-5, atol=1e-6)
