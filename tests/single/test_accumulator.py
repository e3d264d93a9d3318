"""attach() on small real models, checked against stock autograd with float64 accumulation."""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gacc_kernels
from gacc_kernels.window import State
from helpers.models import Checkpointed, batches, loss_fn, make, micro_grads, weighted_mean

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def run_window(model, acc, kind, data, scaler=None, weights=None):
    for i, (x, y) in enumerate(data):
        if weights:
            acc.set_weight(weights[i])
        loss = loss_fn(kind, model, x, y)
        (scaler.scale(loss) if scaler else loss).backward()
        if i < len(data) - 1:
            assert all(p.grad is None for p in model.parameters()), "p.grad must be None between micro-steps"


def fused_last(acc, param):
    """The last micro-step's own launch finalized this parameter's slot."""
    slot = next(s for s in acc._parts.events.slots if s.param is param)
    return acc.window.finalizing >= 0 and slot.finalized_in == acc.window.finalizing


def assert_grads_match(model, expected, rtol=2e-6):
    """main_grad equals the float64 mean to fp32 rounding; p.grad is it, or its one rounding."""
    for p, e in zip(model.parameters(), expected):
        if e is None:
            assert p.grad is None
            continue
        assert p.main_grad.dtype == torch.float32 and p.grad.dtype == p.dtype
        tol = rtol * e.abs().max().item() + 1e-30
        torch.testing.assert_close(p.main_grad.double(), e, rtol=0, atol=tol)
        if p.dtype == torch.float32:
            assert p.grad.data_ptr() == p.main_grad.data_ptr(), "fp32 p.grad must be a view of the buffer"
        else:
            assert torch.equal(p.grad, p.main_grad.to(p.dtype)), "p.grad must be one rounding of main_grad"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "lm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 7])
def test_grads_match_float64_large_batch(device, kind, dtype, k):
    model = make(kind, dtype, device)
    data = batches(kind, k, device)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0) if dtype == torch.float16 else None
    loss_scale = 1024.0 if scaler else 1.0  # fp16 grads are scaled before they are rounded
    expected = [g / loss_scale for g in weighted_mean(micro_grads(model, kind, data, loss_scale))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=k, scaler=scaler, reduction="mean")
    run_window(model, acc, kind, data, scaler)
    if scaler:
        scaler.unscale_(opt)  # the fused pass did it; this hands the scaler found_inf
    assert_grads_match(model, expected)
    norm = torch.stack([e.norm() for e in expected if e is not None]).norm()
    torch.testing.assert_close(acc.total_norm().double(), norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "lm"])
@pytest.mark.parametrize("k", [1, 2, 7])
def test_parameters_follow_the_large_batch_run(device, kind, k):
    """fp32 SGD with momentum for 3 optimizer steps: attach() with K micro-batches vs one stock batch of K*micro."""
    model = make(kind, torch.float32, device)
    big = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    acc = gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for step in range(3):
        data = batches(kind, k, device, seed=step)
        run_window(model, acc, kind, data)
        opt.step()
        opt.zero_grad()
        x = torch.cat([d[0] for d in data])
        y = torch.cat([d[1] for d in data])
        loss_fn(kind, big, x, y).backward()
        opt_big.step()
        opt_big.zero_grad()
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_accumulation_is_more_exact_than_stock(device):
    k = 32
    model = make("mlp", torch.bfloat16, device)
    data = batches("mlp", k, device)
    expected = weighted_mean(micro_grads(model, "mlp", data))
    stock = copy.deepcopy(model)
    for x, y in data:
        (loss_fn("mlp", stock, x, y) / k).backward()
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=k, reduction="mean")
    run_window(model, acc, "mlp", data)
    for p, q, e in zip(model.parameters(), stock.parameters(), expected):
        ours = (p.main_grad.double() - e).abs().max()
        theirs = (q.grad.double() - e).abs().max()
        assert ours * 100 < theirs


@pytest.mark.parametrize("device", DEVICES)
def test_weights_give_the_weighted_mean(device):
    k, weights = 4, [3.0, 1.0, 0.0, 7.5]
    model = make("mlp", torch.float32, device)
    data = batches("mlp", k, device)
    expected = weighted_mean(micro_grads(model, "mlp", data), weights)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=k, reduction="mean")
    run_window(model, acc, "mlp", data, weights=weights)
    assert_grads_match(model, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_reduction_sum_for_loops_that_divide_the_loss(device):
    k = 3
    model = make("mlp", torch.float32, device)
    data = batches("mlp", k, device)
    expected = [g * k for g in weighted_mean(micro_grads(model, "mlp", data))]
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=k, reduction="sum")
    run_window(model, acc, "mlp", data)
    assert_grads_match(model, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_early_step_uses_the_micro_steps_done(device):
    model = make("mlp", torch.float32, device)
    data = batches("mlp", 3, device)
    expected = weighted_mean(micro_grads(model, "mlp", data))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    acc = gacc_kernels.attach(model, opt, steps=8, reduction="mean")
    run_window(model, acc, "mlp", data)
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # before K: finalizes the 3 micro-steps done
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.double(), b.double() - 0.5 * e, rtol=0, atol=1e-6)
    opt.zero_grad()
    assert all(p.grad is None and p.main_grad is None for p in model.parameters())


class PartlyUsed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)
        self.never = torch.nn.Linear(6, 6)

    def forward(self, x, use_b):
        x = self.a(x)
        return self.b(x) if use_b else x


@pytest.mark.parametrize("device", DEVICES)
def test_unused_and_partly_used_parameters(device):
    model = PartlyUsed().to(device)
    xs = [torch.randn(3, 6, device=device) for _ in range(3)]
    use_b = [True, False, True]
    ref = copy.deepcopy(model)
    for x, u in zip(xs, use_b):
        (ref(x, u).square().mean() / 3).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean")
    for window in range(2):  # the second window sees stale buffer values from the first
        for x, u in zip(xs, use_b):
            model(x, u if window == 0 else True).square().mean().backward()
        if window == 0:
            for p, q in zip(model.parameters(), ref.parameters()):
                if q.grad is None:
                    assert p.grad is None  # `never` keeps None, like stock PyTorch
                else:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        opt.zero_grad()
    model.never.weight.data.zero_()
    for x in xs:  # `never` unused again: its slot holds nothing stale
        model(x, False).square().mean().backward()
    assert model.never.weight.grad is None and torch.isfinite(acc.total_norm())


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_fp16_skips_on_overflow_and_moves_the_scale_like_stock(device):
    k = 2
    model = make("mlp", torch.float16, device)
    scaler = torch.amp.GradScaler(device, init_scale=256.0, growth_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=k, scaler=scaler, reduction="mean")
    scales = []
    for window, poison in enumerate([False, True, False]):
        before = [p.detach().clone() for p in model.parameters()]
        handle = model.fc2.weight.register_hook(lambda g: g * float("inf")) if poison else None
        run_window(model, acc, "mlp", batches("mlp", k, device, seed=window), scaler)
        if handle:
            handle.remove()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert changed != poison, "the step must be skipped exactly when a grad overflowed"
        scales.append(scaler.get_scale())
    assert scales == [512.0, 256.0, 512.0]  # stock: x2 after a clean step (growth_interval=1), x0.5 on inf


@pytest.mark.parametrize("device", DEVICES)
def test_clip_grad_norm_matches_torch(device):
    model = make("mlp", torch.bfloat16, device)
    data = batches("mlp", 3, device)
    expected = weighted_mean(micro_grads(model, "mlp", data))
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, reduction="mean")
    run_window(model, acc, "mlp", data)
    norm = torch.stack([e.norm() for e in expected]).norm()
    max_norm = norm.item() / 4
    total = acc.clip_grad_norm_(max_norm)
    torch.testing.assert_close(total.double(), norm, rtol=1e-5, atol=0)
    coef = max_norm / (norm + 1e-6)
    assert_grads_match(model, [e * coef for e in expected], rtol=1e-5)
    total = acc.clip_grad_norm_(1e9)  # no clipping above the norm
    torch.testing.assert_close(total.double(), norm / 4, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_a_checkpoint_between_micro_steps_is_bit_exact(device, tmp_path):
    k = 5
    data = batches("lm", k, device)
    model = make("lm", torch.bfloat16, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    acc.set_weight(2.0)
    for x, y in data[:2]:
        loss_fn("lm", model, x, y).backward()
    torch.save(acc.state_dict(), tmp_path / "acc.pt")
    for x, y in data[2:]:
        loss_fn("lm", model, x, y).backward()
    straight = [p.main_grad.clone() for p in model.parameters()]

    resumed = make("lm", torch.bfloat16, device)
    acc2 = gacc_kernels.attach(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1), steps=k, reduction="mean")
    acc2.load_state_dict(torch.load(tmp_path / "acc.pt"))
    for x, y in data[2:]:
        loss_fn("lm", resumed, x, y).backward()
    for p, s in zip(resumed.parameters(), straight):
        assert torch.equal(p.main_grad, s)


@pytest.mark.parametrize("device", DEVICES)
def test_remove_restores_stock_behaviour_and_attach_works_again(device):
    model = make("mlp", torch.float32, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches("mlp", 2, device)
    acc = gacc_kernels.attach(model, opt, steps=4, reduction="mean")
    loss_fn("mlp", model, *data[0]).backward()
    acc.remove()  # one micro-step in flight: finalized into p.grad, nothing lost
    expected = weighted_mean(micro_grads(model, "mlp", data[:1]))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-9)
        assert not hasattr(p, "main_grad")
    assert "zero_grad" not in vars(opt) and not hasattr(model, "_gacc_accumulator")
    opt.zero_grad()
    for x, y in data:
        loss_fn("mlp", model, x, y).backward()  # stock: grads add up in p.grad
    stock = [p.grad.double() for p in model.parameters()]
    for s, e in zip(stock, weighted_mean(micro_grads(model, "mlp", data))):
        torch.testing.assert_close(s, 2 * e, rtol=1e-5, atol=1e-8)
    opt.zero_grad()
    acc = gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    run_window(model, acc, "mlp", data)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(device, reentrant):
    """A hook may fire twice for one parameter in one micro-step (reentrant): it must add up."""
    model = Checkpointed(reentrant).to(device)
    xs = [torch.randn(4, 8, device=device, requires_grad=reentrant) for _ in range(3)]
    ref = copy.deepcopy(model)
    for x in xs:
        (ref(x).square().mean() / 3).backward()
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, reduction="mean")
    for x in xs:
        model(x).square().mean().backward()
    assert acc.window.done == 3 and acc.window.state is State.FINISHED  # one micro-step per outer backward
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_tied_weights(device):
    model = make("lm", torch.float32, device, tied=True)
    data = batches("lm", 3, device)
    expected = weighted_mean(micro_grads(model, "lm", data))
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, reduction="mean")
    run_window(model, acc, "lm", data)
    assert model.head.weight.grad is model.embed.weight.grad
    assert_grads_match(model, expected, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile_first", [True, False])
def test_torch_compiled_model(device, compile_first):
    model = make("mlp", torch.float32, device)
    data = batches("mlp", 3, device)
    expected = weighted_mean(micro_grads(model, "mlp", data))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if compile_first:
        model = torch.compile(model, backend="aot_eager")
        acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean")
    else:
        acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean")
        model = torch.compile(model, backend="aot_eager")
    for x, y in data:
        loss_fn("mlp", model, x, y).backward()
    assert_grads_match(model, expected, rtol=1e-5)
    assert acc.window.state is State.FINISHED


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_model(device):
    model = make("mlp", torch.float32, device)
    model.fc2.to(torch.bfloat16)

    def loss(m, x, y):
        h = torch.nn.functional.gelu(m.fc1(x)).bfloat16()
        return torch.nn.functional.mse_loss(m.head(torch.nn.functional.gelu(m.fc2(h)).float()), y)

    data = batches("mlp", 4, device)
    ref = copy.deepcopy(model)
    grads = [[g.double() for g in torch.autograd.grad(loss(ref, x, y), list(ref.parameters()))] for x, y in data]
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=4, reduction="mean")
    for x, y in data:
        loss(model, x, y).backward()
    assert len(acc._parts.events.buffers[0].segments) == 2
    assert_grads_match(model, weighted_mean(grads))


@pytest.mark.gpu
def test_parameters_on_cpu_and_cuda_in_one_model():
    model = make("mlp", torch.float32, "cpu")
    model.fc2.cuda()

    def loss(m, x, y):
        h = m.fc2(torch.nn.functional.gelu(m.fc1(x)).cuda()).cpu()
        return torch.nn.functional.mse_loss(m.head(torch.nn.functional.gelu(h)), y)

    data = batches("mlp", 3, "cpu")
    ref = copy.deepcopy(model)
    grads = [[g.double().cpu() for g in torch.autograd.grad(loss(ref, x, y), list(ref.parameters()))]
             for x, y in data]
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, reduction="mean")
    for x, y in data:
        loss(model, x, y).backward()
    assert len(acc._parts.events.buffers) == 2
    for p, e in zip(model.parameters(), weighted_mean(grads)):
        torch.testing.assert_close(p.grad.double().cpu(), e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_micro_step_context_for_several_backwards(device):
    model = make("mlp", torch.float32, device)
    data = batches("mlp", 4, device)
    g = micro_grads(model, "mlp", data)
    # micro-step 1 = batches 0 and 1 (two backwards, summed), micro-step 2 = batches 2 and 3
    expected = weighted_mean([[a + b for a, b in zip(g[0], g[1])], [a + b for a, b in zip(g[2], g[3])]])
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")
    for pair in (data[:2], data[2:]):
        with acc.micro_step():
            for x, y in pair:
                loss_fn("mlp", model, x, y).backward()
    assert_grads_match(model, expected)


# -- bad use: a clear error, and nothing lost -------------------------------------------------------

def test_steps_must_be_a_positive_int():
    model = make("mlp", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            gacc_kernels.attach(model, opt, steps=bad, reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        gacc_kernels.attach(model, opt, steps=2, reduction="avg")


def test_attaching_twice_is_refused():
    model = make("mlp", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    with pytest.raises(RuntimeError, match="already"):
        gacc_kernels.attach(model, opt, steps=2, reduction="mean")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_past_k_is_refused_before_anything_is_added(device):
    model = make("mlp", torch.float32, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    data = batches("mlp", 3, device)
    run_window(model, acc, "mlp", data[:2])
    finished = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"optimizer\.step"):
        loss_fn("mlp", model, *data[2]).backward()
    for p, f in zip(model.parameters(), finished):
        assert torch.equal(p.grad, f)
    opt.step()
    opt.zero_grad()
    run_window(model, acc, "mlp", data[1:])  # works again after the step
    assert all(p.grad is not None for p in model.parameters())


def test_sparse_gradients_are_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="sparse"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")


def test_parameters_added_after_attach_are_refused():
    model = make("mlp", torch.float32, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=1, reduction="mean")
    model.extra = torch.nn.Linear(5, 5)
    opt.add_param_group({"params": model.extra.parameters()})
    # refused at the first backward, before autograd sums anything outside gacc
    with pytest.raises(RuntimeError, match=r"add_param_group after attach.*zero_grad\(\) to discard"):
        loss_fn("mlp", model, *batches("mlp", 1, "cpu")[0]).backward()
    assert acc.window.state is State.OPEN and acc.window.done == 0
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_in_the_optimizer_are_left_alone():
    """LoRA loops often hand the optimizer every parameter, frozen ones too: they get no grad and no
    slot, and unfreezing one later is refused by name at the next backward (its grads would bypass gacc)."""
    model = make("mlp", torch.float32, "cpu")
    expected = weighted_mean(micro_grads(model, "mlp", batches("mlp", 2, "cpu")))  # fc1 still trainable here
    model.fc1.requires_grad_(False)
    frozen = [p.detach().clone() for p in model.fc1.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=2, reduction="mean")
    for x, y in batches("mlp", 2, "cpu"):
        loss_fn("mlp", model, x, y).backward()
    for p, e in zip(model.parameters(), expected):
        if not p.requires_grad:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-7)
    opt.step()
    assert all(torch.equal(p, f) for p, f in zip(model.fc1.parameters(), frozen))
    opt.zero_grad()
    model.fc1.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"parameter fc1\.weight was frozen at attach"):
        loss_fn("mlp", model, *batches("mlp", 1, "cpu")[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    acc.remove()


def test_an_optimizer_with_a_foreign_parameter_is_refused():
    model = make("mlp", torch.float32, "cpu")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        gacc_kernels.attach(model, torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.ones(2))], lr=0.1),
                            steps=2, reduction="mean")


def test_bad_weights_are_refused():
    model = make("mlp", torch.float32, "cpu")
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="weight"):
            acc.set_weight(bad)


def test_batchnorm_warns():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="BatchNorm"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")


# -- the last micro-step finalizes in its own launches ---------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_last_micro_step_equals_the_separate_finalize_pass_bit_for_bit(device, dtype):
    """K=1: the first window finalizes in a separate pass, later ones inside the accumulate launch."""
    model = make("lm", dtype, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=1, reduction="mean")
    x, y = batches("lm", 1, device)[0]
    results = []
    for window in range(2):
        loss_fn("lm", model, x, y).backward()
        assert all(fused_last(acc, p) for p in model.parameters()) == (window == 1)
        results.append(([p.main_grad.clone() for p in model.parameters()],
                        [p.grad.clone() for p in model.parameters()], acc.total_norm()))
        opt.zero_grad()
    (m0, g0, n0), (m1, g1, n1) = results
    for a, b in zip(m0 + g0, m1 + g1):
        assert torch.equal(a, b)
    assert torch.equal(n0, n1)


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_missing_from_the_last_micro_step_are_finalized_too(device):
    model = PartlyUsed().to(device)
    xs = [torch.randn(3, 6, device=device) for _ in range(3)]
    use_b = [True, True, False]  # b gets no grad in the fused last micro-step
    ref = copy.deepcopy(model)
    for x, u in zip(xs, use_b):
        (ref(x, u).square().mean() / 3).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=3, reduction="mean")
    for x, u in zip(xs, use_b):
        model(x, u).square().mean().backward()
    assert fused_last(acc, model.a.weight) and not fused_last(acc, model.b.weight)  # a.weight fused, b.weight not
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    norm = torch.stack([q.grad.norm() for q in ref.parameters() if q.grad is not None]).norm()
    torch.testing.assert_close(acc.total_norm(), norm, rtol=1e-5, atol=0)


class SometimesShared(torch.nn.Module):
    """Uses `shared` inside and outside a reentrant checkpoint only when asked: two grads per backward."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)
        self.shared = torch.nn.Linear(8, 8)

    def forward(self, x, twice):
        f = (lambda t: self.shared(self.inner(t))) if twice else self.inner
        return self.shared(checkpoint(f, x, use_reentrant=True))


@pytest.mark.parametrize("device", DEVICES)
def test_a_second_grad_after_the_fused_pass_is_still_added(device):
    model = SometimesShared().to(device)
    xs = [torch.randn(4, 8, device=device, requires_grad=True) for _ in range(2)]
    twice = [False, True]  # the double grad first appears in the fused last micro-step
    ref = copy.deepcopy(model)
    for x, t in zip(xs, twice):
        (ref(x, t).square().mean() / 2).backward()
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")
    for x, t in zip(xs, twice):
        model(x, t).square().mean().backward()
    assert not acc._parts.events.fuses_last_pass  # fusion stays off from now on
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    norm = torch.stack([q.grad.norm() for q in ref.parameters()]).norm()
    torch.testing.assert_close(acc.total_norm(), norm, rtol=1e-5, atol=0)


def test_a_window_of_zero_weights_is_refused():
    model = make("mlp", torch.float32, "cpu")
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")
    data = batches("mlp", 2, "cpu")
    acc.set_weight(0.0)
    loss_fn("mlp", model, *data[0]).backward()
    acc.set_weight(0.0)
    with pytest.raises(ValueError, match="weight 0"):
        loss_fn("mlp", model, *data[1]).backward()


# -- loops that scale the loss, and step(closure) -----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_loss_scale_undoes_a_loop_that_divides_by_k_also_in_a_short_window(device):
    k = 3
    model = make("mlp", torch.float32, device)
    data = batches("mlp", k + 2, device)
    grads = micro_grads(model, "mlp", data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=k, loss_scale=1 / k, reduction="mean")
    for window, (batch, expected) in enumerate([(data[:k], weighted_mean(grads[:k])),
                                                (data[k:], weighted_mean(grads[k:]))]):  # 2 of 3: ends early
        for x, y in batch:
            (loss_fn("mlp", model, x, y) / k).backward()
        if window == 1:
            assert all(p.grad is None for p in model.parameters())
            acc.finish_window()
        assert_grads_match(model, expected, rtol=4e-6)
        opt.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_step_with_a_closure_runs_the_last_micro_step_inside_the_step(device, how):
    """Lightning's way: the K-th forward and backward run inside optimizer.step(closure)."""
    k = 3
    model = make("mlp", torch.float32, device)
    big = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    gacc_kernels.attach(model, opt, steps=k, reduction="mean")
    for step in range(2):
        data = batches("mlp", k, device, seed=step)
        for x, y in data[:-1]:
            loss_fn("mlp", model, x, y).backward()

        def closure(x=data[-1][0], y=data[-1][1]):
            loss = loss_fn("mlp", model, x, y)
            loss.backward()
            return loss
        opt.step(closure) if how == "positional" else opt.step(closure=closure)
        opt.zero_grad()
        loss_fn("mlp", big, torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])).backward()
        opt_big.step()
        opt_big.zero_grad()
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
