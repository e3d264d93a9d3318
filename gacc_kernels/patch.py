"""What gacc sets on the user's objects: undone by remove(), and left out of copies.

`copy.deepcopy`, `torch.save` and pickle of a model (an EMA copy, a reference model, a checkpoint)
give a plain object: no gacc hooks, no patched methods, nothing shared with the accumulator.
"""
from __future__ import annotations

import contextlib
from typing import Any


def set_attr(obj: Any, name: str, value: Any, undo: contextlib.ExitStack) -> None:
    """obj.name = value on the instance, deleted again when `undo` closes."""
    setattr(obj, name, value)
    undo.callback(delattr, obj, name)


def plain_copies(obj: Any, undo: contextlib.ExitStack, attrs: tuple[str, ...] = (),
                 forward_hook: int | None = None) -> None:
    """Copies and pickles of obj leave out the instance attributes `attrs` and the forward hook
    with that handle id."""
    base = type(obj).__getstate__

    def getstate() -> dict[str, Any]:
        state = dict(base(obj))
        for name in ("__getstate__", *attrs):
            state.pop(name, None)
        if forward_hook is not None and forward_hook in state.get("_forward_hooks", {}):
            state["_forward_hooks"] = type(state["_forward_hooks"])(
                (k, v) for k, v in state["_forward_hooks"].items() if k != forward_hook)
        return state

    set_attr(obj, "__getstate__", getstate, undo)
