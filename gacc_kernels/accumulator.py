"""GradAccumulator: the public face of an attached accumulator. Each method delegates to the stage that
owns the state (see attaching.py for how they are built):

    capture     autograd hooks: backward start, each parameter's grad, backward end
    events      capture's events turned into the window's transitions and the data flow
    layout      the flat fp32 buffer per device, its slots and buckets; a bucket launches when complete
    window      the window's state and transitions: micro-steps, weights, early end, the last pass
    distributed the reducers: nothing on one process; data parallel; FSDP2
    finalize    scale, inf check, norm, cast: in the last micro-step's launches, or one pass after
    publish     p.grad and p.main_grad, what the optimizer reads
    stepping    the optimizer's step hooks and zero_grad
    amp         the GradScaler
    guards      what is refused, and the checks at attach, backward and step
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from . import publish
from .events import Events
from .patch import set_attr
from .stats import Stats
from .stepping import Stepping
from .window import State, Window


class Parts(NamedTuple):
    """What attach() built, held by the facade."""
    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    reduction: str
    loss_scale: float
    events: Events
    stepping: Stepping
    undo: contextlib.ExitStack


class GradAccumulator:
    """Exact fp32 gradient accumulation over `steps` micro-steps, enabled on an unchanged loop.

    Between micro-steps p.grad is None; each grad goes into the parameter's slot of a flat fp32 buffer
    and is freed. After the K-th backward (or at an early optimizer.step()) p.grad holds the result: a
    view of the buffer for fp32 parameters, one rounding of it otherwise; p.main_grad is always the
    fp32 view.
    reduction="sum" (the default) gives what stock autograd gives, sum_k g_k, in fp32: the loop keeps
    its own normalisation (loss / K, or its window's token count). reduction="mean" gives the weighted
    mean sum(w_k g_k) / sum(w_k) (weights from set_weight, 1 by default) for a loop that does not
    divide its loss: the 1/K, or the token weighting, is then fused into the last pass.
    loss_scale is a factor each micro-step's loss was already multiplied by; the result is divided by
    it, in the same pass.
    window_end, a callable read as each backward starts, ends the window after that micro-step when it
    returns True (a framework's sync point), before the K-th; `steps` stays the most a window may hold.

    Data parallel: on a DistributedDataParallel model (DDP's own reducer never runs), or on a plain
    model with process_group= (its parameters and buffers are broadcast from the group's first rank
    at attach, as DDP does), the window's result is reduced over the ranks bucket by bucket while the
    last backward runs: reduction="sum" averages the ranks as DDP does; "mean" gives sum over ranks
    and micro-steps of w*g / the total weight.
    comm_dtype=torch.bfloat16 halves the bytes sent, at bf16 precision (see distributed.allreduce).

    grad_stats=True: each window also estimates the gradient noise scale B_simple (acc.stats(); see
    stats.py), from one more reduction in the accumulate kernels' pass; stats_beta is its moving
    averages' decay.

    fuse_linear=True: the weight grad GEMM of each plain nn.Linear with a bf16/fp16 weight on CUDA
    writes the weight's slot itself, in fp32, and no bf16 weight grad is made (see fused_linear).
    Parameters that have a grad_added_to_main_grad attribute at attach (the Megatron and Transformer
    Engine contract for layers that add their weight grad into p.main_grad themselves) keep
    p.main_grad, zeroed, throughout the window; their micro-steps cannot be weighted.
    """


    def __init__(self, parts: Parts):
        self._parts = parts

    @property
    def model(self) -> torch.nn.Module:
        return self._parts.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The (first) optimizer given to attach()."""
        return self._parts.optimizers[0]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._parts.optimizers)

    @property
    def steps(self) -> int:
        """K: the most micro-steps a window holds."""
        return self._parts.events.window.steps

    @property
    def reduction(self) -> str:
        return self._parts.reduction

    @property
    def loss_scale(self) -> float:
        return self._parts.loss_scale

    @property
    def window(self) -> Window:
        """The window in progress (read only: its transitions belong to gacc)."""
        return self._parts.events.window

    # -- the window ---------------------------------------------------------------------------------

    def set_weight(self, weight: float) -> None:
        """Weight of the next micro-step (its token count, say); the default is 1. Call before backward."""
        weight = float(weight)
        if not (weight >= 0.0 and weight != float("inf")):
            raise ValueError(f"a micro-step weight must be finite and >= 0, got {weight}")
        events = self._parts.events
        if weight != 1.0 and events.main_grad_slots:
            raise ValueError("micro-step weights other than 1 are not possible with parameters whose "
                             "layers add into p.main_grad themselves (grad_added_to_main_grad): those "
                             "layers cannot weigh")
        events.check_idle("set_weight() during backward; call it before the micro-step's backward")
        events.window.set_weight(weight)

    def set_steps(self, steps: int) -> None:
        """Change K, between windows (an accumulation schedule)."""
        self._parts.events.window.set_steps(steps)

    @contextlib.contextmanager
    def micro_step(self, weight: float | None = None) -> Iterator[None]:
        """One micro-step made of several backward calls:
        `with acc.micro_step(): l1.backward(); l2.backward()`."""
        events = self._parts.events
        if events.window.in_context():
            raise RuntimeError("micro_step() contexts do not nest")
        if weight is not None:
            self.set_weight(weight)
        events.window.enter_context()
        try:
            yield
        finally:
            if events.window.exit_context():
                events.end_micro_step()

    @contextlib.contextmanager
    def grads_by_hand(self) -> Iterator[None]:
        """One micro-step whose grads are written into p.grad by hand (`p.grad = dw`, as a pipeline's
        split weight backward does), not by autograd's accumulation, so no hook sees them:
        `with acc.grads_by_hand(): p.grad = dw`. gacc takes them into the buffer at the end of the block
        (a finished window is refused at its start, before anything is written); the tensors become
        gacc's, as autograd's grads do. A block that raises after writing a grad breaks the window."""
        with self._parts.events.capture.by_hand():
            yield

    def finish_window(self) -> None:
        """End the window now with the micro-steps done so far (an early optimizer step, the end of an
        epoch): p.grad then holds their weighted mean. optimizer.step() does this by itself."""
        self._parts.events.finish_pending()

    # -- norm and clipping --------------------------------------------------------------------------

    def total_norm(self) -> torch.Tensor:
        """L2 norm of the finished window's gradients (fp32, from the fused pass; no extra read)."""
        events = self._parts.events
        events.finish_pending()
        if not events.window.has_result():
            raise RuntimeError("no finished window: run at least one micro-step's backward")
        return events.reducer.global_sq_norm(events.finalizer.local_sq_norm()).sqrt()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        total_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Like torch.nn.utils.clip_grad_norm_ over the model's gradients, using the fused pass's norm;
        clips p.grad and p.main_grad alike. total_norm: a norm taken over more than this accumulator's
        parameters (the stages of a pipeline), to clip by instead."""
        if float(norm_type) != 2.0:
            raise ValueError("gacc clip_grad_norm_ supports norm_type=2 only; "
                             "use torch.nn.utils.clip_grad_norm_")
        own = self.total_norm()  # finishes a pending window
        total = own if total_norm is None else total_norm
        coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0).reshape(1)
        self._parts.events.finalizer.clip_(coef)
        publish.mark_current(self._parts.events.slots)
        return total

    def clip_for(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """A framework's clip_grad_norm_(parameters, ...) done by gacc, in fp32 on p.grad and p.main_grad
        alike, when `parameters` are the ones gacc manages (frozen ones aside) and the norm is L2; None
        otherwise (then the framework clips itself). max_norm=inf only measures the norm."""
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        managed = {id(s.param) for s in self._parts.events.slots}
        if float(norm_type) != 2.0 or {id(p) for p in params if p.requires_grad} != managed:
            return None
        return self.total_norm() if float(max_norm) == float("inf") else self.clip_grad_norm_(max_norm)

    def stats(self) -> Stats:
        """The gradient noise scale of the last finished window, and its moving averages (attach with
        grad_stats=True). Reading it syncs with the device; the estimates themselves take none."""
        stats = self._parts.events.stats
        if stats is None:
            raise RuntimeError("acc.stats() needs the statistics on: attach(..., grad_stats=True)")
        return stats.read()

    def set_while_attached(self, obj: Any, name: str, value: Any) -> None:
        """obj.name = value until remove() (for the framework integrations)."""
        set_attr(obj, name, value, self._parts.undo)

    # -- checkpointing and removal ------------------------------------------------------------------

    def _layout(self) -> list[tuple[int, str, str]]:
        return [(s.numel, str(s.param.dtype), str(s.buffer.device)) for s in self._parts.events.slots]

    def state_dict(self) -> dict[str, Any]:
        """The window in progress, to resume bit for bit. Take it between micro-steps."""
        events = self._parts.events
        w = events.window
        events.check_idle("state_dict() inside a micro-step; take it between micro-steps")
        if w.in_context():
            raise RuntimeError("state_dict() inside a micro-step; take it between micro-steps")
        if w.state is State.BROKEN:
            raise RuntimeError(w.broken_message())
        if w.state is State.FINISHED:
            raise RuntimeError("state_dict() with a finished window that the optimizer has not stepped on; "
                               "call optimizer.step() first")
        fresh = w.state is State.STEPPED
        state = {**w.state_dict(), "layout": self._layout(),
                 "written": [not fresh and s.holds(w.id) for s in events.slots],
                 "buffers": [b.buf.clone() for b in events.buffers],
                 "reducer": {} if fresh else events.reducer.state_dict()}
        if events.stats is not None:
            state["grad_stats"] = events.stats.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layout"] != self._layout() or state["steps"] != self.steps:
            raise ValueError("this state_dict was saved from a model with other parameters or another steps=")
        events = self._parts.events
        events.new_window()
        for buffer, buf in zip(events.buffers, state["buffers"]):
            buffer.buf.copy_(buf)
        events.reducer.load_state_dict(state.get("reducer", {}))
        events.window.load_state_dict(state)
        for slot, wrote in zip(events.slots, state["written"]):
            slot.load(events.window.id if wrote else None)
        if events.stats is not None:
            events.stats.load_state_dict(state.get("grad_stats"), state["micro_steps"])
        publish.open_main_grads(events.main_grad_slots, events.window.id)

    def remove(self) -> None:
        """Remove every hook and attribute. A window in progress is finalized into p.grad first (a broken
        one is dropped)."""
        events = self._parts.events
        events.capture.check_idle()
        if events.window.state is not State.BROKEN:
            events.finish_pending()
        self._parts.undo.close()
        for s in events.slots:
            if "main_grad" in s.param.__dict__:
                del s.param.main_grad
