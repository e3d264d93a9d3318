"""The flat fp32 buffers: one per device, a slot per parameter, and the buckets that launch.

Within a device, parameters are grouped by dtype into segments (finalize casts a segment in one pass),
and within a segment they lie in backward order (reverse registration order). Every slot starts on a
CHUNK boundary: the kernels use aligned vector loads, and finalize keeps one norm partial per CHUNK
elements, so a slot's partials are its own. A bucket is a contiguous range of one segment holding
about `bucket_bytes` of incoming grads; its grads go into the buffer in one multi-tensor launch, as
soon as every parameter of the bucket has delivered one (else at the end of backward), so a finished
bucket is one tensor that a collective can take.

Only this module assigns the fields of Slot, Bucket and DeviceBuffer; the other stages call their methods.
"""
from __future__ import annotations

import math

import torch

from .kernels import ops
from .kernels.reference import CHUNK


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2's parameters and grads), else the tensor itself."""
    return getattr(t, "_local_tensor", t)


def local_placed(g: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A DTensor grad as this rank's values, placed as its parameter: FSDP2's come so; a tensor-parallel one
    can come Partial (SequenceParallel's replicated norms) and is reduced here, a collective that every
    rank's hook makes in the same order. A plain tensor as it is."""
    if local(g) is g:
        return g
    if tuple(g.placements) != tuple(param.placements):
        g = g.redistribute(placements=param.placements)
    return local(g)


def padded_numel(param: torch.Tensor) -> int:
    """The elements of a parameter's slot range: the parameter, or this rank's shard of a DTensor
    parameter, counted at the largest shard's size (ceil(n / ranks) along each sharded dimension). So every
    rank lays its buffer out alike, and a reduce-scatter of N such layouts lands each shard in its slot."""
    if local(param) is param:
        return param.numel()
    shape = list(param.shape)
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            shape[placement.dim] = -(-shape[placement.dim] // param.device_mesh.size(mesh_dim))
    return math.prod(shape)


def dense_strides(param: torch.Tensor) -> tuple[int, ...]:
    """The strides of a parameter's slot: its own where it is dense (channels_last and other
    permutations, so p.grad keeps the parameter's layout), else contiguous."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(param.shape, param.stride()) if n != 1):
        if stride != expected:
            return contiguous_strides(param.shape)
        expected *= size
    return tuple(param.stride())


def contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class Slot:
    """One parameter's place in its device's flat buffer, and where it stands in the window."""
    __slots__ = ("param", "buffer", "segment", "bucket", "start", "order", "sharded", "shape", "numel", "span",
                 "strides", "contiguous", "main", "out", "window", "micro", "finalized_in", "version")

    def __init__(self, param: torch.nn.Parameter, buffer: DeviceBuffer, segment: int, start: int, order: int):
        self.param, self.buffer, self.segment, self.start = param, buffer, segment, start
        self.order = order  # its place in backward order (reverse registration order) on its device
        shard = local(param)  # a slot holds this rank's shard of an FSDP2 parameter
        self.sharded = shard is not param  # then its grads come, and go out, as DTensors
        self.shape, self.numel = shard.shape, shard.numel()
        self.span = -(-padded_numel(param) // CHUNK) * CHUNK  # its range of the buffer, padding included
        self.strides = dense_strides(shard)
        self.contiguous = shard.is_contiguous()  # then its memory order is the logical order
        self.bucket: Bucket
        self.main: torch.Tensor  # its fp32 view of the buffer: p.main_grad once published
        self.out: torch.Tensor | None = None  # p.grad of a bf16/fp16 parameter, once finalized
        # Generation counters (see window.Window): the window and the micro-step of its last grad, and
        # the micro-step whose own launch finalized it. It holds a grad of window w iff window == w.
        self.window = self.micro = self.finalized_in = -1
        self.version = 0  # p.grad._version when published (in-place edits after that are seen)

    def holds(self, window: int) -> bool:
        """It holds a gradient of this window."""
        return self.window == window

    def is_repeat(self, micro: int) -> bool:
        """It already got a grad in this micro-step (tied weights, reentrant checkpointing, micro_step())."""
        return self.micro == micro

    def take(self, window: int, micro: int) -> bool:
        """Record a grad of this window and micro-step; True if it is the window's first (it stores)."""
        store = self.window != window
        self.window, self.micro = window, micro
        return store

    def load(self, window: int | None) -> None:
        """As a checkpoint says: holding a gradient of `window`, or none."""
        self.window = -1 if window is None else window

    def set_out(self, out: torch.Tensor | None) -> None:
        """p.grad of a bf16/fp16 parameter (None: none yet); its version is noted as published."""
        self.out = out
        self.version = 0 if out is None else out._version

    def finalized(self, micro: int) -> bool:
        return self.finalized_in == micro

    def view_of(self, flat: torch.Tensor, start: int) -> torch.Tensor:
        return flat.as_strided(self.shape, self.strides, flat.storage_offset() + start)

    def for_param(self, t: torch.Tensor) -> torch.Tensor:
        """t as the parameter's grad: for an FSDP2 shard, a DTensor laid out like the parameter."""
        if not self.sharded:
            return t
        from torch.distributed.tensor import DTensor
        p = self.param
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def local_grad(self, g: torch.Tensor) -> torch.Tensor:
        """A DTensor grad as this rank's values of the slot, placed as its parameter."""
        return local_placed(g, self.param)

    def flat(self, t: torch.Tensor, base: int = 0) -> torch.Tensor:
        """Its range of a flat tensor that starts at buffer index `base`."""
        return t[self.start - base: self.start - base + self.numel]

    def partials(self, per_chunk: torch.Tensor | None = None) -> torch.Tensor:
        """Its range of a tensor with one element per CHUNK of the buffer: the norm partials by default."""
        first = self.start // CHUNK
        return (self.buffer.partials if per_chunk is None else per_chunk)[first: first + -(-self.numel // CHUNK)]

    def flat_view(self, g: torch.Tensor) -> torch.Tensor:
        """g as a 1-D tensor in the slot's memory order: a view where g has the slot's strides, else a
        copy."""
        if g.stride() != self.strides:
            g = torch.empty_strided(g.shape, self.strides, dtype=g.dtype, device=g.device).copy_(g)
        return g.as_strided((self.numel,), (1,))


class Bucket:
    """A contiguous range [begin, end) of one segment, and the grads waiting for its launch."""

    def __init__(self, buffer: DeviceBuffer, segment: int, slots: list[Slot]):
        self.buffer, self.segment, self.slots = buffer, segment, slots
        self.begin = slots[0].start
        self.end = slots[-1].start + slots[-1].span
        self.dtype = buffer.segments[segment][0]
        self.launch = ops.choose("accumulate_many_", buffer.device.type).impl
        self.launch_last = ops.choose("accumulate_finalize_", buffer.device.type).impl
        self.stream = None  # the raw CUDA stream its pending grads were produced on
        self.repeats = False  # a parameter of it got two grads in one micro-step (tied, reentrant checkpoint)
        self._clear()

    def mark_repeats(self) -> None:
        self.repeats = True

    def _clear(self) -> None:
        self.grads: list[torch.Tensor] = []  # 1-D, in the slots' memory order: what the kernel reads
        self.offsets: list[int] = []
        self.store: list[bool] = []
        self.pending: list[Slot] = []
        self.arrived: set[Slot] = set()  # slots with a grad since the last launch: launch when all have one

    def add(self, slot: Slot, grad: torch.Tensor, store: bool, weight: float, stream,
            last: torch.Tensor | None) -> bool:
        """Queue a grad; launch when the bucket is complete. True if it launched. `last`: the scale of
        the last pass, where this micro-step's launches also finalize (finalize.Finalizer.armed)."""
        if self.grads and (grad.dtype != self.grads[0].dtype or stream != self.stream):
            self.flush(weight, last)  # one launch takes one grad dtype, from one stream
        self.stream = stream
        self.grads.append(grad if slot.contiguous and grad.is_contiguous() else slot.flat_view(grad))
        self.offsets.append(slot.start)
        self.store.append(store)
        self.pending.append(slot)
        return self.arrive(slot, weight, last)

    def arrive(self, slot: Slot, weight: float, last: torch.Tensor | None) -> bool:
        """Count the slot's grad, queued or already written into the buffer (fused_linear); launch when
        every slot has one. True if that completed the bucket."""
        self.arrived.add(slot)
        if len(self.arrived) < len(self.slots):
            return False
        self.flush(weight, last)
        return True

    def flush(self, weight: float, last: torch.Tensor | None) -> bool:
        """Launch the pending grads into the buffer and free them. True if there were any. Either way the
        count of arrived slots starts again."""
        if not self.grads:
            self.arrived.clear()
            return False
        buffer = self.buffer
        _wait_for_producer(self)
        if last is not None and self.grads[0].dtype == self.dtype:
            # the last micro-step: accumulate and finalize in one pass; a bf16/fp16 grad receives its
            # parameter's result and becomes p.grad, so no new memory is taken
            write = self.dtype != torch.float32
            self.launch_last(buffer.buf, self.grads, self.offsets, self.store, weight, last,
                             buffer.found_inf, buffer.partials, write, buffer.stat_partials)
            for slot, flat in zip(self.pending, self.grads):
                slot.finalized_in = slot.micro
                if write:
                    slot.set_out(flat if flat.shape == slot.shape
                                 else flat.as_strided(slot.shape, slot.strides))
        else:
            self.launch(buffer.buf, self.grads, self.offsets, self.store, weight, buffer.stat_partials)
        self._clear()
        return True

    def drop(self) -> None:
        """Forget the pending grads (a backward that raised)."""
        self._clear()


def _wait_for_producer(bucket: Bucket) -> None:
    """Grads made on another CUDA stream: the launch stream waits for that one, and their memory is
    not reused before the launch has read it. Streams are compared by their raw handles."""
    # private: the current stream's raw handle, compared with the one the grads were made on
    if bucket.stream is None or torch._C._cuda_getCurrentRawStream(bucket.buffer.cuda_index) == bucket.stream:
        return
    consumer = torch.cuda.current_stream(bucket.buffer.device)
    consumer.wait_stream(torch.cuda.ExternalStream(bucket.stream, device=bucket.buffer.device))
    for g in bucket.grads:
        g.record_stream(consumer)


class DeviceBuffer:
    """The flat fp32 buffer of one device, its slots and buckets, and what finalize writes."""

    def __init__(self, device: torch.device, params: list[torch.nn.Parameter], bucket_bytes: int):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.cuda_index = device.index if self.is_cuda else None
        self.slots: list[Slot] = []
        self.segments: list[tuple[torch.dtype, int, int]] = []
        self.buckets: list[Bucket] = []
        end = 0
        backward_order = params[::-1]
        for dtype in sorted({p.dtype for p in params}, key=str):
            begin = end
            for order, p in enumerate(backward_order):
                if p.dtype != dtype:
                    continue
                self.slots.append(Slot(p, self, len(self.segments), end, order))
                end += self.slots[-1].span
            self.segments.append((dtype, begin, end))
        self.buf = torch.zeros(end, dtype=torch.float32, device=device)  # padding stays 0 forever
        for slot in self.slots:
            slot.main = slot.view_of(self.buf, slot.start)
        for segment in range(len(self.segments)):
            members, size = [], 0
            for slot in (s for s in self.slots if s.segment == segment):
                members.append(slot)
                size += slot.numel * slot.param.element_size()
                if size >= bucket_bytes:
                    self.buckets.append(Bucket(self, segment, members))
                    members, size = [], 0
            if members:
                self.buckets.append(Bucket(self, segment, members))
        for bucket in self.buckets:
            for slot in bucket.slots:
                slot.bucket = bucket
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.partials = torch.zeros(end // CHUNK, device=device)  # squared norm, one per CHUNK
        self.stat_partials: torch.Tensor | None = None  # sum(w g^2) per CHUNK, with grad_stats (stats.py)

    def keep_stats(self) -> None:
        """The launches also write each chunk's sum(w g^2) (stats.GradStats)."""
        self.stat_partials = torch.zeros_like(self.partials)
