"""Data parallel with the overlapped reducer: gloo processes on the CPU against a float64 large batch.

Each rank runs its own micro-batches with its own weights; the optimizer must see, on every rank, the
weighted mean over all ranks and micro-steps, as one large batch would give. Both a DDP wrapper and a
plain model with attach(process_group=, reduction="mean") are covered.
"""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.models import batches
from helpers.spawn import spawn

K = 3
# per window: (micro-steps run, weights of rank 0, weights of rank r > 0 (scaled by r)); a window of
# fewer than K micro-steps ends at an early optimizer.step()
PLAN = [(K, [1.0, 2.0, 0.5], [0.0, 0.0, 0.0]),   # rank 1's micro-steps all weigh 0
        (K, [1.0, 1.0, 3.0], [2.0, 0.5, 1.0]),
        (2, [0.5, 1.0], [1.0, 4.0])]
SPLIT = K - 1  # this micro-step runs two backward calls (micro_step()): late grads, then repeats
RESUME = (2, 1)  # after this (window, micro-step), state_dict, a new model and optimizer, load_state_dict
CLIP = (1, 0.05)  # window 1 is clipped to this global norm


class Net(torch.nn.Module):
    """head_b is used on ranks > 0 only; `unused` on none."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 48),
                                        torch.nn.GELU(), torch.nn.Linear(48, 5))
        self.head_b = torch.nn.Linear(5, 5)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x, use_b):
        out = self.body(x)
        return self.head_b(out) if use_b else out


def weights_of(rank, window):
    _, w0, w1 = PLAN[window]
    return w0 if rank == 0 else [rank * w for w in w1]


def data_of(rank, window):
    return batches("mlp", PLAN[window][0], "cpu", seed=100 * window + rank)


def loss_of(model, x, y, rank):
    return F.mse_loss(model(x, use_b=rank > 0), y)


def _attach(rank, mode, comm, params=None):
    torch.manual_seed(rank)  # every rank starts elsewhere: the wrapper or attach() broadcasts rank 0's
    net = Net()
    if params is not None:
        net.load_state_dict(params)
    model = torch.nn.parallel.DistributedDataParallel(net) if mode == "ddp" else net
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=K, bucket_bytes=600, comm_dtype=comm,
                              process_group=None if mode == "ddp" else dist.group.WORLD, reduction="mean")
    return net, model, opt, acc


def _train(rank, world, mode, comm, results):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net, model, opt, acc = _attach(rank, mode, comm)
    out = {"grads": [], "norms": []}
    for window in range(len(PLAN)):
        for i, ((x, y), w) in enumerate(zip(data_of(rank, window), weights_of(rank, window))):
            if i == SPLIT:
                with acc.micro_step(weight=w):
                    loss_of(model, x[:2], y[:2], rank).backward()
                    loss_of(model, x[2:], y[2:], rank).backward()
            else:
                acc.set_weight(w)
                loss_of(model, x, y, rank).backward()
            if (window, i) == RESUME:
                state, params = acc.state_dict(), copy.deepcopy(net.state_dict())
                acc.remove()
                net, model, opt, acc = _attach(rank, mode, comm, params)
                acc.load_state_dict(state)
        if window == CLIP[0]:
            out["norms"].append(acc.clip_grad_norm_(CLIP[1]))
        opt.step()  # ends window 2 early
        out["grads"].append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
        opt.zero_grad()
    out["params"] = [p.detach().clone() for p in net.parameters()]
    torch.save(out, f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def reference(world):
    """float64: each window's weighted mean over ranks and micro-steps, then the same SGD step."""
    torch.manual_seed(0)
    model = Net().double()
    params = list(model.parameters())
    out = {"grads": [], "norms": [], "parts": []}
    for window in range(len(PLAN)):
        total = [torch.zeros_like(p) for p in params]
        parts, wsum = [], 0.0
        used = [False] * len(params)
        for rank in range(world):
            part = [torch.zeros_like(p) for p in params]
            for i, ((x, y), w) in enumerate(zip(data_of(rank, window), weights_of(rank, window))):
                x, y = x.double(), y.double()
                loss = loss_of(model, x[:2], y[:2], rank) + loss_of(model, x[2:], y[2:], rank) if i == SPLIT \
                    else loss_of(model, x, y, rank)
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                for j, g in enumerate(gs):
                    if g is not None:
                        part[j] += w * g
                        used[j] = True
                wsum += w
            parts.append(part)
        for part in parts:
            for t, g in zip(total, part):
                t += g
        grads = [t / wsum if u else None for t, u in zip(total, used)]
        out["parts"].append([[g / wsum for g in part] for part in parts])
        if window == CLIP[0]:
            norm = torch.stack([g.norm() for g in grads if g is not None]).norm()
            out["norms"].append(norm)
            grads = [None if g is None else g * min(1.0, CLIP[1] / (float(norm) + 1e-6)) for g in grads]
        out["grads"].append(grads)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= 0.1 * g
    out["params"] = [p.detach() for p in params]
    return out


def run(tmp_path, world, mode, comm=torch.float32):
    results = str(tmp_path / "out")
    spawn(_train, world, world, mode, comm, results)
    return [torch.load(f"{results}.{r}") for r in range(world)]


@pytest.mark.parametrize("mode, world", [("ddp", 2), ("group", 2), ("group", 4)])
def test_exact_against_one_large_batch(tmp_path, mode, world):
    ranks, ref = run(tmp_path, world, mode), reference(world)
    for got in ranks:
        for window, (grads, expected) in enumerate(zip(got["grads"], ref["grads"])):
            for j, (g, e) in enumerate(zip(grads, expected)):
                if e is None:
                    assert g is None, f"window {window}, parameter {j}: no rank used it, so p.grad stays None"
                    continue
                torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, w=window, j=j: f"window {w}, parameter {j}: {m}")
        torch.testing.assert_close(got["norms"][0].double(), ref["norms"][0], rtol=1e-5, atol=0)
        for p, e in zip(got["params"], ref["params"]):
            torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)
    for other in ranks[1:]:
        for a, b in zip(ranks[0]["params"], other["params"]):
            assert torch.equal(a, b), "every rank must hold the same parameters"


def test_bf16_on_the_wire_within_its_bound(tmp_path):
    """Each rank's bucket is rounded to bf16 (2^-9 relative) and summed in bf16 (2^-9 per addition):
    window 0 is within 2^-7 of the sum of the magnitudes of the ranks' parts, and not fp32-exact."""
    world = 2
    got, ref = run(tmp_path, world, "group", torch.bfloat16)[0], reference(world)
    exact = True
    for j, g in enumerate(got["grads"][0]):
        parts = [part[j] for part in ref["parts"][0]]
        if ref["grads"][0][j] is None:
            assert g is None
            continue
        bound = 2.0 ** -7 * sum(p.abs() for p in parts) + 1e-7
        err = (g.double() - ref["grads"][0][j]).abs()
        assert (err <= bound).all(), f"parameter {j}: error {float((err - bound).max())} over the bound"
        exact &= bool((err <= 1e-5 * ref["grads"][0][j].abs() + 1e-7).all())
    assert not exact, "bf16 on the wire should round somewhere"


def _amp(rank, world, results):
    """Window 0: rank 1 alone gets an inf; every rank must skip the step and lower the scale."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net, model, opt, _ = None, None, None, None
    torch.manual_seed(0)
    net = Net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = gacc_kernels.attach(model, opt, steps=K, scaler=scaler, bucket_bytes=600, reduction="mean")
    before = [p.detach().clone() for p in net.parameters()]
    out = []
    for window in range(2):
        for i, (x, y) in enumerate(data_of(rank, window)):
            loss = loss_of(model, x, y, rank)
            if window == 0 and rank == 1 and i == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        out.append(([p.detach().clone() for p in net.parameters()], scaler.get_scale()))
    torch.save({"before": before, "windows": out}, f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def test_an_inf_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    world, results = 2, str(tmp_path / "out")
    spawn(_amp, world, world, results)
    ranks = [torch.load(f"{results}.{r}") for r in range(world)]
    for got in ranks:
        (skipped, scale0), (stepped, scale1) = got["windows"]
        assert all(torch.equal(a, b) for a, b in zip(skipped, got["before"])), "window 0 must be skipped"
        assert scale0 == 512.0 and scale1 == 512.0
        assert not all(torch.equal(a, b) for a, b in zip(stepped, skipped)), "window 1 must step"
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["windows"][1][0], ranks[1]["windows"][1][0]))


def _overlap(rank, world, results):
    """Records each all_reduce gacc issues, and when backward reaches the input (its last step)."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import gacc_kernels.distributed.allreduce as reduce
    events, real = [], reduce.dist.all_reduce

    def spy(tensor, *args, **kwargs):
        events.append(tensor.numel())
        return real(tensor, *args, **kwargs)
    reduce.dist.all_reduce = spy
    torch.manual_seed(0)
    net = Net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2, bucket_bytes=1, reduction="mean")  # one bucket per parameter
    for window in range(2):
        for x, y in data_of(rank, window)[:2]:
            x.requires_grad_(True).register_hook(lambda g: events.append("input"))
            loss_of(model, x, y, rank).backward()
        opt.step()
        opt.zero_grad()
    buckets = len(acc._parts.events.buffers[0].buckets)
    acc.remove()
    torch.save({"events": events, "buckets": buckets}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_buckets_are_reduced_while_backward_runs(tmp_path):
    world, results = 2, str(tmp_path / "out")
    spawn(_overlap, world, world, results)
    for rank in range(world):
        got = torch.load(f"{results}.{rank}")
        events, buckets = got["events"], got["buckets"]
        # per window: 2 backwards reaching the input; the weight, one per bucket, the flags
        assert len(events) == 2 * (2 + buckets + 2), events
        first, second = events[:len(events) // 2], events[len(events) // 2:]
        # window 0 learns the order: `unused` and head_b (unused on rank 0) come first in backward order
        # and never complete a bucket, so window 0 sends every bucket after backward
        assert first[:3] == ["input", 1, "input"], first
        # window 1: the weight, and all buckets but those 4 and the input layer's 2, go before the
        # backward reaches the input
        before = second[second.index("input") + 1: second.index("input", second.index("input") + 1)]
        assert before[0] == 1 and len(before) >= 1 + buckets - 6, f"only {len(before) - 1} buckets overlapped"


class WithBuffers(torch.nn.Module):
    """BatchNorm's running statistics and batch count, and a buffer of the model's own."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.register_buffer("table", torch.zeros(3, 4))

    def forward(self, x):
        return self.norm(self.fc(x)) + self.table.sum()


def _buffers(rank, world, results):
    """Each rank's buffers differ before attach(process_group=)."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = WithBuffers()
    with torch.no_grad():
        for b in model.buffers():
            b.copy_(torch.randn(b.shape) if b.is_floating_point() else torch.full_like(b, 10 + rank))
    before = {n: b.clone() for n, b in model.named_buffers()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the model has BatchNorm layers")
        acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2,
                                  process_group=dist.group.WORLD)
    torch.save({"before": before, "after": {n: b.clone() for n, b in model.named_buffers()}},
               f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def test_attach_with_a_process_group_broadcasts_the_buffers_from_the_first_rank(tmp_path):
    world, results = 2, str(tmp_path / "out")
    spawn(_buffers, world, world, results)
    ranks = [torch.load(f"{results}.{r}") for r in range(world)]
    names = ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked", "table"]
    assert sorted(ranks[0]["after"]) == sorted(names)
    for name in names:
        assert not torch.equal(ranks[0]["before"][name], ranks[1]["before"][name]), name
        for r, got in enumerate(ranks):
            assert torch.equal(got["after"][name], ranks[0]["before"][name]), f"rank {r}: {name} is not rank 0's"
