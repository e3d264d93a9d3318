"""attach() under the habits of real training loops: optimizers that unscale in their own step, autograd.grad
inside a micro-step, copies of the model, replaced parameters, channels_last and CUDA streams. Each result is
checked against stock PyTorch: float64 means of stock autograd grads, or a stock optimizer stepped on them."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import gacc_kernels
from helpers.models import MLP, SLEEP_CYCLES, SlowBackward, batches, loss_fn, make, micro_grads, weighted_mean

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def stock_grads(model, loss_of, data):
    """Each micro-batch's gradients of loss_of(model, *batch) by stock autograd on a copy, as float64 lists.
    Take them before attach(): the copy must be of a plain model."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    return [[g.double() for g in torch.autograd.grad(loss_of(ref, *batch), params)] for batch in data]


def assert_window(model, expected, rtol=2e-6):
    """The finished window: main_grad is the float64 mean to fp32 rounding, p.grad is it (fp32) or its one
    rounding, and both have their parameter's strides."""
    for p, e in zip(model.parameters(), expected):
        assert p.main_grad.dtype == torch.float32 and p.grad.dtype == p.dtype
        assert p.grad.stride() == p.stride() and p.main_grad.stride() == p.stride()
        torch.testing.assert_close(p.main_grad.double(), e, rtol=0, atol=rtol * e.abs().max().item() + 1e-30)
        assert torch.equal(p.grad, p.main_grad.to(p.dtype))


def assert_same(a, b):
    """Bit for bit on the CPU; on CUDA to a few fp32 roundings (its kernels may pick other reduction orders)."""
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# -- 1. optimizers that unscale in their own step (fused=True, _step_supports_amp_scaling) ---------------

class SelfUnscalingSGD(torch.optim.Optimizer):
    """Plain SGD that, like the fused optimizers, reads the `grad_scale` and `found_inf` that GradScaler.step
    sets on it: it divides the grads by grad_scale itself and skips the step on found_inf."""
    _step_supports_amp_scaling = True

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            return
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad if grad_scale is None else p.grad / grad_scale.to(p.grad)
                    p.add_(g, alpha=-group["lr"])


SELF_UNSCALING = [
    pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), id="SGD-momentum"),
    pytest.param(lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True), id="Adam"),
    pytest.param(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True), id="AdamW"),
    pytest.param(lambda ps: SelfUnscalingSGD(ps, lr=0.05), id="custom"),
]


def scaled_window(model, data, scaler, poison=False):
    """K micro-steps of scaler.scale(loss).backward(); with poison, the first one's fc2.weight grad is inf."""
    for i, (x, y) in enumerate(data):
        handle = model.fc2.weight.register_hook(lambda g: g * float("inf")) if poison and i == 0 else None
        scaler.scale(loss_fn("mlp", model, x, y)).backward()
        if handle:
            handle.remove()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["scaler.step", "unscale_-then-step"])
@pytest.mark.parametrize("make_opt", SELF_UNSCALING)
def test_grad_scaler_with_an_optimizer_that_unscales_in_its_step(device, make_opt, explicit_unscale):
    """fp32 parameters, scaled grads: three optimizer steps must equal the same optimizer, no scaler, stepped
    on the exact float64 mean gradient. The scale grows every step (growth_interval=1)."""
    k = 3
    model = make("mlp", torch.float32, device)
    ref = make("mlp", torch.float32, device)  # the same weights, never attached
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1)
    gacc_kernels.attach(model, opt, steps=k, scaler=scaler, reduction="mean")
    scales = []
    for step in range(3):
        data = batches("mlp", k, device, seed=step)
        expected = weighted_mean(micro_grads(ref, "mlp", data))
        scaled_window(model, data, scaler)
        if explicit_unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        for q, e in zip(ref.parameters(), expected):
            q.grad = e.to(q.dtype)
        ref_opt.step()
        ref_opt.zero_grad()
    assert scales == [2.0**11, 2.0**12, 2.0**13]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_opt", SELF_UNSCALING)
def test_inf_in_one_micro_step_skips_the_step_of_an_optimizer_that_unscales_in_its_step(device, make_opt):
    """Window 1 has an inf in its first micro-step: that step is skipped (no parameter, no optimizer state
    moves) and the scale halves; the others step as the reference stepped on windows 0 and 2 only."""
    k = 3
    model = make("mlp", torch.float32, device)
    ref = make("mlp", torch.float32, device)
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1)
    gacc_kernels.attach(model, opt, steps=k, scaler=scaler, reduction="mean")
    scales = []
    for window, poison in enumerate([False, True, False]):
        data = batches("mlp", k, device, seed=window)
        before = [p.detach().clone() for p in model.parameters()]
        scaled_window(model, data, scaler, poison)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
        assert not any(changed) if poison else all(changed), "the step is skipped exactly when a grad overflowed"
        if not poison:
            for q, e in zip(ref.parameters(), weighted_mean(micro_grads(ref, "mlp", data))):
                q.grad = e.to(q.dtype)
            ref_opt.step()
            ref_opt.zero_grad()
    assert scales == [2.0**11, 2.0**10, 2.0**11]  # stock: x2 after a clean step, x0.5 on inf
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- 2. torch.autograd.grad inside and between micro-steps ---------------------------------------------

def penalized_loss(wrt):
    """The micro-batch loss plus 0.1 * a squared-gradient penalty (double backward), the gradient taken
    with torch.autograd.grad(create_graph=True) w.r.t. the input or the parameters."""
    def loss_of(model, x, y):
        x = x.detach().requires_grad_()
        loss = loss_fn("mlp", model, x, y)
        targets = [x] if wrt == "input" else list(model.parameters())
        grads = torch.autograd.grad(loss, targets, create_graph=True)
        return loss + 0.1 * sum(g.pow(2).sum() for g in grads)
    return loss_of


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrt", ["input", "params"])
def test_gradient_penalty_by_autograd_grad_inside_a_micro_step(device, wrt):
    k, lr = 3, 0.1
    model = make("mlp", torch.float32, device)
    data = batches("mlp", k, device)
    loss_of = penalized_loss(wrt)
    expected = weighted_mean(stock_grads(model, loss_of, data))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for i, (x, y) in enumerate(data):
        loss_of(model, x, y).backward()
        published = [p.grad is not None for p in model.parameters()]
        assert not any(published) if i < k - 1 else all(published), \
            f"after backward {i + 1} of {k}: the window ends exactly after the K-th backward"
    assert_window(model, expected)
    opt.step()
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.double(), b.double() - lr * e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_grad_between_micro_steps_is_not_a_micro_step(device):
    """A stock torch.autograd.grad(loss, params) on a probe batch (no backward) after every micro-step, the
    last one included: it returns stock grads and neither counts nor disturbs the window."""
    k, lr = 3, 0.1
    model = make("mlp", torch.float32, device)
    data = batches("mlp", k, device)
    probe = batches("mlp", 1, device, micro=5, seed=11)[0]
    expected = weighted_mean(micro_grads(model, "mlp", data))
    expected_probe = micro_grads(model, "mlp", [probe])[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for i, (x, y) in enumerate(data):
        loss_fn("mlp", model, x, y).backward()
        held = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        grads = torch.autograd.grad(loss_fn("mlp", model, *probe), list(model.parameters()))
        for g, e in zip(grads, expected_probe):
            assert_same(g.double(), e)
        for p, h in zip(model.parameters(), held):
            assert (p.grad is None) if i < k - 1 else torch.equal(p.grad, h), \
                f"after backward {i + 1} of {k} and a probe: the window ends exactly after the K-th backward"
    assert_window(model, expected)
    opt.step()
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.double(), b.double() - lr * e, rtol=0, atol=1e-6)


# -- 3. copies of an attached model ---------------------------------------------------------------------

def copy_model(model, how):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("when", ["mid-window", "after-window"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle"])
def test_a_copy_of_an_attached_model_is_a_plain_model(device, how, when):
    """The copy, taken after 1 of K backwards or after the K-th (before the step), has no gacc hooks and
    backward on it is stock PyTorch; the original keeps accumulating exactly."""
    k, lr = 3, 0.1
    model = make("mlp", torch.float32, device)
    twin = make("mlp", torch.float32, device)  # the same weights, never attached: what stock PyTorch does
    data = batches("mlp", k, device)
    expected = weighted_mean(micro_grads(model, "mlp", data))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    done = 1 if when == "mid-window" else k
    for x, y in data[:done]:
        loss_fn("mlp", model, x, y).backward()
    held = [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    clone, stock = copy_model(model, how), copy_model(twin, how)
    assert all(not m._forward_hooks for m in clone.modules())
    for p in clone.parameters():
        assert not p._post_accumulate_grad_hooks
        assert how != "deepcopy" or not hasattr(p, "main_grad")
    for x, y in data[:2]:  # two stock backwards: p.grad holds their sum
        loss_fn("mlp", clone, x, y).backward()
        loss_fn("mlp", stock, x, y).backward()
    for p, q in zip(clone.parameters(), stock.parameters()):
        assert_same(p.grad, q.grad)
    for p, h in zip(model.parameters(), held):  # the copy's backwards did not touch the original
        assert (p.grad is None) if h is None else torch.equal(p.grad, h)
    gacc_kernels.attach(clone, torch.optim.SGD(clone.parameters(), lr=lr), steps=2,
                        reduction="mean").remove()  # not attached

    for x, y in data[done:]:
        loss_fn("mlp", model, x, y).backward()
    assert_window(model, expected)
    opt.step()
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.double(), b.double() - lr * e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_between_the_kth_backward_and_zero_grad_carries_main_grad(how, dtype):
    """A pickle of the model carries p.main_grad as any tensor attribute of a parameter: none mid-window,
    the window's fp32 result (in memory of its own, not gacc's buffer) from the K-th backward until
    zero_grad(), also after the step, and None after zero_grad(). (copy.deepcopy keeps no attribute of a
    parameter, torch's Parameter.__deepcopy__, so a deepcopy has none: see the test above.)"""
    k = 2
    model = make("mlp", dtype, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=k)
    data = batches("mlp", k, "cpu")
    loss_fn("mlp", model, *data[0]).backward()
    assert all(getattr(q, "main_grad", None) is None for q in copy_model(model, how).parameters())
    loss_fn("mlp", model, *data[1]).backward()
    buffer = acc._parts.events.buffers[0].buf
    for moment in ("after the K-th backward", "after the step"):
        results = [p.main_grad.clone() for p in model.parameters()]
        copied = copy_model(model, how)
        saved = buffer.clone()
        buffer.fill_(float("nan"))  # the copies' main_grad must not follow gacc's buffer
        for p, q, r in zip(model.parameters(), copied.parameters(), results):
            assert type(getattr(q, "main_grad", None)) is torch.Tensor, f"{moment}: no main_grad in the copy"
            assert q.main_grad.dtype == torch.float32, moment
            assert torch.equal(q.main_grad, r), moment
            assert q.main_grad.shape == p.shape and q.main_grad.stride() == p.stride(), moment
        buffer.copy_(saved)
        if moment == "after the K-th backward":
            opt.step()
    opt.zero_grad()
    assert all(q.main_grad is None for q in copy_model(model, how).parameters())


# -- 4. meta-device parameters, and parameters replaced after attach ----------------------------------

def test_attach_refuses_meta_parameters():
    with torch.device("meta"):
        model = MLP(d_in=13, hidden=21, d_out=3)
    with pytest.raises(ValueError, match="meta"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")


@pytest.mark.parametrize("then", ["backward", "step"])
def test_parameters_replaced_after_attach_are_refused(then):
    """After load_state_dict(assign=True) puts new Parameter objects in the model, the next backward
    (mid-window) or the step (after a finished window) raises, before anything is stepped."""
    k = 3
    model = make("mlp", torch.float32, "cpu")
    weights = copy.deepcopy(model.state_dict())
    data = batches("mlp", k, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    held = list(model.parameters())  # what the optimizer steps
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for x, y in data[:1 if then == "backward" else k]:
        loss_fn("mlp", model, x, y).backward()
    model.load_state_dict(copy.deepcopy(weights), assign=True)
    def next_call():
        if then == "backward":
            loss_fn("mlp", model, *data[1]).backward()
        else:
            opt.step()

    with pytest.raises(RuntimeError, match="replaced"):
        next_call()
    for (name, p), q in zip(model.named_parameters(), held):
        assert torch.equal(p, weights[name]) and torch.equal(q, weights[name]), "nothing may be stepped"


@pytest.mark.parametrize("then", ["backward", "step"])
@pytest.mark.parametrize("trainable", [True, False], ids=["fake-quant", "frozen"])
def test_a_quantization_swap_after_attach_is_refused(then, trainable):
    """A quantization-style swap puts a new Parameter object in a module (fake-quantized values, trainable
    as in QAT, or frozen as in weight-only quantization): the next backward (mid-window) or the step
    (after a finished window) raises, before anything is added by autograd or stepped."""
    k = 3
    model = make("mlp", torch.float32, "cpu")
    weights = copy.deepcopy(model.state_dict())
    data = batches("mlp", k, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    held = list(model.parameters())
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for x, y in data[:1 if then == "backward" else k]:
        loss_fn("mlp", model, x, y).backward()
    swapped = torch.nn.Parameter(model.fc2.weight.detach().to(torch.bfloat16).float(), requires_grad=trainable)
    model.fc2.weight = swapped
    quantized = swapped.detach().clone()

    def next_call():
        if then == "backward":
            loss_fn("mlp", model, *data[1]).backward()
        else:
            opt.step()

    with pytest.raises(RuntimeError, match="replaced"):
        next_call()
    assert swapped.grad is None, "autograd must not have summed a grad outside gacc"
    assert torch.equal(swapped, quantized)
    for (name, _), q in zip(model.named_parameters(), held):
        assert torch.equal(q, weights[name]), "nothing may be stepped"


@pytest.mark.gpu
def test_parameters_moved_to_another_device_are_refused_at_the_next_backward():
    """model.to() another device keeps the Parameter objects (Module._apply sets their .data between CPU
    and CUDA), so gacc sees the move in the grads: the next backward's first grad, on the new device, is
    refused before it is added, naming the replacement."""
    k = 3
    model = make("mlp", torch.float32, "cpu")
    data = batches("mlp", k, "cpu")
    held = list(model.parameters())
    gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=k, reduction="mean")
    loss_fn("mlp", model, *data[0]).backward()
    model.to("cuda")
    assert all(p is q and p.is_cuda for p, q in zip(model.parameters(), held))
    x, y = data[1]
    with pytest.raises(RuntimeError, match="replaced"):
        loss_fn("mlp", model, x.cuda(), y.cuda()).backward()


def test_a_dtype_round_trip_with_the_result_published_stays_exact_or_is_refused():
    """model.to(bf16).to(fp32) between the K-th backward and the step (as model.cpu() then model.cuda()
    would do across devices) keeps the Parameter objects and sets their .data and their p.grad.data. The
    parameters are back as laid out at attach, so the next window must be exact, or refused."""
    model = make("mlp", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    first, second = batches("mlp", 2, "cpu", seed=1), batches("mlp", 2, "cpu", seed=2)
    for x, y in first:
        loss_fn("mlp", model, x, y).backward()
    model.to(torch.bfloat16).to(torch.float32)
    opt.step()
    opt.zero_grad()
    expected = weighted_mean(micro_grads(model, "mlp", second))
    refused = None
    try:
        for x, y in second:
            loss_fn("mlp", model, x, y).backward()
        opt.step()
    except RuntimeError as e:
        refused = str(e)
    if refused is not None:  # a refusal that says what happened is fine too
        assert "replaced" in refused or "dtype" in refused, refused
        return
    assert_window(model, expected)


def test_to_empty_on_the_same_device_keeps_the_parameters_and_stays_exact():
    """to_empty() on the parameters' own device swaps their data, not the Parameter objects: gacc
    still sees every grad, and the window stays exact."""
    k = 3
    model = make("mlp", torch.float32, "cpu")
    weights = copy.deepcopy(model.state_dict())
    data = batches("mlp", k, "cpu")
    expected = weighted_mean(micro_grads(model, "mlp", data))
    gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=k, reduction="mean")
    loss_fn("mlp", model, *data[0]).backward()
    model.to_empty(device="cpu")
    model.load_state_dict(weights)  # the usual initialization after to_empty
    for x, y in data[1:]:
        loss_fn("mlp", model, x, y).backward()
    assert_window(model, expected)


# -- 5. channels_last ----------------------------------------------------------------------------------

class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(5, 7, (3, 1))

    def forward(self, x):
        return self.conv2(F.gelu(self.conv1(x)))


def conv_loss(model, x, y):
    return F.mse_loss(model(x).float(), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 3])
def test_channels_last_grads_keep_their_parameters_strides(device, dtype, k):
    """K=1: the first window finalizes in a separate pass; K=3: in the last micro-step's launches."""
    torch.manual_seed(5)
    model = ConvNet().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    assert model.conv1.weight.stride() != model.conv1.weight.contiguous().stride()
    g = torch.Generator().manual_seed(9)
    data = [(torch.randn(2, 3, 9, 11, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last),
             torch.randn(2, 7, 7, 11, generator=g).to(device)) for _ in range(k)]
    expected = weighted_mean(stock_grads(model, conv_loss, data))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for _window in range(2):  # the second window finds the buffer holding the first
        for x, y in data:
            conv_loss(model, x, y).backward()
        assert_window(model, expected)
        if dtype == torch.float32:
            assert all(p.grad.data_ptr() == p.main_grad.data_ptr() for p in model.parameters())
        opt.zero_grad()


# -- 6. CUDA streams -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_micro_steps_on_a_side_stream(dtype):
    """Forward and backward of every micro-step on a side stream kept busy before each one; the default
    stream waits for it once, then reads the grads and steps."""
    k, lr = 3, 0.1
    model = make("mlp", dtype, "cuda")
    data = batches("mlp", k, "cuda")
    expected = weighted_mean(micro_grads(model, "mlp", data))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the weights, the data and gacc's buffers were made there
    with torch.cuda.stream(side):
        for i, (x, y) in enumerate(data):
            torch.cuda._sleep(SLEEP_CYCLES)  # the backward's kernels queue behind this
            loss_fn("mlp", model, x, y).backward()
            assert all((p.grad is None) == (i < k - 1) for p in model.parameters())
    torch.cuda.current_stream().wait_stream(side)
    assert_window(model, expected)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()  # on the default stream
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, (b.float() - lr * g.float()).to(dtype), rtol=0, atol=1e-6)


class SideStreamMLP(MLP):
    """fc2 runs on the stream passed to forward, after a sleep there; autograd runs its backward on that
    stream too, slowed by SlowBackward, so fc2's grads are produced late on a stream that is not current
    when backward() was called."""

    def forward(self, x, side):
        h = F.gelu(self.fc1(x))
        side.wait_stream(torch.cuda.current_stream())
        h.record_stream(side)  # made on this stream, used on the side one
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)
            h = SlowBackward.apply(F.gelu(self.fc2(h)))
        torch.cuda.current_stream().wait_stream(side)
        h.record_stream(torch.cuda.current_stream())  # made on the side stream, used on this one
        return self.head(h)


@pytest.mark.gpu
def test_a_layer_on_a_side_stream_with_a_slow_backward():
    k, lr = 3, 0.1
    torch.manual_seed(3)
    model = SideStreamMLP(d_in=24, hidden=37, d_out=5).cuda()
    side = torch.cuda.Stream()
    data = batches("mlp", k, "cuda")

    def loss_of(m, x, y):
        return F.mse_loss(m(x, side), y)

    expected = weighted_mean(stock_grads(model, loss_of, data))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for x, y in data:
        loss_of(model, x, y).backward()
    assert_window(model, expected)
    opt.step()
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.double(), b.double() - lr * e, rtol=0, atol=1e-6)
