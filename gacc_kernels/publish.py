"""Publish: what the optimizer reads.

p.main_grad is the fp32 result, a view of the buffer. p.grad is the same view for an fp32 parameter,
and one rounding of it for a bf16/fp16 one. An in-place change of such a p.grad after publishing
(torch.nn.utils.clip_grad_norm_, a GradScaler that gacc does not own) is carried into p.main_grad at
the optimizer step, at p.grad's precision and with a warning, so that the two never disagree.
"""
from __future__ import annotations

import warnings

import torch

from .layout import Slot, local


def publish(slots: list[Slot], written: list[bool], outs: dict[int, list[torch.Tensor | None]]) -> None:
    """Give each written slot's parameter its result. outs: a whole pass's casts, by id of the buffer."""
    for slot, w in zip(slots, written):
        if not w:
            continue
        p, buffer = slot.param, slot.buffer
        dtype, begin, _ = buffer.segments[slot.segment]
        # a new view of the slot each window, never the slot's own: whoever holds it may re-point it
        # (Module._apply sets p.grad.data in model.to()), and the slot must stay on the buffer
        p.main_grad = slot.for_param(slot.main.view_as(slot.main))
        if dtype == torch.float32:
            p.grad = p.main_grad
            continue
        if slot.out is None:  # a view of its segment's cast
            slot.set_out(slot.view_of(outs[id(buffer)][slot.segment], slot.start - begin))
        else:
            slot.set_out(slot.out)
        p.grad = slot.for_param(slot.out)


def withdraw(slots: list[Slot]) -> None:
    """Take a window's result back from the parameters."""
    for slot in slots:
        slot.set_out(None)
        p = slot.param
        p.grad = None
        p.main_grad = None


def mark_current(slots: list[Slot]) -> None:
    """gacc itself changed p.grad and p.main_grad together (clipping)."""
    for slot in slots:
        if slot.out is not None:
            slot.set_out(slot.out)


def open_main_grads(slots: list[Slot], window: int) -> None:
    """Parameters whose layers add their grad into p.main_grad themselves (grad_added_to_main_grad:
    Transformer Engine's fuse_wgrad_accumulation, Megatron) see their slot as p.main_grad throughout
    the window, zeroed as it opens, since those layers can only add."""
    for slot in slots:
        if not slot.holds(window):
            slot.main.zero_()
            slot.take(window, slot.micro)
        slot.param.main_grad = slot.main.view_as(slot.main)


def check_unpublished(slots: list[Slot], published: set[Slot], name) -> None:
    """Before a step: a parameter the window gave no result (on any rank) has no grad, unless something
    outside gacc wrote it after publishing (a reducer gacc does not control, a hook): refused."""
    for s in slots:
        if s.param.grad is not None and s not in published:
            raise RuntimeError(
                f"p.grad of {name(s.param)} was set after gacc finished the window, though the window gave "
                "it no gradient: something outside gacc wrote it (a reducer gacc does not control, such as "
                "DDP's own when its sync is forced on inside backward, or a hook that assigns p.grad). "
                "The optimizer would step on it; call optimizer.zero_grad() to discard the window.")


def carry_in_place_edits(slots: list[Slot]) -> None:
    """Copy into p.main_grad the p.grad that were changed in place or replaced after publishing (for an
    fp32 parameter, p.grad is p.main_grad itself unless it was replaced)."""
    edited = []
    for s in slots:
        g = s.param.grad
        if g is None:
            continue
        g = local(g)
        if s.out is not None:
            if g.data_ptr() != s.out.data_ptr() or s.out._version != s.version:
                edited.append(s)
        elif g.data_ptr() != s.main.data_ptr() and s.buffer.segments[s.segment][0] == torch.float32:
            edited.append(s)
    if not edited:
        return
    for s in edited:
        g = local(s.param.grad)
        if s.out is not None:
            s.set_out(g)
        s.main.copy_(g)
    warnings.warn(
        f"p.grad of {len(edited)} parameters was changed or replaced after gacc finished the window "
        "(torch.nn.utils.clip_grad_norm_, say); p.main_grad now follows it, at its precision. "
        "acc.clip_grad_norm_() clips both in fp32.", stacklevel=4)
