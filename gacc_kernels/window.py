"""The window: the K micro-steps between two optimizer steps, as one explicit state.

    OPEN      accumulating; `done` micro-steps finished (0 <= done < K)
    FINISHED  finalized and published: p.grad holds the result
    STEPPED   the optimizer stepped on it; the next backward opens a new window
    BROKEN    a backward raised after some of its grads reached the buffer; refused until zero_grad()

A parameter's place in the window comes from generation counters, not per-slot flags: `id` counts
windows and `micro` counts micro-steps since attach. A slot whose last grad came in window `id` holds
a gradient of this window (the next one adds, else it stores); one whose last grad came in micro-step
`micro` got a second grad in the same micro-step.
"""
from __future__ import annotations

import enum


class State(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    STEPPED = "stepped"
    BROKEN = "broken"


class Window:
    def __init__(self, steps: int):
        self.steps = steps
        self.state = State.OPEN
        self.id = 0            # windows since attach
        self.micro = 0         # micro-steps since attach: the id of the one in progress
        self.done = 0          # micro-steps finished in this window
        self.weights: list[float] = []  # their weights
        self.weight = 1.0      # the weight of the micro-step in progress
        self.fused = -1        # the micro-step whose launches also finalize (the last pass), if armed
        self.context = -1      # backwards finished inside micro_step() (-1: not in one)
        self.closing = False   # the micro-step in progress ends the window (its K-th, or a framework's sync)
        self.broken_at = 0     # the micro-step (1-based in its window) whose backward raised
        self.broken_why = ""   # or why the ranks could not finish the window

    def open(self) -> None:
        """Start a new window (after a step, zero_grad(), or a load)."""
        self.id += 1
        self.state = State.OPEN
        self.done, self.weights, self.fused = 0, [], -1

    @property
    def weight_sum(self) -> float:
        """The total weight of the micro-steps finished in this window."""
        return sum(self.weights, 0.0)

    def is_last(self) -> bool:
        """The micro-step in progress is the window's last."""
        return self.state is State.OPEN and self.closing

    def end_micro_step(self) -> bool:
        """Count the micro-step in progress; True if that completes the window."""
        self.micro += 1
        self.done += 1
        self.weights.append(self.weight)
        self.weight = 1.0
        closes, self.closing = self.closing or self.done == self.steps, False
        return closes

    def break_(self, why: str = "") -> None:
        self.state, self.broken_at, self.broken_why = State.BROKEN, self.done + 1, why
