"""Failures in the middle of things: attach that fails partway, a backward that raises, in-place edits
of the published p.grad. Each leaves the model exact or refuses clearly."""
import warnings

import pytest
import torch

import gacc_kernels
from helpers.models import batches, loss_fn, make, micro_grads, weighted_mean

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def assert_stock(model, device):
    """No gacc hook is left: a backward fills p.grad as stock PyTorch does."""
    assert not model._forward_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    ref = micro_grads(model, "mlp", batches("mlp", 1, device))[0]
    loss_fn("mlp", model, *batches("mlp", 1, device)[0]).backward()
    for p, e in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=0)
        p.grad = None


# -- attach is atomic -------------------------------------------------------------------------------

def test_attach_that_fails_partway_leaves_nothing_behind(monkeypatch):
    model = make("mlp", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def refuse(self, hook):
        raise RuntimeError("no post hooks here")
    monkeypatch.setattr(torch.optim.SGD, "register_step_post_hook", refuse)
    with pytest.raises(RuntimeError, match="no post hooks here"):
        gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    monkeypatch.undo()
    assert "zero_grad" not in opt.__dict__ and not opt._optimizer_step_pre_hooks
    assert_stock(model, "cpu")
    gacc_kernels.attach(model, opt, steps=2, reduction="mean")  # and it works again


class Wrapper:
    """Like a framework's optimizer wrapper (AcceleratedOptimizer): not a torch.optim.Optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups


class SubclassWrapper(torch.optim.Optimizer):
    """Like AcceleratedOptimizer: an Optimizer subclass that never ran Optimizer.__init__."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


@pytest.mark.parametrize("wrapper", [Wrapper, SubclassWrapper])
def test_an_optimizer_wrapper_is_refused_with_a_pointer_to_the_integrations(wrapper):
    model = make("mlp", torch.float32, "cpu")
    with pytest.raises(TypeError, match="integrations"):
        gacc_kernels.attach(model, wrapper(torch.optim.SGD(model.parameters(), lr=0.1)), steps=2, reduction="mean")
    assert_stock(model, "cpu")


# -- an exception inside backward -------------------------------------------------------------------

class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, when):
        ctx.when = when
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.when():
            raise torch.OutOfMemoryError("simulated OOM in backward")
        return g, None


class Faulty(torch.nn.Module):
    """An MLP whose backward raises, on demand, after the head's grads (or before any grad)."""

    def __init__(self):
        super().__init__()
        self.body = make("mlp", torch.float32, "cpu")
        self.fail_mid = self.fail_first = False

    def forward(self, x):
        h = torch.nn.functional.gelu(self.body.fc2(torch.nn.functional.gelu(self.body.fc1(x))))
        out = self.body.head(_Raise.apply(h, lambda: self.fail_mid))
        return _Raise.apply(out, lambda: self.fail_first)


def faulty_loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("device", DEVICES)
def test_a_backward_that_raises_after_some_grads_breaks_the_window_until_zero_grad(device):
    model = Faulty().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean")
    data = batches("mlp", 3, device)
    faulty_loss(model, *data[0]).backward()
    model.fail_mid = True
    with pytest.raises(torch.OutOfMemoryError):
        faulty_loss(model, *data[1]).backward()  # head's grads are in; the body's never come
    model.fail_mid = False
    with pytest.raises(RuntimeError, match="zero_grad"):
        faulty_loss(model, *data[1]).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()
    opt.zero_grad()  # discards the window; the next one is exact
    expected = weighted_mean(_grads(model, data))
    for x, y in data:
        faulty_loss(model, x, y).backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=0, atol=2e-6 * e.abs().max().item())
    assert acc.window.done == 3


@pytest.mark.parametrize("device", DEVICES)
def test_a_backward_that_raises_before_any_grad_changes_nothing(device):
    model = Faulty().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gacc_kernels.attach(model, opt, steps=3, reduction="mean")
    data = batches("mlp", 4, device)
    expected = weighted_mean(_grads(model, [data[0], data[2], data[3]]))
    faulty_loss(model, *data[0]).backward()
    model.fail_first = True
    with pytest.raises(torch.OutOfMemoryError):
        faulty_loss(model, *data[1]).backward()
    model.fail_first = False
    for x, y in data[2:]:  # the window goes on: the failed backward was no micro-step
        faulty_loss(model, x, y).backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=0, atol=2e-6 * e.abs().max().item())


@pytest.mark.parametrize("first", ["unscale_", "state_dict"])
def test_unscale_and_state_dict_refuse_a_broken_window_until_zero_grad(first):
    """A backward that raises after the head's grads reached gacc breaks the window: scaler.unscale_()
    (what scaler.step calls first) and acc.state_dict() refuse it, each also when it is the first call
    after the raise, and leave the scaler as it was; zero_grad() discards it and the next window is
    exact, with a state_dict mid-window and an unscale_ at its end."""
    model = Faulty()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    acc = gacc_kernels.attach(model, opt, steps=3, scaler=scaler, reduction="mean")
    data = batches("mlp", 3, "cpu")
    scaler.scale(faulty_loss(model, *data[0])).backward()
    model.fail_mid = True
    with pytest.raises(torch.OutOfMemoryError):
        scaler.scale(faulty_loss(model, *data[1])).backward()
    model.fail_mid = False
    calls = {"unscale_": lambda: scaler.unscale_(opt), "state_dict": acc.state_dict}
    for name in (first, *(n for n in calls if n != first)):
        for _ in range(2):  # a refusal does not mend the window
            with pytest.raises(RuntimeError, match=r"during micro-step 2 of this window.*zero_grad\(\)"):
                calls[name]()
    assert scaler._per_optimizer_states[id(opt)]["stage"].name == "READY"
    opt.zero_grad()
    expected = weighted_mean(_grads(model, data))
    scaler.scale(faulty_loss(model, *data[0])).backward()
    assert acc.state_dict()["micro_steps"] == 1
    for x, y in data[1:]:
        scaler.scale(faulty_loss(model, x, y)).backward()
    scaler.unscale_(opt)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=0, atol=2e-6 * e.abs().max().item())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 8.0  # no inf: the step was taken, the scale stays
    assert acc.state_dict()["micro_steps"] == 0  # stepped: a fresh window


def _grads(model, data):
    """Float64 per-micro-batch grads of Faulty, from stock autograd."""
    out = []
    for x, y in data:
        gs = torch.autograd.grad(faulty_loss(model, x, y), list(model.parameters()))
        out.append([g.double() for g in gs])
    return out


# -- in-place edits of the published p.grad ---------------------------------------------------------

def finished_bf16_window(device):
    """A bf16 MLP with a finished K=2 window; its optimizer, accumulator and unclipped main_grads."""
    model = make("mlp", torch.bfloat16, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    for x, y in batches("mlp", 2, device):
        loss_fn("mlp", model, x, y).backward()
    return model, opt, acc, [p.main_grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_torch_clip_grad_norm_on_bf16_grads_is_carried_into_main_grad(device):
    model, opt, acc, unclipped = finished_bf16_window(device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(UserWarning, match="clip_grad_norm_"):
        opt.step()
    for p, u in zip(model.parameters(), unclipped):
        assert torch.equal(p.main_grad, p.grad.float()), "main_grad must follow the clipped p.grad"
        assert p.main_grad.norm() < u.norm()
    opt.zero_grad()
    assert acc.window.state.value == "open"


@pytest.mark.parametrize("device", DEVICES)
def test_acc_clip_grad_norm_clips_grad_and_main_grad_in_fp32(device):
    model, opt, acc, unclipped = finished_bf16_window(device)
    total = acc.clip_grad_norm_(1e-3)
    coef = (1e-3 / (total + 1e-6)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    for p, u in zip(model.parameters(), unclipped):
        torch.testing.assert_close(p.main_grad, u * coef, rtol=2e-7, atol=0)
        assert torch.equal(p.grad, p.main_grad.to(torch.bfloat16))


# -- compiled autograd: refused at the first backward, with what to do -------------------------------

def _compiled_backward(mode, model, x, y):
    from torch._dynamo import compiled_autograd
    if mode == "config":  # the documented switch: backward inside a torch.compile'd function
        torch._dynamo.config.compiled_autograd = True
        try:
            torch.compile(lambda: loss_fn("mlp", model, x, y).backward(), backend="eager")()
        finally:
            torch._dynamo.config.compiled_autograd = False
        return
    compiler = (lambda gm: gm) if mode == "enable" else \
        (lambda gm: torch.compile(gm, backend="eager", fullgraph=True))
    with compiled_autograd._enable(compiler):
        loss_fn("mlp", model, x, y).backward()


@pytest.mark.parametrize("mode", ["config", "enable", "enable-fullgraph"])
def test_compiled_autograd_is_refused_cleanly(mode):
    model = make("mlp", torch.float32, "cpu")
    data = batches("mlp", 3, "cpu")
    expected = weighted_mean(micro_grads(model, "mlp", data[1:]))
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")
    with pytest.raises(RuntimeError, match="cannot run under compiled autograd"):
        _compiled_backward(mode, model, *data[0])
    assert all(p.grad is None for p in model.parameters()) and acc.window.done == 0
    for x, y in data[1:]:  # eager backward: exact again
        loss_fn("mlp", model, x, y).backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=0, atol=2e-6 * e.abs().max().item())
