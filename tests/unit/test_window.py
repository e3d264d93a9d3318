"""window.Window on its own: the state machine of one accumulation window, driven by hand (no autograd)."""
import random

import pytest

from gacc_kernels.window import State, Window


def run_micro_step(w: Window, weight: float = 1.0, signalled: bool = False, finalizing: bool = False) -> bool:
    """What events.Events does for one micro-step of one backward: True if it completes the window."""
    w.set_weight(weight)
    w.begin_backward(signalled, finalizing)
    return w.end_micro_step()


def test_a_new_window_is_open_and_empty():
    w = Window(3)
    assert (w.state, w.steps, w.id, w.micro, w.done, w.weights, w.weight) == (State.OPEN, 3, 0, 0, 0, [], 1.0)
    assert not w.has_result() and not w.in_context() and not w.is_last() and not w.plans_finalizing()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_steps_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        Window(bad)
    w = Window(2)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        w.set_steps(bad)
    assert w.steps == 2


@pytest.mark.parametrize("k", [1, 2, 5])
def test_the_kth_micro_step_closes_the_window_and_records_the_weights(k):
    rng = random.Random(k)
    w = Window(k)
    weights = [rng.uniform(0.1, 3.0) for _ in range(k)]
    for i, weight in enumerate(weights):
        w.set_weight(weight)
        w.begin_backward(signalled=False, finalizing=True)
        last = i == k - 1
        assert w.is_last() is last and w.closing is last
        # only the last micro-step of a window finalizes in its own launches, and only the one in progress
        assert w.plans_finalizing() is last and w.finalizing == (w.micro if last else -1)
        assert w.end_micro_step() is last
        assert w.weight == 1.0  # the next micro-step's weight starts again at 1
        assert not w.closing and not w.is_last()
    assert (w.done, w.micro, w.weights) == (k, k, weights)
    assert w.weight_sum == sum(weights)
    assert w.state is State.OPEN  # end_micro_step only reports; finish() is the transition
    w.finish()
    assert w.state is State.FINISHED and w.has_result()


def test_finalizing_needs_the_closing_micro_step_and_no_context():
    w = Window(3)
    w.begin_backward(signalled=False, finalizing=False)
    assert w.finalizing == -1
    w.end_micro_step()
    w.begin_backward(signalled=True, finalizing=False)  # closes, but the caller says no fused last pass
    assert w.is_last() and not w.plans_finalizing()
    w.end_micro_step()
    w.open()
    w.enter_context()
    w.begin_backward(signalled=True, finalizing=True)  # several backwards make this micro-step
    assert w.is_last() and not w.plans_finalizing() and w.finalizing == -1


def test_a_signal_closes_the_window_early():
    w = Window(4)
    assert not run_micro_step(w)
    assert run_micro_step(w, signalled=True)
    assert w.done == 2 and w.steps == 4


def test_end_micro_step_closes_at_k_even_without_begin_backward():
    w = Window(2)
    assert not w.end_micro_step()
    assert w.end_micro_step()


def test_stepped_only_follows_finished():
    w = Window(1)
    w.stepped()  # an optimizer step on an open window (no result yet) changes nothing
    assert w.state is State.OPEN
    run_micro_step(w)
    w.finish()
    w.stepped()
    assert w.state is State.STEPPED and w.has_result()
    w.stepped()
    assert w.state is State.STEPPED


def test_open_starts_a_new_window_and_keeps_the_counters_since_attach():
    w = Window(3)
    run_micro_step(w, 0.5)
    w.begin_backward(signalled=False, finalizing=True)  # a micro-step in progress when the window is dropped
    w.finish()
    micro = w.micro
    w.open()
    assert (w.state, w.id, w.micro, w.done, w.weights, w.closing, w.finalizing) == (State.OPEN, 1, micro, 0, [], False,
                                                                                    -1)
    w.open()
    assert w.id == 2


def test_break_records_the_micro_step_and_the_message():
    w = Window(4)
    run_micro_step(w)
    run_micro_step(w)
    w.break_()
    assert w.state is State.BROKEN and not w.has_result() and w.broken_at == 3
    assert "micro-step 3 of this window" in w.broken_message() and "zero_grad()" in w.broken_message()
    w.stepped()  # a step cannot make a broken window stepped
    assert w.state is State.BROKEN
    w.break_("the ranks ran different numbers of micro-steps.")
    assert w.broken_message().startswith("the ranks ran different numbers of micro-steps.")
    w.open()
    assert w.state is State.OPEN


def test_set_steps_is_refused_in_the_middle_of_a_window():
    w = Window(3)
    w.set_steps(4)  # nothing done yet
    assert w.steps == 4
    run_micro_step(w)
    with pytest.raises(RuntimeError, match=r"in the middle of a window \(1 of 4 micro-steps done\)"):
        w.set_steps(2)
    assert w.steps == 4
    for _ in range(3):
        run_micro_step(w)
    w.finish()
    w.set_steps(2)  # finished: the next window has the new K
    assert w.steps == 2
    w.open()
    assert not run_micro_step(w) and run_micro_step(w)


def test_micro_step_context_makes_one_micro_step_of_several_backwards():
    w = Window(2)
    assert w.count_backward()  # outside a context a backward ends its micro-step
    w.enter_context()
    assert w.in_context()
    with pytest.raises(RuntimeError, match="do not nest"):
        w.enter_context()
    assert not w.count_backward() and not w.count_backward()
    assert w.backwards == 2
    assert w.exit_context()  # two backwards: one micro-step to end now
    assert not w.in_context() and w.backwards is None
    w.enter_context()
    assert not w.exit_context()  # no backward delivered grads: no micro-step
    w.enter_context()
    w.count_backward()
    w.break_()
    assert not w.exit_context()  # the window broke inside the context: nothing to count
    assert not w.in_context()


def test_state_dict_returns_copies_not_live_lists():
    rng = random.Random(0)
    w = Window(4)
    weights = [rng.uniform(0.1, 2.0) for _ in range(2)]
    for weight in weights:
        run_micro_step(w, weight)
    w.set_weight(0.25)
    state = w.state_dict()
    assert state == {"steps": 4, "micro_steps": 2, "weights": weights, "weight": 0.25}
    state["weights"].append(99.0)
    assert w.weights == weights
    run_micro_step(w, 0.25)
    assert state["weights"] == [*weights, 99.0]  # the saved list is not the window's either

    other = Window(4)
    saved = {"steps": 4, "micro_steps": 2, "weights": list(weights), "weight": 0.5}
    other.load_state_dict(saved)
    assert (other.state, other.id, other.done, other.weights, other.weight) == (State.OPEN, 1, 2, weights, 0.5)
    saved["weights"].clear()
    assert other.weights == weights
    assert not run_micro_step(other, 0.5) and run_micro_step(other)  # it continues the saved window


def test_state_dict_of_a_stepped_window_starts_fresh():
    w = Window(2)
    run_micro_step(w, 0.5)
    run_micro_step(w, 2.0)
    w.finish()
    assert w.state_dict()["micro_steps"] == 2  # finished, not stepped: a checkpoint keeps the window
    w.stepped()
    assert w.state_dict() == {"steps": 2, "micro_steps": 0, "weights": [], "weight": 1.0}
