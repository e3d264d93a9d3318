"""Loops written by others, on one process: each runs as its authors write it, with the one attach line
added, against the same loop without gacc (stock fp32 autograd) or a float64 reference.

Issue "Drop-in for loops written by others", items on one process:
    3  a clip right before an early step (timm's loop, short last window)    test_timm_loop_*
    4  the loss divided by K (or by the short window's length)                 test_timm_loop_*, test_nanogpt_*
    5  two optimizers, with a GradScaler; one not given to attach()            test_two_optimizers_*
    6  freezing, unfreezing, add_param_group, model.to(dtype), grad_dtype      test_*frozen*, test_*dtype*
    7  model.zero_grad() in the middle of a window                             test_model_zero_grad_*
    8  a checkpoint after a step the GradScaler skipped                        test_state_dict_after_*
    10 fuse_linear with one weight shared by two nn.Linear                     test_fuse_linear_shared_*
    11 the DeepSpeed refusal                                                   test_deepspeed_*
Invariants: returned state is a snapshot; a refusal leaves the model, optimizer and window as they were.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gacc_kernels
from gacc_kernels import fused_linear
from gacc_kernels.window import State


class Net(torch.nn.Module):
    """Two layers of one size (staged fine-tuning swaps them), and a head."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 12)
        self.b = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def data(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 12, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def recorder(opt: torch.optim.Optimizer) -> list[list[torch.Tensor | None]]:
    """What the optimizer reads at each step: registered after attach, so after gacc's own pre-hook."""
    seen: list[list[torch.Tensor | None]] = []
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.register_step_pre_hook(lambda o, a, k: seen.append([None if p.grad is None else p.grad.clone()
                                                            for p in params]))
    return seen


def stock_and_gacc(steps: int, make_opt=lambda params: torch.optim.SGD(params, lr=0.1)):
    """A stock model and an attached copy, each with its optimizer; `want` and `got` record what each
    optimizer reads at its steps."""
    stock = Net()
    model = copy.deepcopy(stock)
    opt_s, opt = make_opt(stock.parameters()), make_opt(model.parameters())
    want = recorder(opt_s)
    acc = gacc_kernels.attach(model, opt, steps=steps)
    return (stock, opt_s), (model, opt), want, recorder(opt), acc


def assert_same(got, want, rtol=1e-6, atol=1e-8):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# -- timm: a clip right before the step, a short last window divided by its own length ---------------

def timm_loop(model, optimizer, loader, accum_steps, clip_grad):
    """timm's train_one_epoch, as it is written (no AMP, no DDP)."""
    last_accum_steps = len(loader) % accum_steps
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        output = model(input)
        loss = F.cross_entropy(output, target)
        if accum_steps > 1:
            loss /= accum_steps
        loss.backward()
        if need_update:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("epochs", [1, 2])
def test_timm_loop_with_a_clip_before_the_short_windows_step(epochs):
    """10 batches, K=4: windows of 4, 4 and 2 (divided by 2); every step clipped (max norm 0.05).
    Before, the short window's clip saw p.grad = None and the step went unclipped, 77x too large."""
    loader = data(10)
    stock = Net()
    model = copy.deepcopy(stock)
    want, got = recorder(opt_s := torch.optim.SGD(stock.parameters(), lr=0.5)), None
    for _ in range(epochs):
        timm_loop(stock, opt_s, loader, 4, 0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    acc = gacc_kernels.attach(model, opt, steps=4)
    got = recorder(opt)
    for _ in range(epochs):
        timm_loop(model, opt, loader, 4, 0.05)
    assert len(got) == len(want) == 3 * epochs
    for g, w in zip(got, want):
        assert_same(g, w)
        assert sum(x.square().sum() for x in g).sqrt() <= 0.05 * (1 + 1e-5)  # clipped, also the short window
    for p, q in zip(model.parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    acc.remove()


def test_timm_loop_is_the_float64_large_batch_step():
    """Without the clip, each step is the mean gradient of its window's batches, in float64 terms."""
    loader = data(6)
    model = Net()
    ref = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    acc = gacc_kernels.attach(model, opt, steps=4)
    got = recorder(opt)
    timm_loop(model, opt, loader, 4, float("inf"))
    for window, grads in zip([loader[:4], loader[4:]], got):
        ref.zero_grad()
        for x, y in window:
            (F.cross_entropy(ref(x.double()), y) / len(window)).backward()
        for g, p in zip(grads, ref.parameters()):
            torch.testing.assert_close(g.double(), p.grad, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    acc.remove()


def test_nanogpt_style_loss_over_k_with_the_default_is_stock():
    """The loop keeps `loss / K` (every tutorial does): the default reduction gives stock's sum, in fp32."""
    loader, k = data(8), 4
    *pairs, want, got, acc = stock_and_gacc(k, lambda params: torch.optim.AdamW(params, lr=1e-2))
    for m, o in pairs:
        for step in range(2):
            for micro in range(k):
                x, y = loader[step * k + micro]
                loss = F.cross_entropy(m(x), y) / k
                loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for g, w in zip(got, want):
        assert_same(g, w)
    acc.remove()


def test_mean_reduction_without_the_division_is_the_mean():
    """A loop that opts in to reduction='mean' does not divide: the same grads as the dividing loop."""
    loader, k = data(4), 4
    a, b = Net(), None
    b = copy.deepcopy(a)
    grads = []
    for model, reduction, div in ((a, "sum", k), (b, "mean", 1)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=k, reduction=reduction)
        seen = recorder(opt)
        for x, y in loader:
            (F.cross_entropy(model(x), y) / div).backward()
        opt.step()
        grads.append(seen[0])
        acc.remove()
    assert_same(grads[1], grads[0], rtol=1e-6, atol=1e-8)


# -- two optimizers ------------------------------------------------------------------------------------

def two_optimizer_loop(model, body, head, scaler, loader, k):
    for i, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y) / k
        scaler.scale(loss).backward()
        if (i + 1) % k == 0 or i == len(loader) - 1:
            scaler.step(head)  # the head first: in the short window it used to be skipped
            scaler.step(body)
            scaler.update()
            body.zero_grad()
            head.zero_grad()


def _two_optimizers(model):
    body = torch.optim.SGD([*model.a.parameters(), *model.b.parameters()], lr=0.3, momentum=0.9)
    head = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    return body, head


def test_two_optimizers_with_a_grad_scaler_step_as_stock():
    """Body and head optimizers, a GradScaler: the head's grads were unscaled twice (1024x too small),
    and in a short window the head's step came before the window was finished."""
    loader, k = data(7), 3
    stock = Net()
    model = copy.deepcopy(stock)
    s_body, s_head = _two_optimizers(stock)
    want = recorder(s_head)
    two_optimizer_loop(stock, s_body, s_head, torch.amp.GradScaler("cpu", init_scale=1024.0), loader, k)
    body, head = _two_optimizers(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = gacc_kernels.attach(model, [body, head], steps=k, scaler=scaler)
    got = recorder(head)
    two_optimizer_loop(model, body, head, scaler, loader, k)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert_same(g, w, rtol=1e-6, atol=1e-9)
    for p, q in zip(model.parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    acc.remove()


def test_an_inf_in_one_optimizers_grads_skips_that_optimizer_only():
    """As stock GradScaler: found_inf is per optimizer, here from gacc's fused pass."""
    model = Net()
    body, head = _two_optimizers(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = gacc_kernels.attach(model, [body, head], steps=2, scaler=scaler)
    before = {p: p.detach().clone() for p in model.parameters()}
    for i, (x, y) in enumerate(data(2)):
        loss = F.cross_entropy(model(x), y)
        if i == 1:  # an inf that reaches the head's bias only
            loss = loss + model.head.bias.sum() * float("inf")
        scaler.scale(loss).backward()
    scaler.step(head)
    scaler.step(body)
    scaler.update()
    assert all(torch.equal(p, before[p]) for p in model.head.parameters()), "the head's step must be skipped"
    assert all(not torch.equal(p, before[p]) for p in model.a.parameters()), "the body steps"
    assert scaler.get_scale() == 512.0
    acc.remove()


def test_an_optimizer_not_given_to_attach_is_refused_at_its_step():
    model = Net()
    body, head = _two_optimizers(model)
    acc = gacc_kernels.attach(model, body, steps=2)
    for x, y in data(2):
        F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.head.parameters()]
    with pytest.raises(RuntimeError, match=r"not given to attach\(\).*attach\(model, \[opt1, opt2\]"):
        head.step()
    assert all(torch.equal(p, b) for p, b in zip(model.head.parameters(), before))
    body.step()
    acc.remove()
    head.step()  # after remove(), any optimizer steps as stock


def test_each_optimizers_zero_grad_discards_only_its_own_parameters():
    """`for opt in opts: opt.step(); opt.zero_grad()`: the body's zero_grad must not take the head's
    grads before the head steps."""
    loader, k = data(4), 2
    stock = Net()
    model = copy.deepcopy(stock)
    s_body, s_head = _two_optimizers(stock)
    body, head = _two_optimizers(model)
    want = recorder(s_head)
    acc = gacc_kernels.attach(model, [body, head], steps=k)
    got = recorder(head)
    for m, opts in ((stock, (s_body, s_head)), (model, (body, head))):
        for i, (x, y) in enumerate(loader):
            (F.cross_entropy(m(x), y) / k).backward()
            if (i + 1) % k == 0:
                for opt in opts:
                    opt.step()
                    opt.zero_grad()
    for g, w in zip(got, want):
        assert_same(g, w)
    acc.remove()


# -- which parameters train ----------------------------------------------------------------------------

def test_freezing_a_managed_layer_between_windows_just_works():
    loader = data(4)
    *pairs, want, got, acc = stock_and_gacc(2)
    for m, o in pairs:
        for i, (x, y) in enumerate(loader):
            if i == 2:
                m.a.requires_grad_(False)  # the second window trains b and the head only
            (F.cross_entropy(m(x), y) / 2).backward()
            if i % 2 == 1:
                o.step()
                o.zero_grad()
    assert got[1][0] is None and got[1][1] is None  # a.weight, a.bias
    for g, w in zip(got, want):
        assert_same(g, w)
    acc.remove()


def test_unfreezing_a_layer_frozen_at_attach_is_refused_by_name_before_any_grad():
    """Staged fine-tuning: freeze a, unfreeze b (the same size, so counts match). b has no slot: its
    grads would be summed by autograd, unscaled. Refused at the first backward, nothing changed."""
    model = Net()
    model.b.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2)
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    model.a.requires_grad_(False)
    model.b.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"parameter b\.weight was frozen at attach\(\).*acc\.remove\(\)"):
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert acc.window.state is State.OPEN and acc.window.done == 1
    opt.zero_grad()
    acc.remove()
    acc = gacc_kernels.attach(model, opt, steps=2)  # what the message says, between windows
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    assert model.b.weight.grad is not None and model.a.weight.grad is None
    acc.remove()


def test_model_to_another_dtype_after_attach_is_refused_by_name():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2)
    model.to(torch.float64)  # keeps the Parameter objects, changes their dtype
    x, y = data(1)[0]
    with pytest.raises(RuntimeError, match=r"parameter .* got a torch.float64 grad, but it was torch.float32"):
        F.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(RuntimeError, match=r"torch\.float64 grad"):  # the window stays refused
        opt.step()
    opt.zero_grad()  # discards it
    acc.remove()


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="this torch has no Tensor.grad_dtype")
def test_a_parameter_with_its_own_grad_dtype_is_refused_at_attach():
    model = Net().to(torch.bfloat16)
    model.a.weight.grad_dtype = torch.float32
    with pytest.raises(ValueError, match=r"a\.weight has grad_dtype"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    assert "zero_grad" not in vars(model)


# -- discarding a window, and what survives a skipped step ---------------------------------------------

@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad_in_the_middle_of_a_window_discards_it(set_to_none):
    """Skipping a bad batch: stock PyTorch drops what was summed so far; so does gacc."""
    loader = data(4)
    *pairs, want, got, acc = stock_and_gacc(4)
    for m, o in pairs:
        for i, (x, y) in enumerate(loader):
            (F.cross_entropy(m(x), y) / 2).backward()
            if i == 1:
                m.zero_grad(set_to_none=set_to_none)  # the first two micro-batches were bad
        o.step()
        o.zero_grad()
    assert_same(got[0], want[0])
    acc.remove()


def test_state_dict_after_a_step_the_grad_scaler_skipped():
    """The first steps of an fp16 run: scaler.step() skips optimizer.step() on an inf. A checkpoint right
    after it used to fail with 'call optimizer.step() first'."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = gacc_kernels.attach(model, opt, steps=2, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    for i, (x, y) in enumerate(data(2)):
        loss = F.cross_entropy(model(x), y) * (float("inf") if i == 1 else 1.0)
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "the step was skipped"
    state = acc.state_dict()
    assert state["micro_steps"] == 0
    opt.zero_grad()
    acc.remove()


def test_state_dict_is_a_snapshot():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean")
    for x, y in data(2):
        acc.set_weight(2.0)
        F.cross_entropy(model(x), y).backward()
    state = acc.state_dict()
    state["weights"].append(7.0)
    state["buffers"][0].fill_(float("nan"))
    assert acc.window.weights == [2.0, 2.0]
    assert acc.state_dict()["buffers"][0].isfinite().all()
    acc.remove()


# -- fuse_linear and a refusal's text -----------------------------------------------------------------

class SharedLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 8, bias=False)
        self.second = torch.nn.Linear(8, 8, bias=False)
        self.second.weight = self.first.weight  # one weight, two nn.Linear

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_fuse_linear_shared_weight_takes_the_hook_path_and_removes_cleanly(monkeypatch):
    monkeypatch.setattr(fused_linear, "_FORCE", True)
    xs = [torch.randn(4, 8, dtype=torch.bfloat16) for _ in range(2)]
    results = []
    for fuse in (True, False):
        torch.manual_seed(0)
        model = SharedLinears().to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=2, fuse_linear=fuse)
        for x in xs:
            model(x).float().square().mean().backward()
        results.append(model.first.weight.main_grad.clone())
        acc.remove()
        assert "main_grad" not in vars(model.first.weight)
        assert "forward" not in vars(model.first) and "forward" not in vars(model.second)
    assert torch.equal(results[0], results[1])


def test_deepspeed_refusal_says_what_is_true():
    class DeepSpeedEngine(torch.nn.Module):  # the name is what gacc looks for
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = DeepSpeedEngine(Net())
    with pytest.raises(ValueError, match=r"grad_accum_dtype, which defaults to the model's dtype"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)


# -- what the optimizer reads: what gacc published, or an edit gacc carried -----------------------------

class WithUnused(Net):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(3, 3)


def test_a_grad_written_outside_gacc_after_publishing_is_refused_at_the_step():
    """A foreign writer (a reducer gacc does not control, a hook) gives a parameter a grad the window
    did not: refused, and nothing is stepped."""
    model = WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2)
    for x, y in data(2):
        F.cross_entropy(model(x), y).backward()
    model.unused.weight.grad = torch.ones_like(model.unused.weight)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"p\.grad of unused\.weight was set after gacc finished the window"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad()
    acc.remove()


def test_a_replaced_fp32_grad_is_carried_into_main_grad():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=1)
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    model.a.weight.grad = model.a.weight.grad * 0.5  # a new tensor, not an in-place edit
    halved = model.a.weight.grad.clone()
    with pytest.warns(UserWarning, match="changed or replaced after gacc finished"):
        opt.step()
    assert torch.equal(model.a.weight.main_grad, halved)
    acc.remove()


def test_float64_parameters_are_refused_at_attach():
    model = Net().double()
    with pytest.raises(ValueError, match=r"parameter a\.weight is torch\.float64"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    assert "zero_grad" not in vars(model)


def test_clip_grad_value_before_an_early_step_sees_the_final_grads():
    loader = data(3)
    *pairs, want, got, acc = stock_and_gacc(4)
    for m, o in pairs:
        for x, y in loader:  # 3 of K=4: the step comes early
            F.cross_entropy(m(x), y).backward()
        torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3)
        o.step()
    assert_same(got[0], want[0])
    assert max(g.abs().max() for g in got[0]) <= 1e-3
    acc.remove()


def test_a_clip_imported_before_attach_is_refused_in_an_open_window():
    """`from torch.nn.utils import clip_grad_norm_` at the top of a script keeps torch's own function,
    which gacc cannot route: before an early step it would see p.grad = None and clip nothing. Refused."""
    from gacc_kernels import stepping
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=4)
    clip_grad_norm_ = stepping._ORIGINAL["clip_grad_norm_"]  # torch's own, as imported before attach()
    assert clip_grad_norm_ is not torch.nn.utils.clip_grad_norm_
    for x, y in data(3):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"imported before attach\(\).*acc\.finish_window\(\)"):
        clip_grad_norm_(model.parameters(), 0.05)
    acc.finish_window()  # what the message says
    norm = clip_grad_norm_(model.parameters(), 0.05)
    assert norm > 0.05 and torch.stack([p.grad.norm() for p in model.parameters()]).norm() <= 0.05 * (1 + 1e-5)
    opt.step()
    acc.remove()
