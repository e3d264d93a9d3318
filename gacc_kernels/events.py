"""Events: what capture reports of each backward, turned into the window's transitions and the data flow.

    backward start   open a window where the last one was stepped; decide whether this micro-step
                     closes the window and whether its launches also finalize
    a grad           into its slot's bucket (launched when the bucket is complete), or straight into
                     the slot (fused_linear, and layers that add into p.main_grad)
    backward end     launch what the buckets still hold; count the micro-step; at the window's end:
                     reduce, finalize, publish

One rule for a parameter's second grad in one micro-step (tied weights, reentrant checkpointing,
micro_step() with several backwards): its bucket launches what it queued first; a grad that can no longer
go into the bucket (the slot is finalized, or its bucket is on the wire) is added apart.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import publish
from .distributed.reducer import Reducer
from .finalize import Finalizer
from .guards import Guards, refuse_grad
from .layout import Bucket, DeviceBuffer, Slot
from .stats import GradStats
from .window import State, Window


class Events:
    """The sink of capture.Capture, and the one driver of the window."""

    def __init__(self, window: Window, buffers: list[DeviceBuffer], reducer: Reducer, finalizer: Finalizer,
                 guards: Guards, window_end: Callable[[], bool] | None, main_grad_slots: set[Slot],
                 stats: GradStats | None = None):
        self.window, self.buffers, self.reducer, self.finalizer = window, buffers, reducer, finalizer
        self.guards, self.window_end, self.main_grad_slots = guards, window_end, main_grad_slots
        self.stats = stats  # the gradient noise scale, with attach(grad_stats=True)
        self.slots: list[Slot] = [s for b in buffers for s in b.slots]
        self.sharded = any(s.sharded for s in self.slots)
        self.capture = None
        self.fuses_last_pass = True  # off once a parameter got two grads in one micro-step
        self.window_signals: list[Callable[[], bool]] = [] if window_end is None else [window_end]
        self.published: set[Slot] = set()  # the slots whose parameters got a result from the window

    def listen(self, capture) -> None:
        """The capture whose events these are (its fused_linear routes and its backward in progress)."""
        self.capture = capture

    def add_window_signal(self, signal: Callable[[], bool]) -> None:
        """A signal read as each backward starts: True ends the window after that micro-step."""
        self.window_signals.append(signal)

    # -- capture's events ---------------------------------------------------------------------------

    def backward_starting(self, will_accumulate, accumulated: bool) -> None:
        self.guards.check_before_backward(self.sharded)
        w = self.window
        self.reducer.before_backward(first=w.state is not State.OPEN or w.done == 0)
        if w.state is State.BROKEN:
            raise RuntimeError(w.broken_message())
        if w.state is State.FINISHED:
            if any(s.param.grad is not None for s in self.slots):
                if not will_accumulate():
                    return  # torch.autograd.grad: the finished window stays as it is
                raise RuntimeError(
                    f"backward after the last of steps={w.steps} micro-steps: call optimizer.step() or "
                    "optimizer.zero_grad() after the last micro-step. " + (
                        "This backward did not pass through the model's forward, so autograd has already "
                        "added into p.grad of the first parameter it reached." if accumulated else
                        "Nothing was added; p.grad still holds the finished window."))
            self.new_window()  # the grads were cleared by hand
        elif w.state is State.STEPPED:
            self.new_window()
        signals = [bool(signal()) for signal in self.window_signals]  # each is read: some record state
        signalled = any(signals)
        # Armed fused layers write with no call back, so no bucket can tell when it is complete: the last
        # pass is then one finalize per segment after backward, not in the launches.
        w.begin_backward(signalled, self.reducer.fuses_last_pass and w.micro > 0 and self.fuses_last_pass
                         and not self.capture.routes)
        self.finalizer.arm(self.finalizer.scales(w.weight_sum + w.weight) if w.plans_finalizing() else None)

    def armed_writes(self, slots: list[Slot]) -> tuple[float, list[float]] | None:
        """Where this backward's fused weight grads go, for fused_linear to write them with no call back:
        the micro-step's weight, and each slot's beta (0 for the window's first grad, which stores). None
        where each must come through write_fused: micro_step() contexts (several backwards make one
        micro-step), and the window's last micro-step under a reducer that sends buckets as they complete."""
        w = self.window
        if w.state is not State.OPEN or w.in_context() or (w.closing and not self.reducer.fuses_last_pass):
            return None
        return w.weight, [1.0 if s.holds(w.id) else 0.0 for s in slots]

    def armed_written(self, slots: list[Slot]) -> None:
        """Grads that fused_linear wrote into these slots as armed: write_fused's bookkeeping, after the
        fact. Their buckets launch what else they hold at the backward's end."""
        w = self.window
        for slot in slots:
            slot.take(w.id, w.micro)
            self._bypassed(slot)

    def grad_ready(self, slot: Slot, g: torch.Tensor, stream) -> None:
        if g.layout != torch.strided or g.numel() != slot.numel or g.is_cuda != slot.buffer.is_cuda:
            refuse_grad(slot, g)
        if g.dtype is not slot.bucket.dtype:
            self._refuse_dtype(slot, g)
        if slot.sharded and self.reducer.takes_unsharded():
            why = (f"FSDP2 reduced a grad of {self.guards.name(slot.param)} in a window where gacc takes the "
                   "unsharded grads (gradient sync off): a grad reached FSDP past gacc's hook (an unsharded "
                   "parameter FSDP made anew, or reduce_scatter_unused_params), so this window cannot be "
                   "exact. Call optimizer.zero_grad() to discard it.")
            self.window.break_(why)
            raise RuntimeError(why)
        w = self.window
        if slot.is_repeat(w.micro) and self._second_grad(slot):
            self._add_apart(slot, g)
            return
        store = slot.take(w.id, w.micro)
        if slot.bucket.add(slot, g, store, w.weight, stream, self.finalizer.armed(slot.buffer)):
            self._launched(slot.bucket)

    def unsharded_grad(self, slot: Slot, g: torch.Tensor) -> bool:
        """An FSDP2 parameter's whole grad (this rank's tp part under FSDP2 x TP), before FSDP reduces it:
        True if the reducer takes it (gradient
        sync off: gacc sums the window and reduce-scatters it once), False if FSDP goes on (sync on: it
        hands over this rank's shard after its reduce-scatter, through grad_ready)."""
        if not self.reducer.takes_unsharded():
            return False
        if g.layout != torch.strided or g.dim() != slot.param.dim() or g.is_cuda != slot.buffer.is_cuda:
            refuse_grad(slot, g)
        w = self.window
        self.reducer.accumulate_unsharded(slot, g, slot.take(w.id, w.micro), w.weight)
        return True

    def write_fused(self, slot: Slot, write) -> None:
        """A grad that goes straight into the slot, not through p.grad, with grad_ready's bookkeeping.
        write(out, beta, alpha) makes out = beta * out + alpha * grad in fp32 (fused_linear); write is None
        where the parameter's layer has already added the grad into p.main_grad (publish.open_main_grads)."""
        w = self.window
        if write is None and slot not in self.main_grad_slots:
            raise RuntimeError("a layer added its grad into p.main_grad (grad_added_to_main_grad) of a "
                               "parameter that had no grad_added_to_main_grad attribute at attach(); set it "
                               "(False) first")
        self._bypassed(slot)
        if slot.is_repeat(w.micro) and self._second_grad(slot):
            if write is None:
                raise RuntimeError("a layer added its grad into p.main_grad after gacc had finalized or sent "
                                   "it (the parameter also got a grad through autograd in this micro-step)")
            g = torch.empty_like(slot.main)
            write(g, 0.0, 1.0)
            self._add_apart(slot, g)
            return
        store = slot.take(w.id, w.micro)
        if write is not None:
            write(slot.main, 0.0 if store else 1.0, w.weight)
        if slot.bucket.arrive(slot, w.weight, self.finalizer.armed(slot.buffer)):
            self._launched(slot.bucket)

    def backward_done(self, delivered: bool) -> None:
        for bucket in self._buckets():  # incomplete buckets: the reducer takes them at finish, after
            self._flush(bucket)           # finalize has zeroed their slots' values from older windows
        if delivered and self.window.count_backward():  # else torch.autograd.grad, or no parameter reached
            self.end_micro_step()

    def backward_aborted(self, delivered: bool) -> None:
        for bucket in self._buckets():
            bucket.drop()
        self.finalizer.arm(None)
        self.reducer.abort()
        if delivered:  # some of its grads may be in the buffer: this window cannot be exact
            self.window.break_()

    def _refuse_dtype(self, slot: Slot, g: torch.Tensor) -> None:
        why = (f"parameter {self.guards.name(slot.param)} got a {g.dtype} grad, but it was "
               f"{slot.bucket.dtype} at attach() (model.to(dtype), .half() or p.grad_dtype after attach): "
               "gacc's buffer is laid out for the old dtype, so this window cannot be finished. Call "
               "optimizer.zero_grad() to discard it, then acc.remove(), change the dtype, and attach() "
               "again.")
        self.window.break_(why)
        raise RuntimeError(why)

    # -- the second grad of a micro-step ------------------------------------------------------------

    def _second_grad(self, slot: Slot) -> bool:
        """A second grad of the slot in this micro-step: launch the first; True if this one must be added
        apart (the slot is finalized, or its bucket is on the wire)."""
        self.fuses_last_pass = False  # double grads repeat every micro-step
        slot.bucket.mark_repeats()
        self._bypassed(slot)
        if self.reducer.is_sending(slot.bucket):
            return True
        self._flush(slot.bucket)
        return slot.finalized(self.window.micro)

    def _bypassed(self, slot: Slot) -> None:
        """The slot's micro-grads are not each one pass of the kernels: no statistics for it."""
        if self.stats is not None:
            self.stats.uncover(slot)

    def _add_apart(self, slot: Slot, g: torch.Tensor) -> None:
        if not self.reducer.take_late(slot, g, self.window.weight):
            self.finalizer.add_to_finished(slot, g, self.window.weight)

    # -- buckets ------------------------------------------------------------------------------------

    def _buckets(self):
        return (bucket for buffer in self.buffers for bucket in buffer.buckets)

    def _flush(self, bucket: Bucket) -> None:
        bucket.flush(self.window.weight, self.finalizer.armed(bucket.buffer))

    def _launched(self, bucket: Bucket) -> None:
        """A complete bucket was launched: in the window's last micro-step, the reducer may send it."""
        w = self.window
        if w.is_last():
            self.reducer.on_bucket_ready(bucket, w.weight_sum + w.weight)

    # -- the window's end ---------------------------------------------------------------------------

    def end_micro_step(self) -> None:
        w = self.window
        fused = w.plans_finalizing()
        if w.end_micro_step():
            self._close(fused)

    def _close(self, fused: bool) -> None:
        """Reduce, finalize and publish the window."""
        written = self.finalizer.run(self.window, self.slots, self.reducer, fused)
        if written is None:  # the ranks disagree: the window is broken
            return
        if self.stats is not None:
            w = self.window
            self.stats.close(self.finalizer.applied, w.weight_sum, w.done)
        publish.publish(self.slots, written,
                        {id(b): outs for b, outs in zip(self.buffers, self.finalizer.outs)})
        self.published = {s for s, w in zip(self.slots, written) if w}
        self.window.finish()

    def finish_pending(self) -> None:
        """Finalize a window that ends early; refuse a broken one."""
        self.check_idle("the optimizer cannot step during backward")
        w = self.window
        if w.state is State.BROKEN:
            raise RuntimeError(w.broken_message())
        if w.state is State.OPEN and w.done > 0:
            self.finalizer.arm(None)
            self._close(fused=False)

    def check_idle(self, why: str) -> None:
        """Outside any backward (a backward of ours that raised is reported first)."""
        self.capture.check_idle()
        if self.capture.task is not None:
            raise RuntimeError(why)

    def discard(self, slots: list[Slot]) -> None:
        """zero_grad() of these parameters: their result is taken back and, in a window in progress, what
        they summed so far is dropped, as stock PyTorch zeroes their p.grad. All of them: a new window."""
        if len(slots) == len(self.slots):
            self.new_window()
            return
        publish.withdraw(slots)
        for slot in slots:
            slot.load(None)
        self.published.difference_update(slots)

    def new_window(self) -> None:
        """Take the result back and open a new window (after a step, zero_grad(), or to load one)."""
        publish.withdraw(self.slots)
        self.published = set()
        self.finalizer.reset()
        self.window.open()
        publish.open_main_grads(self.main_grad_slots, self.window.id)

    def found_infs(self, slots: list[Slot]) -> dict[torch.device, torch.Tensor]:
        """The finished window's found_inf per device over these slots, for the GradScaler (finishing a
        pending window). For some of the slots (one of several optimizers), from their norm partials,
        which are inf or NaN where an element is."""
        self.finish_pending()
        if not self.window.has_result():
            raise RuntimeError("unscale_() with no gradients: run at least one micro-step's backward first")
        if len(slots) == len(self.slots):
            return {b.device: b.found_inf.view(()) for b in self.buffers}  # 0-dim, as GradScaler makes them
        found = {}
        for b in self.buffers:
            mine = [s.partials() for s in slots if s.buffer is b]
            sq = torch.cat(mine).sum() if mine else torch.zeros((), device=b.device)
            found[b.device] = (~torch.isfinite(sq)).float()
        return found
