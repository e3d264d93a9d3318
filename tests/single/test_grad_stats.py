"""attach(grad_stats=True): the gradient noise scale against a float64 reference that keeps every
micro-grad (token weights, loss_scale, a GradScaler, an early step, a checkpointed parameter), against the analytic
answer of a linear regression, and no result bit changed by it."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gacc_kernels
from helpers.models import Checkpointed, batches, make
from helpers.noise import assert_stats, ema, flat, reference

VOCAB = 61


def lm_batches(k, seed):
    """k micro-batches of token sequences with a varying number of labelled tokens (the rest -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        tok = torch.randint(0, VOCAB, (3, 9), generator=g)
        labels = tok[:, 1:].clone()
        labels[:, int(torch.randint(2, 8, (1,), generator=g)):] = -100
        out.append((tok[:, :-1], labels))
    return out


def lm_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)


def estimates(model, loss_fn, data, keep=None):
    """Each micro-batch's own gradient estimate (the grad of its mean loss), from stock autograd on a copy."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    return [flat(torch.autograd.grad(loss_fn(ref, x, y), params, allow_unused=True), keep) for x, y in data]


def test_stats_need_grad_stats():
    model = make("mlp", torch.float32, "cpu")
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    with pytest.raises(RuntimeError, match="grad_stats=True"):
        acc.stats()


def test_token_weights_loss_scale_and_an_early_step_match_the_float64_reference():
    """reduction="mean" with set_weight(tokens) and loss_scale: two windows, the second ended early."""
    model = make("lm", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    beta, ls = 0.5, 8.0
    acc = gacc_kernels.attach(model, opt, steps=4, reduction="mean", loss_scale=ls, grad_stats=True,
                              stats_beta=beta)
    g2s, traces = [], []
    for window, micro_steps in enumerate([4, 3]):
        data = lm_batches(micro_steps, seed=window)
        weights = [float((y != -100).sum()) for _, y in data]
        exp = reference(estimates(model, lm_loss, data), weights)
        for (x, y), w in zip(data, weights):
            acc.set_weight(w)
            (lm_loss(model, x, y) * ls).backward()
        opt.step()  # the second window ends here, after 3 of 4 micro-steps
        opt.zero_grad()
        stats = acc.stats()
        assert_stats(stats, *exp)
        assert stats.covered == 1.0 and stats.windows == window + 1
        g2s.append(exp[0])
        traces.append(exp[1])
    # the two windows' |G|^2 estimates nearly cancel (a random-token LM has little true gradient)
    assert math.isclose(stats.g2_ema, ema(g2s, beta), rel_tol=0, abs_tol=1e-4 * max(map(abs, g2s)))
    assert math.isclose(stats.trace_ema, ema(traces, beta), rel_tol=1e-4)
    assert math.isclose(stats.b_simple_ema, stats.trace_ema / stats.g2_ema, rel_tol=1e-12)


def test_grad_scaler_sum_reduction_and_a_skipped_step():
    """fp16 with a GradScaler, reduction="sum" of losses divided by K: the scaler's scale is divided out;
    a window with an inf grad (the scaler skips its step) leaves the averages alone."""
    k, scale = 3, 1024.0
    model = make("mlp", torch.float16, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    acc = gacc_kernels.attach(model, opt, steps=k, scaler=scaler, grad_stats=True)

    def loss_fn(m, x, y):
        return F.mse_loss(m(x.half()).float(), y) / k

    for window, poison in enumerate([False, True, False]):
        data = batches("mlp", k, "cpu", seed=window)
        # the grads gacc gets are those of the scaled loss, in fp16: the reference divides them back
        ref = estimates(model, lambda m, x, y: loss_fn(m, x, y) * scaler.get_scale(), data)
        exp = reference([e * (k / scaler.get_scale()) for e in ref], [1.0] * k)
        before = acc.stats() if window else None
        handle = model.fc2.weight.register_hook(lambda g: g * float("inf")) if poison else None
        for x, y in data:
            scaler.scale(loss_fn(model, x, y)).backward()
        if handle:
            handle.remove()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        stats = acc.stats()
        if poison:
            assert stats.windows == before.windows and stats.b_simple_ema == before.b_simple_ema
        else:
            assert_stats(stats, *exp, rtol=1e-3)
    assert stats.windows == 2


def test_a_parameter_with_two_grads_per_micro_step_is_left_out_and_the_rest_is_exact():
    """Reentrant checkpointing hands `shared` three grads per micro-step: it is left out of both sums, and
    said so; the rest is the reference's."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean", grad_stats=True)
    params = list(model.parameters())
    shared = {id(model.shared.weight), id(model.shared.bias)}
    keep = [id(p) not in shared for p in params]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, 8, generator=g)) for _ in range(3)]

    def loss_fn(m, x, y):
        return F.mse_loss(m(x), y)

    plain = copy.deepcopy(model)
    plain.reentrant = False  # the same math; torch.autograd.grad cannot go through a reentrant checkpoint
    exp = reference(estimates(plain, loss_fn, data, keep), [1.0] * 3)
    for x, y in data:
        loss_fn(model, x, y).backward()
    stats = acc.stats()
    assert_stats(stats, *exp)
    total = sum(p.numel() for p in params)
    assert math.isclose(stats.covered, 1 - (8 * 8 + 8) / total)


def test_one_micro_batch_gives_no_estimate():
    model = make("mlp", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=1, grad_stats=True)
    x, y = batches("mlp", 1, "cpu")[0]
    F.mse_loss(model(x), y).backward()
    stats = acc.stats()
    assert stats.n == 1 and math.isnan(stats.b_simple) and math.isnan(stats.b_simple_ema) and stats.windows == 0


@pytest.mark.parametrize("kind,dtype", [("mlp", torch.bfloat16), ("lm", torch.float32)])
def test_stats_change_no_result_bit(kind, dtype):
    """The same loop with and without statistics: p.grad, p.main_grad and the parameters, bit for bit, over a
    full window (the fused last pass), an early step and a clip."""
    runs = []
    for on in (False, True):
        model = make(kind, dtype, "cpu", **({"tied": True} if kind == "lm" else {}))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean", grad_stats=on)
        seen = []
        for window, micro_steps in enumerate([3, 2]):
            data = batches(kind, micro_steps, "cpu", seed=window) if kind == "mlp" else lm_batches(micro_steps, window)
            for i, (x, y) in enumerate(data):
                acc.set_weight(1.0 + i)
                loss = (F.mse_loss(model(x.to(dtype)).float(), y) if kind == "mlp" else lm_loss(model, x, y))
                loss.backward()
            acc.clip_grad_norm_(0.5)
            seen += [p.grad.clone() for p in model.parameters()] + [p.main_grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
        runs.append(seen + [p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32),
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32))


def test_checkpoint_mid_window_resumes_the_statistics():
    """acc.state_dict() mid-window carries the window's sums: the resumed run's stats are the uninterrupted
    run's."""
    def run(split):
        model = make("mlp", torch.float32, "cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=4, grad_stats=True, stats_beta=0.5)
        data = batches("mlp", 8, "cpu", seed=4)
        for i, (x, y) in enumerate(data):
            if i == split:
                state = copy.deepcopy(acc.state_dict())
                acc.remove()
                acc = gacc_kernels.attach(model, opt, steps=4, grad_stats=True, stats_beta=0.5)
                acc.load_state_dict(state)
            F.mse_loss(model(x), y).backward()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()
        return acc.stats()
    assert run(split=6) == run(split=None)


def test_linear_regression_noise_scale_within_10_percent_of_the_analytic_answer():
    """Per-example loss (x.theta - y)^2 / 2 with x ~ N(0, I_d), y = x.theta* + eps, eps ~ N(0, sigma^2), at a
    fixed theta = theta* + delta: the gradient x (x.delta - eps) has mean delta and covariance
    (|delta|^2 + sigma^2) I + delta delta^T, so |G|^2 = |delta|^2 and tr(Sigma) = d (|delta|^2 + sigma^2)
    + |delta|^2. Micro-batches of 4..12 examples weighted by their size (units: examples), K = 8, over 400
    windows with lr = 0 (theta stays put); the EMAs within 10%."""
    d, sigma2, k, windows = 20, 1.0, 8, 400
    gen = torch.Generator().manual_seed(11)
    theta_star = torch.randn(d, generator=gen)
    delta = torch.randn(d, generator=gen)
    delta /= delta.norm()  # |delta|^2 = 1
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(theta_star + delta)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=k, reduction="mean", grad_stats=True, stats_beta=0.99)
    for _ in range(windows):
        for _ in range(k):
            b = int(torch.randint(4, 13, (1,), generator=gen))
            x = torch.randn(b, d, generator=gen)
            y = x @ theta_star + sigma2 ** 0.5 * torch.randn(b, generator=gen)
            acc.set_weight(b)
            (0.5 * (model(x).squeeze(1) - y).square().mean()).backward()
        opt.step()
        opt.zero_grad()
    stats = acc.stats()
    g2, trace = 1.0, d * (1.0 + sigma2) + 1.0
    assert stats.windows == windows
    assert abs(stats.g2_ema / g2 - 1) < 0.1, stats
    assert abs(stats.trace_ema / trace - 1) < 0.1, stats
    assert abs(stats.b_simple_ema / (trace / g2) - 1) < 0.1, stats


def test_fused_linear_weights_are_left_out_and_the_rest_is_exact(monkeypatch):
    """fuse_linear=True (forced on the CPU): the fused weights' micro-grads never pass through the kernels,
    so they are left out; the biases and the rest are the reference's."""
    from gacc_kernels import fused_linear
    monkeypatch.setattr(fused_linear, "_FORCE", True)
    model = make("mlp", torch.bfloat16, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean", grad_stats=True, fuse_linear=True)
    params = list(model.parameters())
    keep = [p.dim() == 1 for p in params]  # the biases; every weight is a fused nn.Linear's
    data = batches("mlp", 3, "cpu", seed=5)

    def loss_fn(m, x, y):
        return F.mse_loss(m(x.bfloat16()).float(), y)

    exp = reference(estimates(model, loss_fn, data, keep), [1.0] * 3)
    for x, y in data:
        loss_fn(model, x, y).backward()
    stats = acc.stats()
    assert_stats(stats, *exp)
    assert math.isclose(stats.covered, sum(p.numel() for p in params if p.dim() == 1) / sum(p.numel() for p in params))
