"""FSDP2 with gradient sync off (set_requires_gradient_sync(False), the no-sync mode of Accelerate, the HF
Trainer and Fabric): two gloo processes on the CPU against float64 sums of the same micro-grads."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.spawn import spawn

K, WORLD = 4, 2
CLIP = 0.05


class Net(torch.nn.Module):
    """5 output rows: shards of 3 and 2 rows. `late` gets its first grad in micro-step 2 (pytorch#196996),
    `rare` on rank 1 only."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(24, 48), torch.nn.Linear(48, 5)
        self.late, self.rare = torch.nn.Linear(48, 5), torch.nn.Linear(48, 5)

    def forward(self, x, late: bool, rare: bool):
        h = F.gelu(self.fc1(x))
        y = self.fc2(h)
        if late:
            y = y + self.late(h)
        if rare:
            y = y + self.rare(h)
        return y


def data(rank, window, k):
    g = torch.Generator().manual_seed(10_000 * window + 100 * rank + k)
    return torch.randn(4, 24, generator=g), torch.randn(4, 5, generator=g)


def sparse_use(rank, k):
    return k >= 2, rank == 1


def full_use(rank, k):
    return True, True


def weight_of(rank, k):
    return 1.0 + rank + 0.5 * k  # token counts that differ by rank and micro-step


def sharded(policy=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = Net()
    kwargs = {} if policy is None else {"mp_policy": policy}
    fully_shard(model.fc1, mesh=mesh, **kwargs)
    fully_shard(model.fc2, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def loss_of(model, rank, window, k, use):
    x, y = data(rank, window, k)
    return F.mse_loss(model(x, *use(rank, k)).float(), y)


def full_grads(model):
    return [None if p.grad is None else p.grad.full_tensor().clone() for p in model.parameters()]


def _train(rank, results):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    bf16 = torch.bfloat16
    out = {}

    # gacc under both bf16 policies, per-rank weights, parameters used late or on one rank only
    for name, reduce_dtype in (("bf16", bf16), ("fp32", torch.float32)):
        model = sharded(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=reduce_dtype))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=K, reduction="mean")
        for k in range(K):
            model.set_requires_gradient_sync(k == K - 1)
            acc.set_weight(weight_of(rank, k))
            loss_of(model, rank, 0, k, sparse_use).backward()
        out[f"gacc_{name}"] = full_grads(model)
        acc.remove()

    # stock FSDP2 against gacc, bf16/bf16, every parameter used everywhere (stock cannot do otherwise)
    for name in ("stock", "gacc_sum"):
        model = sharded(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=K) if name == "gacc_sum" else None
        for k in range(K):
            model.set_requires_gradient_sync(k == K - 1)
            loss_of(model, rank, 0, k, full_use).backward()
        out[name] = full_grads(model)
        if acc is not None:
            acc.remove()

    # fp32: a clipped window, an early end (sync back on at micro-step 2), an inf on rank 1, a resume
    model = sharded()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    acc = gacc_kernels.attach(model, opt, steps=K, scaler=scaler, reduction="mean")

    def micro(window, k, last, inf=False):
        model.set_requires_gradient_sync(last)
        acc.set_weight(weight_of(rank, k))
        loss = loss_of(model, rank, window, k, sparse_use)
        scaler.scale(loss * float("inf") if inf else loss).backward()

    def step(window):
        scaler.step(opt)
        scaler.update()
        out[f"window{window}"] = full_grads(model)
        opt.zero_grad()

    for k in range(K):
        micro(0, k, k == K - 1)
    out["norm"] = acc.clip_grad_norm_(CLIP)
    step(0)
    for k in range(2):
        micro(1, k, k == 1)
    step(1)
    before = [p.detach().full_tensor() for p in model.parameters()]
    for k in range(K):
        micro(2, k, k == K - 1, inf=(rank, k) == (1, 2))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    out["skipped"] = all(torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, model.parameters()))
    for k in range(2):
        micro(3, k, False)
    saved = acc.state_dict()
    opt.zero_grad()  # the window is dropped ...
    acc.load_state_dict(saved)  # ... and resumed from the checkpoint
    for k in range(2, K):
        micro(3, k, k == K - 1)
    step(3)
    out["params"] = [p.detach().full_tensor() for p in model.parameters()]
    out["freed"] = not acc._parts.events.reducer.unsharded  # private: the unsharded sums
    acc.remove()

    # a grad that reaches FSDP past gacc's hooks in a no-sync window (here: the hooks taken away) is refused
    model = sharded()
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=K)
    model.set_requires_gradient_sync(False)
    loss_of(model, rank, 4, 0, full_use).backward()
    for hook in acc._parts.events.capture._unsharded_hooks:  # private: gacc's hooks on FSDP's parameters
        hook.remove()
    model.set_requires_gradient_sync(True)
    try:
        loss_of(model, rank, 4, 1, full_use).backward()
    except RuntimeError as e:
        out["past_the_hooks"] = str(e)
    torch.save(out, f"{results}.{rank}")
    dist.destroy_process_group()


def micro_grads(model, window, use, dtype):
    """Each rank's and micro-step's grads of `model` (None where unused), as the ranks compute them."""
    params = list(model.parameters())
    grads = {}
    for rank in range(WORLD):
        for k in range(K):
            x, y = data(rank, window, k)
            loss = F.mse_loss(model(x.to(dtype), *use(rank, k)).float(), y)
            grads[rank, k] = torch.autograd.grad(loss, params, allow_unused=True)
    return grads


def weighted_mean(grads, model, weight, steps=K):
    total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    wsum = 0.0
    for (rank, k), gs in grads.items():
        if k >= steps:
            continue
        for t, g in zip(total, gs):
            if g is not None:
                t += weight(rank, k) * g.double()
        wsum += weight(rank, k)
    return [t / wsum for t in total]


def close(got, expected, rtol, atol, what):
    for j, (g, e) in enumerate(zip(got, expected)):
        if g is None:  # no rank used the parameter in this window: no grad, as in stock PyTorch
            assert not e.any(), f"{what}, parameter {j}: no grad"
            continue
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol,
                                   msg=lambda m, j=j: f"{what}, parameter {j}: {m}")


def max_error(got, expected):
    return max(float((g.double() - e).abs().max()) for g, e in zip(got, expected))


def test_fsdp2_no_sync_against_float64(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    results = str(tmp_path / "out")
    spawn(_train, WORLD, results)
    torch.manual_seed(0)
    bf16_model = Net().to(torch.bfloat16)  # what FSDP's bf16 all-gather gives every rank
    sparse = weighted_mean(micro_grads(bf16_model, 0, sparse_use, torch.bfloat16), bf16_model, weight_of)
    full = weighted_mean(micro_grads(bf16_model, 0, full_use, torch.bfloat16), bf16_model, lambda r, k: 1.0)
    full = [g * K for g in full]  # reduction="sum": the micro-steps summed, the ranks averaged

    torch.manual_seed(0)
    model = Net().double()
    params = list(model.parameters())
    expected = {}
    for window, steps in ((0, K), (1, 2), (3, K)):
        grads = weighted_mean(micro_grads(model, window, sparse_use, torch.float64), model, weight_of, steps)
        if window == 0:
            norm = torch.stack([g.norm() for g in grads]).norm()
            grads = [g * min(1.0, CLIP / (float(norm) + 1e-6)) for g in grads]
        expected[window] = grads
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.1 * g

    for rank in range(WORLD):
        got = torch.load(f"{results}.{rank}")
        # exact to fp32 rounding of the bf16 micro-grads' weighted sum, whatever the reduce dtype
        close(got["gacc_bf16"], sparse, 1e-5, 1e-7, f"rank {rank}, bf16/bf16")
        close(got["gacc_fp32"], sparse, 1e-5, 1e-7, f"rank {rank}, bf16/fp32")
        close(got["gacc_sum"], full, 1e-5, 1e-7, f"rank {rank}, reduction='sum'")
        stock, gacc = max_error(got["stock"], full), max_error(got["gacc_sum"], full)
        assert stock > 1e-4 and stock > 100 * gacc, f"stock bf16/bf16 no-sync error {stock:.2e}, gacc {gacc:.2e}"
        for window in (0, 1, 3):
            close(got[f"window{window}"], expected[window], 1e-5, 1e-7, f"rank {rank}, window {window}")
        torch.testing.assert_close(got["norm"].double(), norm, rtol=1e-5, atol=0)
        assert got["skipped"], "an inf on one rank skips the step on every rank"
        close(got["params"], [p.detach() for p in params], 1e-5, 1e-6, f"rank {rank}, parameters")
        assert got["freed"], "the unsharded sums are freed at the window's end"
        assert "reduced a grad of" in got.get("past_the_hooks", ""), "a grad FSDP reduced behind gacc"
