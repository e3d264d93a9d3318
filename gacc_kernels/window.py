"""The window: the micro-steps between two optimizer steps, as one explicit state with its transitions.

    OPEN      accumulating; `done` micro-steps finished (0 <= done < steps)
    FINISHED  finalized and published: p.grad holds the result
    STEPPED   an optimizer stepped on it (or a GradScaler skipped that step); the next backward opens
              a new window
    BROKEN    a backward raised after some of its grads reached the buffer, or the ranks disagree;
              refused until the window is discarded (zero_grad)

Only this module assigns the Window's fields; the others call its transitions.

A parameter's place in the window comes from generation counters, not per-slot flags: `id` counts
windows and `micro` counts micro-steps since attach. A slot whose last grad came in window `id` holds
a gradient of this window (the next one adds, else it stores); one whose last grad came in micro-step
`micro` got a second grad in the same micro-step.
"""
from __future__ import annotations

import enum
from typing import Any


class State(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    STEPPED = "stepped"
    BROKEN = "broken"


class Window:
    def __init__(self, steps: int):
        check_steps(steps)
        self.steps = steps     # K: the most micro-steps a window holds
        self.state = State.OPEN
        self.id = 0            # windows since attach
        self.micro = 0         # micro-steps since attach: the id of the one in progress
        self.done = 0          # micro-steps finished in this window
        self.weights: list[float] = []  # their weights
        self.weight = 1.0      # the weight of the micro-step in progress
        self.finalizing = -1   # the micro-step whose own launches also finalize (the last pass), if any
        self.backwards: int | None = None  # backwards finished in the micro_step() context; None: not in one
        self.closing = False   # the micro-step in progress ends the window (its K-th, or a signal)
        self.broken_at = 0     # the micro-step (1-based in its window) whose backward raised
        self.broken_why = ""   # or why the ranks could not finish the window

    # -- reading ------------------------------------------------------------------------------------

    @property
    def weight_sum(self) -> float:
        """The total weight of the micro-steps finished in this window."""
        return sum(self.weights, 0.0)

    def is_last(self) -> bool:
        """The micro-step in progress is the window's last."""
        return self.state is State.OPEN and self.closing

    def in_context(self) -> bool:
        """Inside a micro_step() context (several backwards make one micro-step)."""
        return self.backwards is not None

    def has_result(self) -> bool:
        return self.state in (State.FINISHED, State.STEPPED)

    # -- transitions --------------------------------------------------------------------------------

    def open(self) -> None:
        """Start a new window (after a step, zero_grad(), or a load)."""
        self.id += 1
        self.state = State.OPEN
        self.done, self.weights, self.finalizing, self.closing = 0, [], -1, False

    def set_steps(self, steps: int) -> None:
        """Change K between windows (an accumulation schedule)."""
        check_steps(steps)
        if self.state is State.OPEN and self.done:
            raise RuntimeError(f"steps cannot change to {steps} in the middle of a window ({self.done} of "
                               f"{self.steps} micro-steps done); change it after an optimizer step")
        self.steps = steps

    def set_weight(self, weight: float) -> None:
        self.weight = weight

    def begin_backward(self, signalled: bool, finalizing: bool) -> None:
        """A micro-step's backward starts: it closes the window if it is the K-th or the loop signalled the
        window's end; `finalizing`: its own launches may also finalize (decided with the closing flag)."""
        self.closing = self.done == self.steps - 1 or signalled
        self.finalizing = self.micro if finalizing and self.closing and not self.in_context() else -1

    def plans_finalizing(self) -> bool:
        """The micro-step in progress finalizes in its own launches."""
        return self.finalizing == self.micro and self.finalizing >= 0

    def end_micro_step(self) -> bool:
        """Count the micro-step in progress; True if that completes the window."""
        self.micro += 1
        self.done += 1
        self.weights.append(self.weight)
        self.weight = 1.0
        closes, self.closing = self.closing or self.done == self.steps, False
        return closes

    def enter_context(self) -> None:
        if self.backwards is not None:
            raise RuntimeError("micro_step() contexts do not nest")
        self.backwards = 0

    def count_backward(self) -> bool:
        """A backward that delivered grads ended: True if it ends a micro-step by itself (not in a
        context)."""
        if self.backwards is None:
            return True
        self.backwards += 1
        return False

    def exit_context(self) -> bool:
        """Leave the micro_step() context: True if its backwards make a micro-step to end now."""
        backwards, self.backwards = self.backwards, None
        return bool(backwards) and self.state is State.OPEN

    def finish(self) -> None:
        self.state = State.FINISHED

    def stepped(self) -> None:
        """An optimizer stepped on the finished window (or the GradScaler skipped that step)."""
        if self.state is State.FINISHED:
            self.state = State.STEPPED

    def break_(self, why: str = "") -> None:
        self.state, self.broken_at, self.broken_why = State.BROKEN, self.done + 1, why

    def broken_message(self) -> str:
        if self.broken_why:
            return self.broken_why
        return (f"a backward raised an exception during micro-step {self.broken_at} of this window, "
                "after some of its gradients had reached gacc's buffer, so the window cannot be exact. "
                "Call optimizer.zero_grad() to discard it (skip the batch), then go on.")

    # -- checkpoints: copies, never live lists ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        fresh = self.state is State.STEPPED  # the next backward starts a new window
        return {"steps": self.steps, "micro_steps": 0 if fresh else self.done,
                "weights": [] if fresh else list(self.weights), "weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Open a window that continues the saved one."""
        self.open()
        self.done, self.weights, self.weight = state["micro_steps"], list(state["weights"]), state["weight"]


def check_steps(steps: Any) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (the micro-steps per optimizer step), got {steps!r}")
