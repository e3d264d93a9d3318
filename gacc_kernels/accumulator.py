"""attach(): exact fp32 gradient accumulation for an ordinary PyTorch training loop.

The data flow, one stage per method:
    backward produces p.grad
    -> _on_grad (post-accumulate-grad hook) hands it to its bucket (device, dtype), p.grad = None
    -> _Bucket.flush: one fused launch adds the bucket into its slices of the flat fp32 buffer and
       frees the low-precision grads (also at the end of every backward, in _end_backward)
    -> the finalize pass (scale, inf check, norm, cast): in the K-th micro-step's launches themselves,
       which cast the result back over the incoming grads (_start_last_pass), or after it as one pass
       per buffer (_finalize)
    -> _publish: what the optimizer reads, p.grad and p.main_grad (views of the buffer, or one cast)
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_leaves

from . import ops
from .reference import CHUNK

# Every slot starts on a CHUNK boundary: the kernels use aligned vector loads, and the finalize
# pass keeps one norm partial per CHUNK elements, so a slot's partials are its own.
ALIGN = CHUNK


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, scaler=None,
           reduction: str = "mean", bucket_bytes: int = 128 << 20) -> GradAccumulator:
    """Accumulate `steps` micro-steps of gradients in fp32 before each optimizer step. See GradAccumulator."""
    return GradAccumulator(model, optimizer, steps, scaler=scaler, reduction=reduction,
                           bucket_bytes=bucket_bytes)


class _Slot:
    """One parameter's place in its device's flat buffer."""
    __slots__ = ("param", "space", "segment", "bucket", "start", "numel", "strides", "main", "out",
                 "written", "pending", "finished", "seen")

    def __init__(self, param: torch.nn.Parameter, space: _DeviceBuffer, segment: int, start: int):
        self.param, self.space, self.segment, self.start, self.numel = \
            param, space, segment, start, param.numel()
        self.strides = _contiguous_strides(param.shape)
        self.bucket: _Bucket  # where its grads wait for a launch
        self.main: torch.Tensor  # its fp32 view of the buffer, p.main_grad once published
        self.out: torch.Tensor | None = None  # p.grad of a non-fp32 parameter once finalized
        self.written = False  # holds a gradient in this window (else the next one is stored, not added)
        self.pending: _Bucket | None = None  # the bucket holding its grad, not yet launched
        self.finished = False  # the last micro-step's fused pass scaled, cast and normed it
        self.seen = -1  # the last micro-step (count since attach) that gave it a grad

    def view_of(self, flat: torch.Tensor, start: int) -> torch.Tensor:
        return flat.as_strided(self.param.shape, self.strides, start)

    def flat(self, t: torch.Tensor, base: int = 0) -> torch.Tensor:
        """Its range of a flat tensor that starts at buffer index `base`."""
        return t[self.start - base: self.start - base + self.numel]

    def partials(self) -> torch.Tensor:
        first = self.start // CHUNK
        return self.space.partials[first: first + -(-self.numel // CHUNK)]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class _Bucket:
    """Grads of one segment (device and dtype) waiting for one multi-tensor launch."""

    def __init__(self, space: _DeviceBuffer, segment: int, max_bytes: int):
        self.space, self.segment, self.max_bytes = space, segment, max_bytes
        self.launch = ops.choose("accumulate_many_", space.device.type).impl
        self.launch_last = ops.choose("accumulate_finalize_", space.device.type).impl
        self.grads: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.store: list[bool] = []
        self.slots: list[_Slot] = []
        self.bytes = 0

    def add(self, slot: _Slot, grad: torch.Tensor, weight: float) -> None:
        if self.grads and grad.dtype != self.grads[0].dtype:  # one launch takes one grad dtype
            self.flush(weight)
        self.grads.append(grad)
        self.offsets.append(slot.start)
        self.store.append(not slot.written)
        self.slots.append(slot)
        slot.written, slot.pending = True, self
        self.bytes += grad.numel() * grad.element_size()
        if self.bytes >= self.max_bytes:
            self.flush(weight)

    def flush(self, weight: float) -> None:
        if not self.grads:
            return
        space = self.space
        dtype = space.segments[self.segment][0]
        last = space.last_scale is not None and self.grads[0].dtype == dtype
        if last:  # the last micro-step: accumulate and finalize in one pass; a bf16/fp16 grad
            # receives its parameter's result and becomes p.grad, so no new memory is taken
            write = dtype != torch.float32
            self.launch_last(space.buf, self.grads, self.offsets, self.store, weight, space.last_scale,
                             space.found_inf, space.partials, write)
        else:
            self.launch(space.buf, self.grads, self.offsets, self.store, weight)
        for slot, grad in zip(self.slots, self.grads):
            slot.pending = None
            slot.finished = last
            if last and write:
                slot.out = grad
        self.grads, self.offsets, self.store, self.slots, self.bytes = [], [], [], [], 0


class _DeviceBuffer:
    """The flat fp32 buffer of one device. Parameters are grouped by dtype, so that each dtype is one
    contiguous segment that finalize can cast in the same pass."""

    def __init__(self, device: torch.device, params: list[torch.nn.Parameter], bucket_bytes: int):
        self.device = device
        self.slots: list[_Slot] = []
        self.segments: list[tuple[torch.dtype, int, int]] = []
        end = 0
        for dtype in sorted({p.dtype for p in params}, key=str):
            begin = end
            for p in (p for p in params if p.dtype == dtype):
                self.slots.append(_Slot(p, self, len(self.segments), end))
                end += -(-p.numel() // ALIGN) * ALIGN
            self.segments.append((dtype, begin, end))
        self.buf = torch.zeros(end, dtype=torch.float32, device=device)  # padding stays 0 forever
        for slot in self.slots:
            slot.main = slot.view_of(self.buf, slot.start)
        self.buckets = [_Bucket(self, i, bucket_bytes) for i in range(len(self.segments))]
        for slot in self.slots:
            slot.bucket = self.buckets[slot.segment]
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.partials = torch.zeros(end // CHUNK, device=device)  # squared norm, one per CHUNK
        # the cast of each non-fp32 segment by a separate finalize pass (p.grad are views of it)
        self.outs: list[torch.Tensor | None] = [None] * len(self.segments)
        self.last_scale: torch.Tensor | None = None  # set while the last micro-step finalizes as it goes


class GradAccumulator:
    """Exact fp32 gradient accumulation over `steps` micro-steps, enabled on an unchanged loop.

    Between micro-steps p.grad is None; each grad goes into the parameter's slot of a flat fp32 buffer
    and is freed. After the K-th backward (or at an early optimizer.step()) p.grad holds the weighted
    mean, sum(w_k g_k) / sum(w_k): a view of the buffer for fp32 parameters, one rounding of it
    otherwise; p.main_grad is always the fp32 view. The loss must not be divided by K.
    reduction="sum" skips the division by sum(w_k), for loops that scale the loss themselves.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, *,
                 scaler=None, reduction: str = "mean", bucket_bytes: int = 128 << 20):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 (the micro-steps per optimizer step), got {steps!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if getattr(model, "_gacc_accumulator", None) is not None:
            raise RuntimeError("attach() was already called on this model; call acc.remove() first")
        for m in model.modules():
            if getattr(m, "sparse", False) is True:
                raise ValueError(f"{type(m).__name__} produces sparse gradients, which gacc cannot accumulate; "
                                 "construct it with sparse=False")
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                warnings.warn("the model has BatchNorm layers: their statistics are computed per micro-batch, "
                              "not per optimizer step (use GroupNorm/LayerNorm or larger micro-batches)",
                              stacklevel=3)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameters that require grad")
        managed = {id(p) for p in params}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in managed:
                    raise ValueError("the optimizer holds a parameter that is not a trainable parameter "
                                     "of the model; attach() manages the model's parameters only")

        self.model, self.optimizer, self.steps, self.scaler, self.reduction = \
            model, optimizer, steps, scaler, reduction
        self._ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self._n_params = len(params)
        self._n_opt_params = sum(len(g["params"]) for g in optimizer.param_groups)
        devices = list(dict.fromkeys(p.device for p in params))
        if self._ddp and len(devices) != 1:
            raise ValueError("gacc with DistributedDataParallel needs one device per process")
        self._spaces = [_DeviceBuffer(d, [p for p in params if p.device == d], bucket_bytes)
                        for d in devices]
        self._slots = [s for space in self._spaces for s in space.slots]
        self._lock = threading.Lock()
        self._micro_steps = 0      # finished micro-steps in this window
        self._weight_sum = 0.0     # their total weight
        self._weight = 1.0         # the weight of the micro-step in progress
        self._in_backward = False  # a backward is running and its end callback is queued
        self._in_context = -1      # backwards finished inside micro_step() (-1: not in one)
        self._published = False    # p.grad holds this window's result
        self._stepped = False      # the optimizer stepped on it
        self._micro_count = 0      # micro-steps since attach
        self._double_grads = False  # a parameter got two grads in one micro-step (checkpointing)

        self._handles = [s.param.register_post_accumulate_grad_hook(self._hook_for(s)) for s in self._slots]
        self._handles.append(model.register_forward_hook(self._on_forward))
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        optimizer.zero_grad = self._zero_grad  # instance attribute; remove() deletes it
        if scaler is not None:
            scaler.unscale_ = self._unscale
        if self._ddp:
            model.require_backward_grad_sync = False  # we all-reduce the flat buffer once per window
        model._gacc_accumulator = self

    # -- stage 1: backward hands each grad to a bucket -------------------------------------------

    def _hook_for(self, slot: _Slot):
        def hook(p: torch.Tensor) -> None:
            self._on_grad(slot, p)
        return hook

    def _on_grad(self, slot: _Slot, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        if not self._in_backward:
            with self._lock:  # a backward that did not pass through the model's output
                if not self._in_backward:
                    self._begin_backward(before_accumulation=False)
        if g.layout != torch.strided:
            raise RuntimeError(f"gacc got a sparse gradient ({g.layout}) for a parameter of shape "
                               f"{tuple(p.shape)}; sparse gradients are not supported")
        p.grad = None
        if slot.seen == self._micro_count:  # a second grad in this micro-step (reentrant checkpointing)
            self._double_grads = True
            if slot.pending is not None:  # launch the first before the second
                slot.pending.flush(self._weight)
            if slot.finished:
                return self._add_to_finished(slot, g)
        slot.seen = self._micro_count
        slot.bucket.add(slot, g if g.is_contiguous() else g.contiguous(), self._weight)

    def _on_forward(self, module, args, output) -> None:
        if torch.is_grad_enabled():
            tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                register_multi_grad_hook(tensors, self._on_backward_start, mode="any")

    def _on_backward_start(self, grad) -> None:
        # Fires on the model's output, before any parameter's grad is accumulated.
        with self._lock:
            if not self._in_backward:
                self._begin_backward()

    def _begin_backward(self, before_accumulation: bool = True) -> None:
        if self._published:
            if not self._stepped and any(s.param.grad is not None for s in self._slots):
                raise RuntimeError(
                    f"backward after the last of steps={self.steps} micro-steps: call optimizer.step() or "
                    "optimizer.zero_grad() after the last micro-step. " + (
                        "Nothing was added; p.grad still holds the finished window." if before_accumulation else
                        "This backward did not pass through the model's forward, so autograd has already "
                        "added into p.grad of the first parameter it reached."))
            self._reset_window()
        if self._micro_steps == self.steps - 1 and self._in_context < 0 and not self._ddp \
                and self._micro_count > 0 and not self._double_grads:
            self._start_last_pass()
        self._in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        for space in self._spaces:
            for bucket in space.buckets:
                bucket.flush(self._weight)
        self._in_backward = False
        if self._in_context >= 0:
            self._in_context += 1
        else:
            self._end_micro_step()

    def _end_micro_step(self) -> None:
        self._micro_count += 1
        self._micro_steps += 1
        self._weight_sum += self._weight
        self._weight = 1.0
        if self._micro_steps == self.steps:
            self._finalize()

    # -- micro-step control -----------------------------------------------------------------------

    def set_weight(self, weight: float) -> None:
        """Weight of the next micro-step (its token count, say); the default is 1. Call before backward."""
        weight = float(weight)
        if not (weight >= 0.0 and weight != float("inf")):
            raise ValueError(f"a micro-step weight must be finite and >= 0, got {weight}")
        if self._in_backward:
            raise RuntimeError("set_weight() during backward; call it before the micro-step's backward")
        self._weight = weight

    @contextlib.contextmanager
    def micro_step(self, weight: float | None = None) -> Iterator[None]:
        """One micro-step made of several backward calls: `with acc.micro_step(): l1.backward(); l2.backward()`."""
        if self._in_context >= 0:
            raise RuntimeError("micro_step() contexts do not nest")
        if weight is not None:
            self.set_weight(weight)
        self._in_context = 0
        try:
            yield
        finally:
            backwards, self._in_context = self._in_context, -1
            if backwards:
                self._end_micro_step()

    # -- stage 2: the finalize pass, then publish --------------------------------------------------

    def _start_last_pass(self) -> None:
        """The K-th micro-step's launches also finalize: the scale is known before its backward.
        Not with DDP (the all-reduce comes first), micro_step() contexts or double grads."""
        weight_sum = self._weight_sum + self._weight
        if self.reduction == "mean" and weight_sum == 0.0:
            return  # _finalize raises
        for space in self._spaces:
            space.last_scale = self._scale(weight_sum, space.device)
            space.found_inf.zero_()

    def _add_to_finished(self, slot: _Slot, g: torch.Tensor) -> None:
        """A grad for a slot that the fused pass already finalized: add it scaled, redo cast and norm.
        Correct to fp32 rounding; fusion then stays off (double grads repeat every micro-step)."""
        slot.main.add_(g.float().mul_(self._weight).mul_(slot.space.last_scale))
        self._finalize_slot(slot, torch.ones(1, device=slot.space.device))

    def _finalize_slot(self, slot: _Slot, scale: torch.Tensor) -> None:
        space = slot.space
        dtype = space.segments[slot.segment][0]
        if dtype != torch.float32 and slot.out is None:
            slot.out = torch.empty(slot.param.shape, dtype=dtype, device=space.device)
        ops.finalize_(slot.flat(space.buf), scale, space.found_inf, slot.partials(),
                      None if slot.out is None else slot.out.view(-1))

    def _finalize(self) -> None:
        fused = self._spaces[0].last_scale is not None  # the last micro-step finalized as it went
        for slot in self._slots:
            if not slot.written:  # stale values from an earlier window: not part of this one
                slot.main.zero_()
                slot.partials().zero_()
            elif fused and not slot.finished:  # no grad in the last micro-step
                self._finalize_slot(slot, slot.space.last_scale)
        if fused:
            written = [s.written for s in self._slots]
        else:
            written = self._finalize_pass()
        self._publish(written)

    def _finalize_pass(self) -> list[bool]:
        """One finalize_ launch per segment; returns which slots hold gradients."""
        if self._ddp:
            written, weight_sum = self._all_reduce()
        else:
            written, weight_sum = [s.written for s in self._slots], self._weight_sum
        if self.reduction == "mean" and float(weight_sum) == 0.0:
            raise ValueError("every micro-step in this window had weight 0; cannot take the weighted mean")
        for space in self._spaces:
            scale = self._scale(weight_sum, space.device)
            space.found_inf.zero_()
            space.outs = [None if dtype == torch.float32 else torch.empty(e - b, dtype=dtype, device=space.device)
                          for dtype, b, e in space.segments]
            for (dtype, b, e), out in zip(space.segments, space.outs):
                ops.finalize_(space.buf[b:e], scale, space.found_inf, space.partials[b // CHUNK: e // CHUNK], out)
        return written

    def _scale(self, weight_sum: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        """1 / sum(w) (reduction="mean"), times 1 / loss scale with an enabled GradScaler: on the device."""
        if self.reduction == "sum":
            scale = torch.ones(1, device=device)
        elif isinstance(weight_sum, torch.Tensor):
            scale = weight_sum.reciprocal().float().to(device)
        else:
            scale = torch.full((1,), 1.0 / weight_sum, dtype=torch.float32, device=device)
        if self.scaler is not None and self.scaler.is_enabled():
            if self.scaler._scale is None:
                raise RuntimeError("the GradScaler has no scale yet: use scaler.scale(loss).backward()")
            scale = scale * self.scaler._scale.double().reciprocal().float().to(device)
        return scale

    def _all_reduce(self) -> tuple[list[bool], torch.Tensor]:
        """DDP: sum the buffer and the weights over all ranks; a slot counts as written if any rank wrote it."""
        space, group = self._spaces[0], self.model.process_group
        flags = torch.tensor([s.written for s in self._slots], dtype=torch.uint8, device=space.device)
        weight_sum = torch.tensor([self._weight_sum], dtype=torch.float64, device=space.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(weight_sum, group=group)
        dist.all_reduce(space.buf, group=group)
        return [bool(f) for f in flags.tolist()], weight_sum

    def _publish(self, written: list[bool]) -> None:
        for slot, w in zip(self._slots, written):
            if w:
                p, space = slot.param, slot.space
                dtype, begin, _ = space.segments[slot.segment]
                if dtype != torch.float32 and slot.out is None:  # a view of its segment's cast
                    slot.out = slot.view_of(space.outs[slot.segment], slot.start - begin)
                p.main_grad = slot.main
                p.grad = slot.main if dtype == torch.float32 else slot.out
        for space in self._spaces:
            space.last_scale = None
        self._published, self._stepped = True, False

    def _finalize_if_pending(self) -> None:
        if self._in_backward:
            raise RuntimeError("the optimizer cannot step during backward")
        if not self._published and self._micro_steps > 0:
            self._finalize()

    def _reset_window(self) -> None:
        for s in self._slots:
            s.written = s.finished = False
            s.out = None
            if self._published:
                s.param.grad = None
                s.param.main_grad = None
        for space in self._spaces:
            space.outs = [None] * len(space.segments)
            space.last_scale = None
        self._micro_steps, self._weight_sum, self._published, self._stepped = 0, 0.0, False, False

    # -- what the optimizer and the scaler see ------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        if sum(len(g["params"]) for g in optimizer.param_groups) != self._n_opt_params or \
                sum(1 for p in self.model.parameters() if p.requires_grad) != self._n_params:
            raise RuntimeError("parameters were added after attach(); call acc.remove() and attach() again")
        self._finalize_if_pending()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True

    def _zero_grad(self, set_to_none: bool = True) -> None:
        type(self.optimizer).zero_grad(self.optimizer, set_to_none)
        self._reset_window()

    def _unscale(self, optimizer) -> None:
        """GradScaler.unscale_: the fused pass already unscaled; hand the scaler its found_inf."""
        from torch.amp.grad_scaler import OptState
        if optimizer is not self.optimizer:
            return type(self.scaler).unscale_(self.scaler, optimizer)
        if not self.scaler.is_enabled():
            return
        self._finalize_if_pending()
        if not self._published:
            raise RuntimeError("unscale_() with no gradients: run at least one micro-step's backward first")
        state = self.scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        state["found_inf_per_device"] = {s.device: s.found_inf for s in self._spaces}
        state["stage"] = OptState.UNSCALED

    def total_norm(self) -> torch.Tensor:
        """L2 norm of the finished window's gradients (fp32, from the fused pass; no extra read)."""
        self._finalize_if_pending()
        if not self._published:
            raise RuntimeError("no gradients yet: run at least one micro-step's backward")
        first = self._spaces[0].device
        return torch.stack([s.partials.sum().to(first) for s in self._spaces]).sum().sqrt()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Like torch.nn.utils.clip_grad_norm_ over the model's gradients, using the fused pass's norm."""
        if float(norm_type) != 2.0:
            raise ValueError("gacc clip_grad_norm_ supports norm_type=2 only; use torch.nn.utils.clip_grad_norm_")
        total = self.total_norm()
        coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0).reshape(1)
        for space in self._spaces:
            c = coef.to(space.device)
            for i, ((dtype, b, e), out) in enumerate(zip(space.segments, space.outs)):
                if dtype == torch.float32 or out is not None:  # fp32, or one cast of the whole segment
                    ops.scale_(space.buf[b:e], c, out)
                else:  # p.grad are the last micro-step's grads, one tensor each
                    for slot in space.slots:
                        if slot.segment == i and slot.out is not None:
                            ops.scale_(slot.flat(space.buf), c, slot.out.view(-1))
            space.partials.mul_(c.square())  # total_norm() stays the norm of what p.grad holds
        return total

    # -- checkpointing and removal ------------------------------------------------------------------

    def _layout(self) -> list[tuple[int, str, str]]:
        return [(s.numel, str(s.param.dtype), str(s.space.device)) for s in self._slots]

    def state_dict(self) -> dict[str, Any]:
        """The window in progress, to resume bit for bit. Take it between micro-steps."""
        if self._in_backward or self._in_context >= 0:
            raise RuntimeError("state_dict() inside a micro-step; take it between micro-steps")
        if self._published and not self._stepped:
            raise RuntimeError("state_dict() with a finished window that the optimizer has not stepped on; "
                               "call optimizer.step() first")
        fresh = self._published  # stepped: the next backward starts a new window
        return {"steps": self.steps, "layout": self._layout(),
                "micro_steps": 0 if fresh else self._micro_steps,
                "weight_sum": 0.0 if fresh else self._weight_sum, "weight": self._weight,
                "written": [False if fresh else s.written for s in self._slots],
                "buffers": [s.buf.clone() for s in self._spaces]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layout"] != self._layout() or state["steps"] != self.steps:
            raise ValueError("this state_dict was saved from a model with other parameters or another steps=")
        self._reset_window()
        for space, buf in zip(self._spaces, state["buffers"]):
            space.buf.copy_(buf)
        for slot, w in zip(self._slots, state["written"]):
            slot.written = w
        self._micro_steps, self._weight_sum, self._weight = \
            state["micro_steps"], state["weight_sum"], state["weight"]

    def remove(self) -> None:
        """Remove every hook and attribute. A window in progress is finalized into p.grad first."""
        self._finalize_if_pending()
        for h in self._handles:
            h.remove()
        for s in self._slots:
            if hasattr(s.param, "main_grad"):
                del s.param.main_grad
        del self.optimizer.zero_grad
        if self.scaler is not None:
            del self.scaler.unscale_
        if self._ddp:
            self.model.require_backward_grad_sync = True
        del self.model._gacc_accumulator
