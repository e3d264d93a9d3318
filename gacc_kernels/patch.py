"""What gacc sets on the user's objects: undone by remove(), and left out of copies.

`copy.deepcopy`, `torch.save` and pickle of a model (an EMA copy, a reference model, a checkpoint)
give a plain object: no gacc hooks, no patched methods, nothing shared with the accumulator.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

_NONE = object()


def set_attr(obj: Any, name: str, value: Any, undo: contextlib.ExitStack) -> None:
    """obj.name = value in the instance's own dict (not through a class's __setattr__, which may forward
    it elsewhere: Fabric's module copies it onto the user's module); when `undo` closes, the instance's
    own earlier value is back (or none)."""
    state = vars(obj)
    before = state.get(name, _NONE)
    state[name] = value
    undo.callback(_restore, state, name, before)


def _restore(state: dict[str, Any], name: str, before: Any) -> None:
    if before is _NONE:
        state.pop(name, None)
    else:
        state[name] = before


def plain_copies(obj: Any, undo: contextlib.ExitStack, attrs: tuple[str, ...] = (),
                 forward_hook: int | None = None) -> None:
    """Copies and pickles of obj leave out the instance attributes `attrs` and the forward hook
    with that handle id (on top of what an earlier plain_copies of obj leaves out)."""
    base = vars(obj).get("__getstate__") or functools.partial(type(obj).__getstate__, obj)

    def getstate() -> dict[str, Any]:
        state = dict(base())
        for name in ("__getstate__", *attrs):
            state.pop(name, None)
        if forward_hook is not None and forward_hook in state.get("_forward_hooks", {}):
            state["_forward_hooks"] = type(state["_forward_hooks"])(
                (k, v) for k, v in state["_forward_hooks"].items() if k != forward_hook)
        return state

    set_attr(obj, "__getstate__", getstate, undo)
