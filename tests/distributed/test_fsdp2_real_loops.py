"""A loop written the way others write FSDP2 accumulation, with gacc attached by one line: the loss divided by
K, the loop's own set_requires_gradient_sync toggle (sync back on at the last micro-step, and at the
epoch's short last window), torch's clip_grad_norm_ right before each step, two optimizers, a frozen
layer. Two gloo processes; the stock loop and the attached one against float64."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.spawn import spawn

K, WORLD, CLIP, LR = 3, 2, 0.05, 0.1
WINDOWS = (K, 2, K)  # the second ends early: the epoch's short last window


def net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Linear(24, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 5))
    model[0].requires_grad_(False)  # a frozen embedding-like layer
    return model


def data(window, rank, k):
    g = torch.Generator().manual_seed(1000 * window + 100 * rank + k)
    return torch.randn(4, 24, generator=g), torch.randn(4, 5, generator=g)


def _train(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for use_gacc in (False, True):
        model = net()
        for layer in (model[0], model[1], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        body = torch.optim.SGD(model[1].parameters(), lr=LR)
        head = torch.optim.SGD(model[3].parameters(), lr=LR)
        acc = gacc_kernels.attach(model, [body, head], steps=K) if use_gacc else None
        seen = []
        for window, micro_steps in enumerate(WINDOWS):
            for k in range(micro_steps):
                model.set_requires_gradient_sync(k == micro_steps - 1)
                x, y = data(window, rank, k)
                (F.mse_loss(model(x), y) / K).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            seen.append([p.grad.full_tensor().clone() for p in model.parameters() if p.requires_grad])
            body.step()
            head.step()
            body.zero_grad()
            head.zero_grad()
        out[use_gacc] = {"seen": seen, "params": [p.detach().full_tensor() for p in model.parameters()]}
        if acc is not None:
            acc.remove()
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


def reference():
    """float64: the loop's sum of loss / K grads over the window, averaged over the ranks (as FSDP does),
    clipped by the global norm, one SGD step."""
    model = net().double()
    params = [p for p in model.parameters() if p.requires_grad]
    seen = []
    for window, micro_steps in enumerate(WINDOWS):
        total = [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            for k in range(micro_steps):
                x, y = data(window, rank, k)
                loss = F.mse_loss(model(x.double()), y.double()) / K
                for t, g in zip(total, torch.autograd.grad(loss, params)):
                    t += g / WORLD
        norm = torch.stack([g.norm() for g in total]).norm()
        total = [g * min(1.0, CLIP / (float(norm) + 1e-6)) for g in total]
        seen.append(total)
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= LR * g
    return seen, [p.detach() for p in model.parameters()]


def test_a_real_fsdp2_loop_with_gacc_is_stock_and_float64(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    results = str(tmp_path / "out")
    spawn(_train, WORLD, results)
    seen_ref, params_ref = reference()
    for rank in range(WORLD):
        got = torch.load(f"{results}.{rank}")
        for use_gacc in (False, True):
            who = f"rank {rank}, " + ("gacc" if use_gacc else "stock FSDP2")
            for window, (grads, expected) in enumerate(zip(got[use_gacc]["seen"], seen_ref)):
                for j, (g, e) in enumerate(zip(grads, expected)):
                    torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7,
                                               msg=lambda m, w=f"{who}, window {window}, grad {j}": f"{w}: {m}")
            for p, e in zip(got[use_gacc]["params"], params_ref):
                torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6, msg=f"{who}: parameters")
