"""integrations.accelerate.attach in a plain Accelerate loop, against Accelerate's own large-batch run."""
import copy

import pytest
import torch

pytest.importorskip("accelerate")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import gacc_kernels
from gacc_kernels.integrations import accelerate as gacc_accelerate
from helpers.llama import (
    SEQ_MICRO,
    SEQS,
    assert_same_steps,
    check_lora_with_checkpointing,
    sequences,
    tiny_llama,
    tokens,
)
from helpers.models import MLP

N, MICRO = 10, 4  # 10 micro-batches per epoch: K=3 and K=4 end each epoch with a short window


def dataset(seed=3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N * MICRO, 24, generator=g), torch.randn(N * MICRO, 5, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def train(net, k, batch, use_gacc, clip=None, epochs=2):
    """The grads the optimizer saw at each step, and the trained net."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=batch, shuffle=False)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    acc = gacc_accelerate.attach(accelerator, model, opt) if use_gacc else None
    seen = []
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    if clip:
                        accelerator.clip_grad_norm_(model.parameters(), clip)
                    seen.append([p.grad.detach().double().clone() for p in model.parameters()])
                opt.step()
                opt.zero_grad()
    if acc is not None:
        acc.remove()
    return seen, net


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_accelerate_matches_its_large_batch_run(k, clip):
    torch.manual_seed(0)
    net = MLP()
    seen, trained = train(copy.deepcopy(net), k, MICRO, True, clip)
    seen_big, big = train(copy.deepcopy(net), 1, MICRO * k, False, clip)
    assert len(seen) == len(seen_big) == 2 * -(-N // k)
    for step, (a, b) in enumerate(zip(seen, seen_big)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * y.abs().max().item(), msg=f"step {step}")
    for p, q in zip(trained.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-5)


def test_stock_accelerate_divides_the_short_window_by_k():
    """The comparison above can fail: stock accumulation steps on (r/K) times the short window's mean."""
    torch.manual_seed(0)
    net = MLP()
    seen, _ = train(copy.deepcopy(net), 3, MICRO, False)
    seen_big, _ = train(copy.deepcopy(net), 1, MICRO * 3, False)
    short = 3  # the 4th step of the epoch: 1 micro-batch of 3
    for x, y in zip(seen[short], seen_big[short]):
        torch.testing.assert_close(x, y / 3, rtol=1e-5, atol=1e-7)


def test_raw_attach_on_the_accelerated_optimizer_names_the_integration():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    net = MLP()
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="integrations"):
        gacc_kernels.attach(model, opt, steps=2, reduction="mean")


def test_a_mid_window_save_state_resumes_bit_for_bit(tmp_path):
    """accelerator.register_for_checkpointing(acc): save_state/load_state carry the window in progress."""
    torch.manual_seed(0)
    net = MLP()
    batches = list(torch.utils.data.DataLoader(dataset(), batch_size=MICRO))

    def run(model_net, start, stop, load=None, save=None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(gradient_accumulation_steps=3, cpu=True)
        model, opt = accelerator.prepare(model_net, torch.optim.SGD(model_net.parameters(), lr=0.05, momentum=0.9))
        acc = gacc_accelerate.attach(accelerator, model, opt)
        accelerator.register_for_checkpointing(acc)
        if load:
            accelerator.load_state(load)
        for i in range(start, stop):
            x, y = batches[i]
            accelerator.gradient_state._set_sync_gradients((i + 1) % 3 == 0)  # what accumulate() decides
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
            if save and i == save[1]:
                accelerator.save_state(save[0])
        acc.remove()
        return model_net

    whole = run(copy.deepcopy(net), 0, 9)
    path = str(tmp_path / "state")
    run(copy.deepcopy(net), 0, 5, save=(path, 4))  # after micro-steps 1 and 2 of the window of batches 3-5
    resumed = run(copy.deepcopy(net), 5, 9, load=path)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


# -- a tiny Llama on variable-length, padded sequences (as in test_integration_transformers.py) ------------

def train_llama(model, k, batch, use_gacc, weigh=True, clip=None, mixed_precision="no", epochs=2, recipe=False):
    """The grads the optimizer stepped on (its step pre-hook, after the clip) at each step, and the trained model.

    The loss is the model's own, the mean over the micro-batch's label tokens (their count differs from
    micro-batch to micro-batch); with gacc, acc.set_weight(that count) makes each window's gradient the
    mean over the window's tokens, which is the large-batch run's loss. recipe=True: Accelerate's own
    recipe instead, each micro-batch's summed loss times K over its window's token count, and gacc
    attached with reduction="sum"."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True, mixed_precision=mixed_precision)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(sequences(), batch_size=batch, shuffle=False)
    prepared, opt, loader = accelerator.prepare(model, opt, loader)
    acc = gacc_accelerate.attach(accelerator, prepared, opt, reduction="sum" if recipe else "mean") \
        if use_gacc else None
    batches = list(loader)  # the window token counts of the recipe, epoch by epoch (each ends its window)
    window_tokens = [sum(tokens(c) for c in batches[i - i % k: i - i % k + k]) for i in range(len(batches))]
    seen = []
    gacc_accelerate.unwrap_optimizer(opt).register_step_pre_hook(  # after gacc's: what the step uses
        lambda o, args, kwargs: seen.append([p.grad.detach().double().clone()
                                             for g in o.param_groups for p in g["params"]]))
    for _ in range(epochs):
        for i, b in enumerate(loader):
            with accelerator.accumulate(prepared):
                loss = prepared(**b).loss
                if recipe:
                    loss = loss * tokens(b) * k / window_tokens[i]
                elif acc is not None and weigh:
                    acc.set_weight(tokens(b))
                accelerator.backward(loss)
                if clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(prepared.parameters(), clip)  # frozen ones (LoRA) included
                opt.step()
                opt.zero_grad()
    if acc is not None:
        acc.remove()
    return seen, model


@pytest.mark.parametrize("k", [1, 3, 4])
def test_accelerate_llama_with_padded_sequences_matches_its_large_batch_run(k):
    """Token counts differ per micro-batch: weighted by them, the windows give the large batch's token mean."""
    model = tiny_llama()
    run = train_llama(copy.deepcopy(model), k, SEQ_MICRO, True)
    big = train_llama(copy.deepcopy(model), 1, SEQ_MICRO * k, False)
    assert_same_steps(*run, *big, 2 * -(-SEQS // (SEQ_MICRO * k)))


@pytest.mark.parametrize("k", [3, 4])
def test_accelerate_recipe_for_variable_sizes_with_reduction_sum(k):
    """Accelerate's recipe normalises each loss for its window itself; with reduction="sum" gacc adds what
    accelerator.backward gives, in fp32: the large batch's token mean, short windows included."""
    model = tiny_llama()
    run = train_llama(copy.deepcopy(model), k, SEQ_MICRO, True, recipe=True)
    big = train_llama(copy.deepcopy(model), 1, SEQ_MICRO * k, False)
    assert_same_steps(*run, *big, 2 * -(-SEQS // (SEQ_MICRO * k)))


def test_accelerate_llama_without_token_weights_is_not_the_large_batch_run():
    """The comparison above can fail: unweighted, the window's grad is the mean of the micro-batch means."""
    model = tiny_llama()
    run = train_llama(copy.deepcopy(model), 3, SEQ_MICRO, True, weigh=False)
    big = train_llama(copy.deepcopy(model), 1, SEQ_MICRO * 3, False)
    assert len(run[0]) == len(big[0]) == 4
    with pytest.raises(AssertionError, match="step 0"):  # the grads of the first step differ
        assert_same_steps(*run, *big, 4)


def test_accelerate_llama_lora_with_gradient_checkpointing():
    check_lora_with_checkpointing(lambda model, k, batch, use_gacc, clip:
                                  train_llama(model, k, batch, use_gacc, clip=clip))


def test_accelerate_llama_bf16_autocast():
    """mixed_precision="bf16" (autocast on the CPU, fp32 parameters), K=4: the same steps as the large-batch
    run, to the bf16 rounding of the forward."""
    model = tiny_llama()
    seen, trained = train_llama(copy.deepcopy(model), 4, SEQ_MICRO, True, mixed_precision="bf16")
    seen_big, big = train_llama(copy.deepcopy(model), 1, SEQ_MICRO * 4, False, mixed_precision="bf16")
    assert len(seen) == len(seen_big) == 4
    for step, (a, b) in enumerate(zip(seen, seen_big)):
        err = max((x - y).abs().max().item() for x, y in zip(a, b))
        scale = max(y.abs().max().item() for y in b)
        assert err <= 2e-2 * scale, f"step {step}: gacc is {err} from the large-batch grads (largest {scale})"
    for p, q in zip(trained.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)


def test_grad_stats_go_to_the_trackers():
    """attach(..., grad_stats=True): accelerator.log sends the last window's noise scale to every tracker."""
    from accelerate.tracking import GeneralTracker

    class Tracker(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append(dict(values))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    tracker = Tracker()
    accelerator = Accelerator(gradient_accumulation_steps=3, cpu=True, log_with=[tracker])
    accelerator.init_trackers("gacc")
    net = MLP()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO, shuffle=False)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    acc = gacc_accelerate.attach(accelerator, model, opt, grad_stats=True)
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                accelerator.log({"loss": loss.item()})
    acc.remove()
    assert len(tracker.logged) == 4  # 10 micro-batches: windows of 3, 3, 3 and 1
    for values in tracker.logged:
        assert {"loss", "gacc/b_simple", "gacc/g2", "gacc/trace"} <= values.keys()
    assert all(values["gacc/trace"] > 0 for values in tracker.logged[:3])
