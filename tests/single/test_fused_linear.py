"""attach(fuse_linear=True): each nn.Linear weight grad is one GEMM into the weight's fp32 slot.

On the CPU the fused route is forced (fused_linear._FORCE) with the fp32 reference GEMM, so that every
case of the bookkeeping runs in CI; on CUDA the same tests run the real addmm(out_dtype=float32).

The reference is what reaches gacc, in float64 (Observed): each p.grad its hook sees, and for each
fused weight dY^T X from the same bf16/fp16 dY and X, summed over the micro-steps with their weights.
gacc must match it to fp32 rounding, element by element: (2n + 2K + 8) * 2^-24 * sum_k w_k |terms|
(n the GEMM's inner size; 2n allows tensor cores that truncate). A bf16 rounding anywhere (a fused
weight sent the hook path) is some 2^15 / (2n + 2K + 8) times that. Stock autograd on a copy checks
the rest of backward (input and bias grads), to bf16.
"""
import copy
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import gacc_kernels
from gacc_kernels import fused_linear
from gacc_kernels.window import State
from helpers.models import SLEEP_CYCLES, Checkpointed, SlowBackward, TinyLM, batches, loss_fn
from helpers.spawn import spawn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U = 2.0 ** -24
NAN = float("nan")


@pytest.fixture(autouse=True)
def _forced(monkeypatch):
    monkeypatch.setattr(fused_linear, "_FORCE", True)


def fusable(model):
    """The weights gacc fuses: plain nn.Linear, trainable, bf16/fp16."""
    return [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad
            and m.weight.dtype in (torch.bfloat16, torch.float16)]


class Observed:
    """What reaches gacc, in float64, summed over micro-steps with their weights: the p.grad each hook sees
    (registered before attach, so they fire before gacc's) and dY^T X of each fusable Linear, from its
    output's grad and its input. Also sum_k w_k |terms|, for the bound."""

    def __init__(self, model, gemms=True):
        self.params = list(model.parameters())
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.got_grad = [False] * len(self.params)  # some hook saw p.grad not None
        self.discard()  # total, abs, n (the largest inner size of a GEMM into the parameter), k (micro-steps)
        for p in self.params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._hook)
        fused = {id(w) for w in fusable(model)} if gemms else set()
        for m in model.modules():
            if type(m) is torch.nn.Linear and id(m.weight) in fused:
                m.register_forward_hook(self._forward)

    def _hook(self, p):
        if p.grad is not None and not p.__dict__.get("grad_added_to_main_grad"):  # else a placeholder
            self.got_grad[self.index[id(p)]] = True
            g = p.grad.double()
            self.micro.append((p, g, g.abs(), 0))

    def _forward(self, module, args, y):
        if y.requires_grad:
            x = args[0]
            y.register_hook(lambda dy: self._gemm(module.weight, dy, x))

    def _gemm(self, w, dy, x):
        x = x.to(w.dtype)  # the fused GEMM's operand (autocast casts an fp32 input)
        d, xx = dy.reshape(-1, dy.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
        self.micro.append((w, d.t() @ xx, d.abs().t() @ xx.abs(), d.shape[0]))

    def end_micro_step(self, weight=1.0):
        for p, g, a, n in self.micro:
            i = self.index[id(p)]
            self.total[i] = weight * g if self.total[i] is None else self.total[i] + weight * g
            self.abs[i] = weight * a if self.abs[i] is None else self.abs[i] + weight * a
            self.n[i] = max(self.n[i], n)
        self.micro = []
        self.k += 1

    def check(self, model, scale):
        """gacc's window against the float64 sum times scale, to fp32 rounding; then start again."""
        for p, t, a, n in zip(model.parameters(), self.total, self.abs, self.n):
            if t is None:
                assert p.grad is None
                continue
            bound = (2 * n + 2 * self.k + 8) * U * a * abs(scale) + 1e-300
            err = (p.main_grad.double() - t * scale).abs()
            assert (err <= bound).all(), f"{tuple(p.shape)}: error {(err / bound).max().item():.3g} x the bound"
            assert torch.equal(p.grad, p.main_grad.to(p.dtype)), "p.grad must be one rounding of main_grad"
        self.discard()

    def discard(self):
        """Forget what was seen (a window discarded by zero_grad, or a backward that never reached gacc)."""
        self.micro = []
        self.total = [None] * len(self.params)
        self.abs = [None] * len(self.params)
        self.n = [0] * len(self.params)
        self.k = 0


def stock_mean(model, loss_of, data, weights, scale=1.0):
    """Stock autograd on a copy (take it before attach): the float64 weighted mean of bf16 grads."""
    ref = copy.deepcopy(model)
    params = trainable(ref)
    total = [None] * len(params)
    for batch, w in zip(data, weights):
        (loss_of(ref, *batch) * scale).backward()
        for i, p in enumerate(params):
            if p.grad is not None:
                total[i] = w * p.grad.double() if total[i] is None else total[i] + w * p.grad.double()
            p.grad = None
    return [None if t is None else t / (sum(weights) * scale) for t in total]


def assert_near_stock(model, stock):
    """To the bf16 rounding of each micro-step's stock grad."""
    for p, s in zip(trainable(model), stock):
        if s is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.main_grad.double(), s, rtol=0, atol=2 ** -7 * s.abs().max().item() + 1e-30)


def poison(acc):
    """Stale values in every slot: the window's first grad must store, not add."""
    for s in acc._parts.events.slots:
        s.main.fill_(NAN)


class Sub(torch.nn.Linear):
    """A Linear subclass (LoRA and quantized layers are): never fused."""


class Stack(torch.nn.Module):
    """Fusable Linears of odd sizes, with and without bias; a Linear subclass; a frozen Linear (LoRA's
    base); a LayerNorm; `b`, which forward may skip; `never`, never used."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(37, 53)
        self.norm = torch.nn.LayerNorm(53)
        self.fc2 = torch.nn.Linear(53, 53, bias=False)
        self.sub = Sub(53, 29)
        self.frozen = torch.nn.Linear(53, 29, bias=False).requires_grad_(False)
        self.b = torch.nn.Linear(29, 29)
        self.never = torch.nn.Linear(29, 29)
        self.head = torch.nn.Linear(29, 11)

    def forward(self, x, use_b=True):
        h = self.fc2(F.gelu(self.norm(self.fc1(x))))
        h = F.gelu(self.sub(h) + self.frozen(h))
        return self.head(self.b(h) if use_b else h)


def stack_data(k, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 5, 37, generator=g).to(device, dtype), torch.randn(3, 5, 11, generator=g).to(device),
             i % 3 != 1) for i in range(k)]


def stack_loss(model, x, y, use_b):
    return F.mse_loss(model(x, use_b).float(), y)


def make_stack(device, dtype):
    torch.manual_seed(1234)
    return Stack().to(device, dtype)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 7])
def test_linear_stack_matches_float64(device, dtype, k):
    """Two windows, stale NaN in every slot before each, token weights (one 0), `b` unused in some
    micro-steps (in the last one for k=2), `never` unused, fp16 with a GradScaler."""
    weights = [3.0, 1.0, 0.0, 7.5, 2.0, 1.0, 5.0][:k]
    model = make_stack(device, dtype)
    windows = [stack_data(k, device, dtype, seed) for seed in (1, 2)]
    fp16 = dtype == torch.float16
    s = 1024.0 if fp16 else 1.0
    stocks = [stock_mean(model, stack_loss, data, weights, s) for data in windows]
    obs = Observed(model)
    opt = torch.optim.SGD(trainable(model), lr=0.0)
    scaler = torch.amp.GradScaler(device, init_scale=s) if fp16 else None
    acc = gacc_kernels.attach(model, opt, steps=k, scaler=scaler, fuse_linear=True, reduction="mean")
    fused = {id(w) for w in fusable(model)}
    assert {id(m.weight) for m in model.modules() if "forward" in vars(m)} == fused
    for data, stock in zip(windows, stocks):
        poison(acc)
        for (x, y, use_b), w in zip(data, weights):
            acc.set_weight(w)
            loss = stack_loss(model, x, y, use_b)
            (scaler.scale(loss) if fp16 else loss).backward()
            obs.end_micro_step(w)
        assert acc.window.state is State.FINISHED
        if fp16:
            scaler.unscale_(opt)
            assert acc._parts.events.buffers[0].found_inf.item() == 0
        obs.check(model, 1 / (sum(weights) * s))
        assert_near_stock(model, stock)
        if fp16:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    never = (model.never.weight, model.never.bias, model.frozen.weight)
    for p, got in zip(obs.params, obs.got_grad):  # fused weights never got a grad in their dtype
        assert got == (id(p) not in fused) or any(p is q for q in never)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3])
def test_tied_weights_fused_then_hook(device, k):
    """TinyLM's head shares the embedding's weight: per micro-step a fused write (the head, first in
    backward) and a hook grad (the embedding). Its encoder layers' out_proj is a Linear subclass."""
    torch.manual_seed(1234)
    model = TinyLM(tied=True).to(device, torch.bfloat16)
    obs = Observed(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gacc_kernels.attach(model, opt, steps=k, fuse_linear=True, reduction="mean")
    assert "forward" in vars(model.head)
    for seed in (1, 2):
        for x, y in batches("lm", k, device, seed=seed):
            loss_fn("lm", model, x, y).backward()
            obs.end_micro_step()
        assert model.head.weight.grad is model.embed.weight.grad
        obs.check(model, 1 / k)
        opt.zero_grad()


class SharedAcrossCheckpoint(torch.nn.Module):
    """`lin` is used fused early in forward and as F.linear of its weight in a later reentrant checkpoint:
    the checkpoint's inner backward delivers the hook grad first, then the fused write comes."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.other = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        h = self.lin(x)
        return checkpoint(lambda t: F.linear(F.gelu(self.other(t)), self.lin.weight), h, use_reentrant=True)


def called_only(monkeypatch, before=lambda: None):
    """Fused layers whose GEMM is wrapped in Python (calling `before` first): they are never armed, so
    every weight grad takes the called path, and the last micro-step's launches finalize."""
    gemm_for = fused_linear.gemm_for

    def wrapped(device, dtype):
        gemm = gemm_for(device, dtype)

        def write(out, dy, x, beta, alpha):
            before()
            gemm(out, dy, x, beta, alpha)
        return write
    monkeypatch.setattr(fused_linear, "gemm_for", wrapped)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["called", "armed"])
def test_hook_grad_then_fused_write_in_one_micro_step(device, path, monkeypatch):
    """K=2, three windows. Called: in the first window's last micro-step the fused pass has finalized the
    hook grad when the fused write comes (added apart, then the fused pass stays off); later windows
    flush, then add. Armed: the hook grad disarms the layer, whose write then comes through Python."""
    if path == "called":
        called_only(monkeypatch)
    torch.manual_seed(0)
    model = SharedAcrossCheckpoint().to(device, torch.bfloat16)
    obs = Observed(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=2, fuse_linear=True, reduction="mean")
    assert len(acc._parts.events.capture.routes) == (0 if path == "called" else 2)
    for _ in range(3):
        for _ in range(2):
            x = torch.randn(6, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
            model(x).float().square().mean().backward()
            obs.end_micro_step()
        assert obs.got_grad[obs.index[id(model.lin.weight)]]
        assert not acc._parts.events.fuses_last_pass  # a second grad in a micro-step turns it off
        obs.check(model, 1 / 2)
        opt.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(device, reentrant):
    """`shared` is used three times per micro-step: three fused writes into one slot, stored then added."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant, hidden=24).to(device, torch.bfloat16)
    xs = [torch.randn(4, 7, 8, device=device, dtype=torch.bfloat16, requires_grad=reentrant) for _ in range(3)]
    stock = stock_mean(model, lambda m, x: m(x).float().square().mean(), [(x,) for x in xs], [1.0] * 3)
    obs = Observed(model)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, fuse_linear=True,
                              reduction="mean")
    for x in xs:
        model(x).float().square().mean().backward()
        obs.end_micro_step()
    assert acc.window.done == 3 and acc.window.state is State.FINISHED
    assert not any(obs.got_grad[obs.index[id(w)]] for w in fusable(model))
    obs.check(model, 1 / 3)
    assert_near_stock(model, stock)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile_first", [True, False])
def test_torch_compiled_model_takes_the_hook_path(device, compile_first):
    model = make_stack(device, torch.bfloat16)
    obs = Observed(model, gemms=False)  # nothing is fused under torch.compile
    data = stack_data(3, device, torch.bfloat16, 1)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    if compile_first:
        model = torch.compile(model, backend="aot_eager")
    acc = gacc_kernels.attach(model, opt, steps=3, fuse_linear=True, reduction="mean")
    if not compile_first:
        model = torch.compile(model, backend="aot_eager")
    for x, y, use_b in data:
        stack_loss(model, x, y, use_b).backward()
        obs.end_micro_step()
    assert acc.window.state is State.FINISHED
    stack = getattr(model, "_orig_mod", model)
    never = (stack.never.weight, stack.never.bias, stack.frozen.weight)
    assert all(got or any(p is q for q in never) for p, got in zip(obs.params, obs.got_grad))
    obs.check(stack, 1 / 3)


def test_cpu_without_the_switch_routes_nothing_and_is_bit_identical(monkeypatch):
    monkeypatch.setattr(fused_linear, "_FORCE", False)
    data = stack_data(3, "cpu", torch.bfloat16, 1)
    results = []
    for fuse in (False, True):
        model = make_stack("cpu", torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.1), steps=3, fuse_linear=fuse,
                                reduction="mean")
        assert [str(w.message).split(":")[0] for w in caught] == (["attach(fuse_linear=True) fused no layer"] * fuse)
        assert not any("forward" in vars(m) for m in model.modules())
        for x, y, use_b in data:
            stack_loss(model, x, y, use_b).backward()
        results.append([p.main_grad.clone() for p in trainable(model) if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_takes_the_real_gemm(dtype, monkeypatch):
    monkeypatch.setattr(fused_linear, "_FORCE", False)
    device = torch.device("cuda", torch.cuda.current_device())
    assert fused_linear.gemm_for(device, dtype) is fused_linear._C.weight_grad_into


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 37), (2, 7, 37), (37,)], ids=str)
def test_forward_input_and_bias_grads_are_stock_linear(device, bias, shape):
    """Bit for bit: the fused forward, and the input and bias grads autograd goes on with (the bias
    grad, a bf16 tensor, comes back unchanged from a window of one micro-step)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 53, bias=bias).to(device, torch.bfloat16)
    ref = copy.deepcopy(lin)
    gacc_kernels.attach(lin, torch.optim.SGD(lin.parameters(), lr=0.1), steps=1, fuse_linear=True, reduction="mean")
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    dy = torch.randn(*shape[:-1], 53, device=device, dtype=torch.bfloat16)
    outs = []
    for m in (lin, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        outs.append((y, xi.grad, m.bias.grad if bias else None))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not bias or torch.equal(outs[0][2], outs[1][2])


@pytest.mark.parametrize("device", DEVICES)
def test_what_the_fused_forward_leaves_to_stock_linear(device):
    """The C++ forward returns None, and the layer runs F.linear, under no_grad and inference_mode (no
    graph, stock bits) and for an input of another dtype (F.linear's own error); otherwise it fuses."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 53).to(device, torch.bfloat16)
    ref = copy.deepcopy(lin)
    gacc_kernels.attach(lin, torch.optim.SGD(lin.parameters(), lr=0.1), steps=2, fuse_linear=True, reduction="mean")
    x = torch.randn(3, 37, device=device, dtype=torch.bfloat16)
    assert "FusedLinear" in lin(x).grad_fn.name()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = lin(x)
            assert y.grad_fn is None and torch.equal(y, ref(x))
    errors = []
    for m in (lin, ref):
        with pytest.raises(RuntimeError) as raised:
            m(x.float())
        errors.append(str(raised.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cast, fused", [(torch.bfloat16, True), (torch.float16, False)], ids=["same", "other"])
def test_autocast(device, cast, fused):
    """Autocast to the weights' dtype: an fp32 input is cast as F.linear would and the layer is fused;
    to another dtype: stock F.linear, bit for bit (all cast to that dtype, a bf16 input too), and the
    hook path."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 53).to(device, torch.bfloat16)
    ref = copy.deepcopy(lin)
    obs = Observed(lin, gemms=fused)
    acc = gacc_kernels.attach(lin, torch.optim.SGD(lin.parameters(), lr=0.1), steps=2, fuse_linear=True,
                              reduction="mean")
    poison(acc)
    xs = [torch.randn(3, 37, device=device, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    for x in xs:
        with torch.autocast(device, dtype=cast):
            y, r = lin(x), ref(x)
            assert y.dtype == cast and torch.equal(y, r)
        y.float().square().sum().backward()
        obs.end_micro_step()
    assert acc.window.state is State.FINISHED
    assert obs.got_grad[0] != fused  # the weight's grad came through autograd only when not fused
    obs.check(lin, 1 / 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_weight_with_a_tensor_hook_takes_stock_linear_and_its_hook_runs(device, when):
    """A weight with a tensor hook (p.register_hook, before or after attach) takes stock F.linear, so that
    autograd runs its hook (here: doubling the grad) and gacc sums what the hook returns; a layer without
    one is fused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.GELU(), torch.nn.Linear(53, 11))
    model = model.to(device, torch.bfloat16)
    ref = copy.deepcopy(model)
    ref[0].weight.register_hook(lambda g: g * 2)
    seen = []

    def double(g):  # a fused layer would give it None: its grad goes to the slot, not to autograd
        seen.append(None if g is None else g.dtype)
        return None if g is None else g * 2
    if when == "before":
        model[0].weight.register_hook(double)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, fuse_linear=True,
                              reduction="mean")
    assert "forward" in vars(model[0]) and "forward" in vars(model[2])  # both fusable: the hook is seen per call
    if when == "after":
        model[0].weight.register_hook(double)

    def loss_of(m, x, y):
        h = m[0](x)
        out = m[2](m[1](h))
        return F.mse_loss(out.float(), y), h.grad_fn.name(), out.grad_fn.name()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 37, generator=g).to(device, torch.bfloat16), torch.randn(5, 11, generator=g).to(device))
            for _ in range(2)]
    stock = [None] * 4
    for x, y in data:
        loss, hooked, plain = loss_of(model, x, y)
        assert "FusedLinear" not in hooked and "FusedLinear" in plain
        loss.backward()
        loss_of(ref, x, y)[0].backward()
        for i, p in enumerate(ref.parameters()):
            stock[i] = p.grad.double() / 2 + (0 if stock[i] is None else stock[i])
            p.grad = None
    assert seen == [torch.bfloat16] * 2, "the tensor hook runs once per micro-step, with the grad"
    assert acc.window.state is State.FINISHED
    assert_near_stock(model, stock)


def test_fuse_linear_is_off_by_default():
    """attach() without fuse_linear= fuses no nn.Linear, even where fusing is possible (forced here, as
    attach(fuse_linear=True) then shows): no fused forward, no route, every weight grad through autograd."""
    model = make_stack("cpu", torch.bfloat16)
    x, y, use_b = stack_data(1, "cpu", torch.bfloat16, 1)[0]
    obs = Observed(model, gemms=False)
    acc = gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.1), steps=1)
    assert not any("forward" in vars(m) for m in model.modules())
    assert not acc._parts.events.capture.routes
    assert "FusedLinear" not in model.fc1(x).grad_fn.name()
    stack_loss(model, x, y, use_b).backward()
    assert all(obs.got_grad[obs.index[id(w)]] for w in fusable(model) if w is not model.never.weight)
    acc.remove()
    gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.1), steps=1, fuse_linear=True)
    assert "FusedLinear" in model.fc1(x).grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_grad_of_a_fused_weight_and_a_gradient_penalty(device):
    """torch.autograd.grad gets the weight's grad itself and leaves the window alone; a penalty on the
    input grad (create_graph) differentiates through the fused backward's input grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    model.to(device, torch.bfloat16)
    ref = copy.deepcopy(model)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, fuse_linear=True,
                              reduction="mean")

    def loss_of(m, x):
        x = x.clone().requires_grad_()
        out = m(x).float().square().mean()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        return out + gx.float().square().sum()

    x0 = torch.randn(5, 12, device=device, dtype=torch.bfloat16)
    (g,) = torch.autograd.grad(model(x0).float().sum(), [model[0].weight])
    (r,) = torch.autograd.grad(ref(x0).float().sum(), [ref[0].weight])
    assert torch.equal(g, r) and acc.window.done == 0
    xs = [torch.randn(5, 12, device=device, dtype=torch.bfloat16) for _ in range(2)]
    stock = stock_mean(model, loss_of, [(x,) for x in xs], [1.0, 1.0])
    for x in xs:
        loss_of(model, x).backward()
    assert acc.window.state is State.FINISHED
    assert_near_stock(model, stock)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_autograd_over_fused_layers_is_refused_cleanly(fullgraph):
    """The C++ FusedLinear nodes in the graph do not get in the way of gacc's own refusal, and the
    window is left as it was: eager micro-steps after it are exact."""
    from torch._dynamo import compiled_autograd

    model = make_stack("cpu", torch.bfloat16)
    obs = Observed(model)
    data = stack_data(3, "cpu", torch.bfloat16, 5)
    acc = gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.1), steps=2, fuse_linear=True,
                              reduction="mean")
    poison(acc)
    compiler = (lambda gm: torch.compile(gm, backend="eager", fullgraph=True)) if fullgraph else (lambda gm: gm)
    with pytest.raises(RuntimeError, match="cannot run under compiled autograd"):
        with compiled_autograd._enable(compiler):
            stack_loss(model, *data[0]).backward()
    obs.discard()  # what the refused backward showed the observer never reached gacc
    assert acc.window.done == 0 and all(p.grad is None for p in model.parameters())
    for x, y, use_b in data[1:]:
        stack_loss(model, x, y, use_b).backward()
        obs.end_micro_step()
    assert acc.window.state is State.FINISHED
    obs.check(model, 1 / 2)


@pytest.mark.parametrize("device", DEVICES)
def test_a_graph_made_before_remove_gives_its_weight_grad_to_autograd(device):
    """A forward under gacc, then remove(), then its backward: the weight grad lands in p.grad as stock
    autograd's would (not in the detached buffer); attached again, the new gacc takes it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 53).to(device, torch.bfloat16)
    ref = copy.deepcopy(lin)
    x = torch.randn(4, 37, device=device, dtype=torch.bfloat16)
    ref(x).float().square().sum().backward()
    for again in (False, True):
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        acc = gacc_kernels.attach(lin, opt, steps=2, fuse_linear=True, reduction="mean")  # its window would not publish
        loss = lin(x).float().square().sum()
        acc.remove()
        acc = gacc_kernels.attach(lin, opt, steps=1, fuse_linear=True, reduction="mean") if again else None
        loss.backward()
        torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=2 ** -7, atol=0)
        if again:
            torch.testing.assert_close(lin.weight.main_grad, ref.weight.grad.float(), rtol=2 ** -7, atol=0)
            acc.remove()
        lin.zero_grad(set_to_none=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["called", "armed"])
def test_a_fused_write_that_raises_breaks_the_window_until_zero_grad(device, path, monkeypatch):
    """A fused GEMM raises in the window's second micro-step, under the C++ backward: through Python (a
    wrapped GEMM, in the last micro-step of a K=2 window, an OutOfMemoryError that reaches the caller as
    itself), or armed (a K=3 window, the head's slot swapped for a tensor of the wrong shape: the
    backward's first grad, so only the armed write's own mark tells gacc that some of it may be in). The
    window refuses until zero_grad; the next one is exact."""
    fail = [False]
    if path == "called":
        steps, error, match = 2, torch.OutOfMemoryError, "could not allocate"

        def oom():
            if fail[0]:
                raise torch.OutOfMemoryError("the fused GEMM could not allocate")
        called_only(monkeypatch, oom)
    else:
        steps, error, match = 3, RuntimeError, None
        arm = fused_linear.arm

        def arm_badly(routes, outs, betas, alpha, task):
            if fail[0]:
                outs = [torch.empty(7, device=device) if o.shape == model.head.weight.shape else o for o in outs]
            arm(routes, outs, betas, alpha, task)
        monkeypatch.setattr(fused_linear, "arm", arm_badly)
    model = make_stack(device, torch.bfloat16)
    obs = Observed(model)
    data = stack_data(2 + steps, device, torch.bfloat16, 3)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=steps, fuse_linear=True, reduction="mean")
    stack_loss(model, *data[0]).backward()
    fail[0] = True
    with pytest.raises(error, match=match) as raised:
        stack_loss(model, *data[1]).backward()
    assert "gacc" not in str(raised.value)  # the GEMM's own error
    fail[0] = False
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()
    opt.zero_grad()
    obs.discard()
    for x, y, use_b in data[2:]:
        stack_loss(model, x, y, use_b).backward()
        obs.end_micro_step()
    assert acc.window.state is State.FINISHED
    obs.check(model, 1 / steps)


def python_calls(acc, setitem):
    """The routes of acc's fused layers each time one's weight grad comes through Python (_weight_grad).
    setitem(dict, key, value): monkeypatch.setitem, or dict.__setitem__ in a worker process."""
    calls = []
    for route in acc._parts.events.capture.routes.values():
        weight_grad = fused_linear._routes[route]

        def counted(dy, x, route=route, weight_grad=weight_grad):
            calls.append(route)
            return weight_grad(dy, x)
        setitem(fused_linear._routes, route, counted)
    return calls


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("device", DEVICES)
def test_armed_layers_make_no_python_call(device, monkeypatch):
    """On one process the C++ backward writes each fused weight grad itself (stored, then added, with the
    micro-step's weight), also in the window's last micro-step, after which one pass finalizes. Backwards
    with create_graph=True leave the buffer in no graph. Two windows, with stale NaN in every slot
    before each."""
    model = make_stack(device, torch.bfloat16)
    obs = Observed(model)
    acc = gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.0), steps=3, fuse_linear=True,
                              reduction="mean")
    calls = python_calls(acc, monkeypatch.setitem)
    assert len(acc._parts.events.capture.routes) == 5  # fc1, fc2, b, head; never, which no micro-step uses
    weights = [2.0, 0.5, 3.0]
    for seed in (1, 2):
        poison(acc)
        for i, ((x, y, use_b), w) in enumerate(zip(stack_data(3, device, torch.bfloat16, seed), weights)):
            acc.set_weight(w)
            stack_loss(model, x, y, use_b).backward(create_graph=i > 0)
            obs.end_micro_step(w)
            assert not acc._parts.events.buffers[0].buf.requires_grad
            assert not calls, f"micro-step {i}: {len(calls)} calls into Python"
        assert acc.window.state is State.FINISHED
        obs.check(model, 1 / sum(weights))
        acc.optimizer.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
def test_a_backward_with_inputs_takes_the_called_path(device, monkeypatch):
    """backward(inputs=...) in a micro-step that is armed: the C++ backward leaves the weight grads of
    the layers it reaches to Python, which adds those of the inputs only."""
    model = make_stack(device, torch.bfloat16)
    data = stack_data(2, device, torch.bfloat16, 5)

    def inputs(m):
        return [m.fc1.weight, m.head.weight, m.head.bias]
    ref = copy.deepcopy(model)
    stock = [None] * len(trainable(ref))
    for i, (x, y, use_b) in enumerate(data):
        stack_loss(ref, x, y, use_b).backward(inputs=inputs(ref) if i == 0 else None)
        for j, p in enumerate(trainable(ref)):
            if p.grad is not None:
                stock[j] = p.grad.double() / 2 + (0 if stock[j] is None else stock[j])
            p.grad = None
    acc = gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.1), steps=2, fuse_linear=True,
                              reduction="mean")
    calls = python_calls(acc, monkeypatch.setitem)
    poison(acc)
    stack_loss(model, *data[0]).backward(inputs=inputs(model))
    route = {s.param: r for s, r in acc._parts.events.capture.routes.items()}
    assert sorted(calls) == sorted([route[model.fc1.weight], route[model.head.weight]])
    stack_loss(model, *data[1]).backward()
    assert acc.window.state is State.FINISHED
    assert_near_stock(model, stock)


def test_copies_and_remove_are_plain():
    """The fused forward is an instance attribute: copies and pickles leave it out, remove() takes it
    back; also for a model that is itself one nn.Linear (two patches of its __getstate__)."""
    for model in (make_stack("cpu", torch.bfloat16), torch.nn.Linear(6, 4).bfloat16()):
        acc = gacc_kernels.attach(model, torch.optim.SGD(trainable(model), lr=0.1), steps=2, fuse_linear=True,
                                  reduction="mean")
        patched = [m for m in model.modules() if "forward" in vars(m)]
        assert patched
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert not any("forward" in vars(m) or "__getstate__" in vars(m) for m in copied.modules())
            assert not copied._forward_hooks
        acc.remove()
        assert not any("forward" in vars(m) or "__getstate__" in vars(m) for m in model.modules())


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(10, 10, bias=False)
        self.b = torch.nn.Linear(10, 10, bias=False)

    def forward(self, x, use_b):
        h = self.a(x)
        return self.b(h) if use_b else h


@pytest.mark.parametrize("device", DEVICES)
def test_a_bucket_is_ready_once_when_every_slot_has_its_grad(device, monkeypatch):
    """Fused writes count for a bucket's completion (what an overlapped all-reduce starts on), and a
    count left by a micro-step in which a slot went unused does not carry into the next. The reducer
    sends buckets as they complete, as AllReduce does: the last micro-step takes the called path."""
    torch.manual_seed(0)
    model = TwoLinears().to(device, torch.bfloat16)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, fuse_linear=True,
                              reduction="mean")
    monkeypatch.setattr(acc._parts.events.reducer, "fuses_last_pass", False)
    (bucket,) = acc._parts.events.buffers[0].buckets
    ready = []

    def on_bucket_ready(b, weight_sum):
        assert all(s.micro == acc.window.micro for s in b.slots), "ready before every slot had its grad"
        ready.append(b)
    monkeypatch.setattr(acc._parts.events.reducer, "on_bucket_ready", on_bucket_ready)
    for _ in range(2):
        for use_b in (False, True):  # the last micro-step reaches b before a
            model(torch.randn(3, 10, device=device, dtype=torch.bfloat16), use_b).float().sum().backward()
        acc.optimizer.zero_grad()
    assert ready == [bucket, bucket]


class SideStreamStack(torch.nn.Module):
    """fc2 runs on the side stream, after a sleep there: its backward, the fused GEMM into its slot
    included, runs late on a stream that is not the one backward() was called on."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 37)
        self.fc2 = torch.nn.Linear(37, 37)
        self.head = torch.nn.Linear(37, 5)

    def forward(self, x, side):
        h = F.gelu(self.fc1(x))
        side.wait_stream(torch.cuda.current_stream())
        h.record_stream(side)
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)
            h = SlowBackward.apply(F.gelu(self.fc2(h)))
        torch.cuda.current_stream().wait_stream(side)
        h.record_stream(torch.cuda.current_stream())
        return self.head(h)


@pytest.mark.gpu
def test_a_fused_layer_on_a_side_stream_with_a_slow_backward():
    torch.manual_seed(3)
    model = SideStreamStack().to("cuda", torch.bfloat16)
    side = torch.cuda.Stream()
    obs = Observed(model)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, fuse_linear=True,
                              reduction="mean")
    for _ in range(3):
        x = torch.randn(4, 24, device="cuda", dtype=torch.bfloat16)
        model(x, side).float().square().mean().backward()
        obs.end_micro_step()
    assert acc.window.state is State.FINISHED
    torch.cuda.synchronize()  # Observed's sums were made on the side stream (gacc's result is final)
    obs.check(model, 1 / 3)


# -- layers that add into p.main_grad themselves (Transformer Engine, Megatron) ----------------------

class _MainGradLinear(torch.autograd.Function):
    """Transformer Engine's fuse_wgrad_accumulation: the weight grad is added into weight.main_grad in
    fp32, grad_added_to_main_grad set, and a placeholder returned."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        weight.main_grad.addmm_(dy2.t().float(), x2.float())
        weight.grad_added_to_main_grad = True
        return dy2.mm(weight).view(x.shape), torch.empty_like(weight)


class MainGradLinear(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.weight.grad_added_to_main_grad = False

    def forward(self, x):
        return _MainGradLinear.apply(x, self.weight)


class WithMainGradLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.te = MainGradLinear(12, 20)
        self.fc = torch.nn.Linear(20, 3)

    def forward(self, x):
        return self.fc(F.gelu(self.te(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_layers_that_add_into_main_grad_themselves(device):
    """Two windows of K=3: p.main_grad is the slot, zeroed when a window opens; the placeholder grad is
    dropped; micro-step weights are refused."""
    torch.manual_seed(0)
    model = WithMainGradLayer().to(device, torch.bfloat16)
    obs = Observed(model)
    te = model.te.weight

    def record(module, args, y):  # what the layer adds, as Observed records a fused GEMM
        x = args[0]
        y.register_hook(lambda dy: obs._gemm(te, dy, x))
    model.te.register_forward_hook(record)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=3, fuse_linear=True, reduction="mean")
    with pytest.raises(ValueError, match="weigh"):
        acc.set_weight(2.0)
    slot = next(s for s in acc._parts.events.slots if s.param is te)
    for _ in range(2):
        for _ in range(3):
            # a view of its slot
            assert te.main_grad.data_ptr() == slot.main.data_ptr() and te.main_grad.shape == slot.main.shape
            x = torch.randn(4, 12, device=device, dtype=torch.bfloat16)
            model(x).float().square().mean().backward()
            obs.end_micro_step()
            assert te.grad_added_to_main_grad is False
        assert not obs.got_grad[obs.index[id(te)]]
        obs.check(model, 1 / 3)
        opt.step()
        opt.zero_grad()


# -- data parallel: fused writes, tied weights and buckets on the wire ----------------------------------

class TiedTwice(torch.nn.Module):
    """`mid` is used twice; `head` shares the embedding's weight. With bucket_bytes=2000 each weight has
    its own bucket, which goes on the wire with its first grad of the last micro-step (in the first
    window, before the reducer learns that these buckets get two): both later grads are reduced apart.
    The other micro-steps are armed: only mid's second write in a backward comes through Python."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(61, 32)
        self.mid = torch.nn.Linear(32, 32, bias=False)
        self.head = torch.nn.Linear(32, 61, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.mid(F.gelu(self.mid(self.embed(tokens)))))


def _data_parallel(rank, world):
    fused_linear._FORCE = True
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1234)
    model = TiedTwice().to(torch.bfloat16)
    obs = Observed(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=2, bucket_bytes=2000, process_group=dist.group.WORLD,
                              fuse_linear=True, reduction="mean")
    calls = python_calls(acc, dict.__setitem__)
    for window in range(2):
        for i, (x, y) in enumerate(batches("lm", 2, "cpu", seed=10 * window + rank)):
            loss_fn("lm", model, x, y).backward()
            obs.end_micro_step()
            assert len(calls) == (3 if i == 1 else 1), f"micro-step {i}: {len(calls)} calls into Python"
            calls.clear()
        for t, a in zip(obs.total, obs.abs):  # the sum over the ranks
            if t is not None:
                dist.all_reduce(t)
                dist.all_reduce(a)
        obs.k *= world
        obs.check(model, 1 / (2 * world))
        opt.zero_grad()


def test_data_parallel_two_gloo_processes():
    spawn(_data_parallel, 2, 2)
