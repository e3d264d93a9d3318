"""integrations.accelerate.attach in a plain Accelerate loop, against Accelerate's own large-batch run."""
import copy

import pytest
import torch

pytest.importorskip("accelerate")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import gacc_kernels
from gacc_kernels.integrations import accelerate as gacc_accelerate
from models import MLP

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
        gacc_kernels.attach(model, opt, steps=2)


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
