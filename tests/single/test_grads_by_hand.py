"""acc.grads_by_hand(): a micro-step whose grads are written into p.grad by hand (a pipeline's split
weight backward sets weight.grad = dw), which no hook sees."""
import pytest
import torch

import gacc_kernels


def attached(steps=3, dtype=torch.bfloat16):
    model = torch.nn.Linear(4, 3).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, gacc_kernels.attach(model, opt, steps=steps)


def test_each_block_is_one_micro_step_summed_in_fp32():
    model, _, acc = attached()
    dws = [[torch.randn(p.shape).to(p.dtype) for p in model.parameters()] for _ in range(3)]
    for k, step in enumerate(dws):
        with acc.grads_by_hand():
            for p, dw in zip(model.parameters(), step):
                p.grad = dw.clone()
        assert acc.window.done == k + 1
        assert all((p.grad is None) == (k < 2) for p in model.parameters())
    for j, p in enumerate(model.parameters()):
        exact = sum(step[j].double() for step in dws)
        assert p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad.double(), exact, rtol=0, atol=0)  # fp32 sums of bf16: exact here
        assert torch.equal(p.grad, p.main_grad.to(torch.bfloat16))


def test_a_full_backward_inside_the_block_delivers_into_the_same_micro_step():
    model, _, acc = attached(steps=2, dtype=torch.float32)
    x = torch.randn(5, 4)
    with acc.grads_by_hand():
        model(x).sum().backward()  # the hooks fire: their grads join this micro-step
        model.bias.grad = torch.ones(3)  # and one written by hand on top
    assert acc.window.done == 1
    model(x).sum().backward()
    torch.testing.assert_close(model.weight.grad, 2 * x.sum(0).expand(3, 4))
    torch.testing.assert_close(model.bias.grad, torch.full((3,), 5.0 * 2 + 1))


def test_a_finished_window_is_refused_before_anything_is_written():
    model, _, acc = attached(steps=1)
    with acc.grads_by_hand():
        model.bias.grad = torch.ones(3, dtype=torch.bfloat16)
    result = model.bias.grad.clone()
    with pytest.raises(RuntimeError, match="after the last of steps=1"), acc.grads_by_hand():
        model.bias.grad += 1  # never runs
    assert torch.equal(model.bias.grad, result)


def test_a_block_that_raises_after_writing_a_grad_breaks_the_window():
    model, opt, acc = attached()

    def half_written():
        with acc.grads_by_hand():
            model.bias.grad = torch.ones(3, dtype=torch.bfloat16)
            raise ValueError("mid-way")

    with pytest.raises(ValueError, match="mid-way"):
        half_written()
    assert model.bias.grad is None
    with pytest.raises(RuntimeError, match="cannot be exact"):
        opt.step()
    opt.zero_grad()  # discards the window
    with acc.grads_by_hand():
        model.bias.grad = torch.ones(3, dtype=torch.bfloat16)
    assert acc.window.done == 1
