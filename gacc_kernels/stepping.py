"""The optimizer's side: what may end, discard or read a window between backwards.

    step         each attached optimizer's step pre-hook finishes the window before it reads p.grad
                 (after the closure of step(closure), which runs the last micro-step: Lightning, LBFGS);
                 its post-hook marks the window stepped
    zero_grad    optimizer.zero_grad() and model.zero_grad() discard what they would zero in stock
                 PyTorch: the optimizer's parameters, or all of them, also in the middle of a window
    a clip       torch.nn.utils.clip_grad_norm_ / clip_grad_value_ over managed parameters prepare a step,
                 so they finish a window in progress first and clip its result (a short window at the
                 end of an epoch, where the clip comes before the step that would finish it)
    others       an optimizer that was not given to attach() but steps managed parameters is refused
                 at its step (a global step pre-hook)
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import publish
from .events import Events
from .guards import Guards
from .patch import plain_copies, set_attr
from .window import State


class Stepping:
    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], events: Events,
                 guards: Guards):
        self.model, self.optimizers, self.events, self.guards = model, optimizers, events, guards
        slot_of = {id(s.param): s for s in events.slots}
        # what each optimizer's zero_grad discards: its parameters' slots, and those of no optimizer
        # (so one optimizer's zero_grad discards the whole window, as before there were several)
        owned = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        orphans = [s for s in events.slots if id(s.param) not in owned]
        self.slots_of = {id(o): [slot_of[id(p)] for g in o.param_groups for p in g["params"]
                                 if id(p) in slot_of] + orphans
                         for o in optimizers}

    def install(self, undo: contextlib.ExitStack) -> None:
        for opt in self.optimizers:
            undo.callback(opt.register_step_pre_hook(self._before_step).remove)
            undo.callback(opt.register_step_post_hook(self._after_step).remove)
            set_attr(opt, "zero_grad", functools.partial(self._zero_grad, opt), undo)
        for module in _zero_grad_owners(self.model):
            set_attr(module, "zero_grad", functools.partial(self._model_zero_grad, module), undo)
            plain_copies(module, undo, attrs=("zero_grad",))
        undo.callback(register_optimizer_step_pre_hook(self._any_step).remove)
        _clip_watch(self.events, undo)

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
        events = self.events
        if events.window.has_result():
            publish.check_unpublished(events.slots, events.published, self.guards.name)
        publish.carry_in_place_edits(events.slots)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.events.window.stepped()

    def _zero_grad(self, optimizer: torch.optim.Optimizer, set_to_none: bool = True) -> None:
        self.events.capture.check_idle()
        type(optimizer).zero_grad(optimizer, set_to_none)
        self.events.discard(self.slots_of[id(optimizer)])

    def _model_zero_grad(self, module: torch.nn.Module, set_to_none: bool = True) -> None:
        self.events.capture.check_idle()
        type(module).zero_grad(module, set_to_none)
        self.events.discard(self.events.slots)

    def steps_managed(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer steps a parameter gacc manages."""
        managed = {id(s.param) for s in self.events.slots}
        return any(id(p) in managed for g in optimizer.param_groups for p in g["params"])

    def _any_step(self, optimizer, args, kwargs) -> None:
        """Every optimizer's step, in this process: one that steps managed parameters must be attached."""
        if any(optimizer is o for o in self.optimizers):
            return
        if self.steps_managed(optimizer):
            raise RuntimeError(
                f"this {type(optimizer).__name__} steps parameters that gacc manages, but it was not given "
                "to attach(): gacc would not finish a short window before it steps, nor unscale its grads "
                "once. Give attach() every optimizer of the model: attach(model, [opt1, opt2], steps=K).")


def _zero_grad_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose zero_grad() means the whole model's: the model, and the wrappers in it (DDP's
    module) down to the first module that holds parameters of its own."""
    owners = [model]
    inner = getattr(model, "module", None)
    while isinstance(inner, torch.nn.Module) and inner not in owners:
        owners.append(inner)
        inner = getattr(inner, "module", None)
    return owners


# -- the clip: one process-wide wrapper of torch's clip functions while any accumulator is attached ---
# torch.nn.utils.clip_grad_norm_ / clip_grad_value_ (looked up by module path, as nanoGPT and timm call
# them) finish a pending window first. A clip_grad_norm_ imported before attach() (`from torch.nn.utils
# import clip_grad_norm_`) is still the original; it reaches clip_grad._clip_grads_with_norm_, which is
# wrapped to refuse a clip of managed parameters whose window is still open (it saw p.grad = None).

_WATCHING: list[Events] = []
_CLIPS = ("clip_grad_norm_", "clip_grad_value_")
_SCALE = "_clip_grads_with_norm_"  # private: what clip_grad_norm_ calls with the parameters and the norm
_ORIGINAL: dict[str, object] = {}


def _clip_watch(events: Events, undo: contextlib.ExitStack) -> None:
    if not _WATCHING:
        from torch.nn.utils import clip_grad
        for name in _CLIPS:
            _ORIGINAL[name] = getattr(clip_grad, name)
            wrapped = _finishing(name)
            setattr(clip_grad, name, wrapped)
            setattr(torch.nn.utils, name, wrapped)
        if hasattr(clip_grad, _SCALE):
            _ORIGINAL[_SCALE] = getattr(clip_grad, _SCALE)
            setattr(clip_grad, _SCALE, _refusing_open_windows(_ORIGINAL[_SCALE]))
    _WATCHING.append(events)
    undo.callback(_unwatch, events)


def _unwatch(events: Events) -> None:
    _WATCHING.remove(events)
    if not _WATCHING:
        from torch.nn.utils import clip_grad
        for name in _CLIPS:
            setattr(clip_grad, name, _ORIGINAL[name])
            setattr(torch.nn.utils, name, _ORIGINAL[name])
        if _SCALE in _ORIGINAL:
            setattr(clip_grad, _SCALE, _ORIGINAL.pop(_SCALE))


def _as_list(parameters) -> list[torch.Tensor]:
    """torch's clips take a tensor or an iterable of them (a generator too: read it once)."""
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _watchers_of(params: list[torch.Tensor]) -> list[Events]:
    ids = {id(p) for p in params}
    return [events for events in list(_WATCHING) if any(id(s.param) in ids for s in events.slots)]


def _finishing(name: str):
    original = _ORIGINAL[name]

    @functools.wraps(original)
    def clip(parameters, *args, **kwargs):
        params = _as_list(parameters)
        for events in _watchers_of(params):
            events.finish_pending()  # a clip prepares a step: the window ends here
        return original(params, *args, **kwargs)
    return clip


def _refusing_open_windows(original):
    @functools.wraps(original)
    def scale(parameters, *args, **kwargs):
        params = _as_list(parameters)
        for events in _watchers_of(params):
            w = events.window
            if w.state is State.OPEN and w.done > 0:
                raise RuntimeError(
                    f"clip_grad_norm_ ran in the middle of gacc's window ({w.done} of {w.steps} "
                    "micro-steps), so it saw p.grad = None and would clip nothing: this clip_grad_norm_ was "
                    "imported before attach() (from torch.nn.utils import clip_grad_norm_). Call "
                    "acc.finish_window() before it, or call it as torch.nn.utils.clip_grad_norm_.")
        return original(params, *args, **kwargs)
    return scale
