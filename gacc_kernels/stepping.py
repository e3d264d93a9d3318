"""The optimizer's side: its step pre- and post-hooks, step(closure), and zero_grad.

The window is finished before the optimizer reads p.grad: in the step's pre-hook, or after the
closure that runs the window's last micro-step (Lightning, LBFGS). zero_grad discards the window.
"""
from __future__ import annotations

import contextlib

import torch

from . import publish
from .events import Events
from .guards import Guards
from .patch import set_attr


class Stepping:
    def __init__(self, optimizer: torch.optim.Optimizer, events: Events, guards: Guards):
        self.optimizer, self.events, self.guards = optimizer, events, guards

    def install(self, undo: contextlib.ExitStack) -> None:
        undo.callback(self.optimizer.register_step_pre_hook(self._before_step).remove)
        undo.callback(self.optimizer.register_step_post_hook(self._after_step).remove)
        set_attr(self.optimizer, "zero_grad", self._zero_grad, undo)

    def _before_step(self, optimizer, args, kwargs):
        self.guards.check_at_step()
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            self.ready_for_step()
            return None

        def closure_then_finish():  # step(closure) runs the window's last micro-step (Lightning, LBFGS)
            loss = closure()
            self.ready_for_step()
            return loss
        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_finish}
        return (args[0], closure_then_finish, *args[2:]), kwargs

    def ready_for_step(self) -> None:
        self.events.finish_pending()
        publish.carry_in_place_edits(self.events.slots)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.events.window.stepped()

    def _zero_grad(self, set_to_none: bool = True) -> None:
        self.events.capture.check_idle()
        type(self.optimizer).zero_grad(self.optimizer, set_to_none)
        self.events.new_window()
