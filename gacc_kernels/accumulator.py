"""attach(): exact fp32 gradient accumulation for an ordinary PyTorch training loop.

GradAccumulator wires the stages together, one module each:
    capture   autograd hooks: backward start, each parameter's grad, backward end
    layout    the flat fp32 buffer per device, its slots and buckets; a bucket launches when complete
    window    the window's state: micro-step count, weights, early step, the fused last pass
    reduce    nothing on one process; data parallel: bucket all-reduces overlapped with the last backward
    finalize  scale, inf check, norm, cast: in the last micro-step's launches, or one pass after
    publish   p.grad and p.main_grad, what the optimizer reads
    amp       the GradScaler
"""
from __future__ import annotations

import contextlib
import operator
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from . import finalize, fused_linear, publish
from .amp import ScalerBridge
from .capture import Capture
from .layout import DeviceBuffer, Slot
from .patch import set_attr
from .reduce import AllReduce, LocalReducer, RanksDisagree, ShardedReducer, fsdp2_modules
from .window import State, Window

_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, GradAccumulator] = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, scaler=None,
           reduction: str = "mean", loss_scale: float = 1.0, window_end=None,
           bucket_bytes: int = 128 << 20, process_group=None,
           comm_dtype: torch.dtype = torch.float32, fuse_linear: bool = False) -> GradAccumulator:
    """Accumulate `steps` micro-steps of gradients in fp32 before each optimizer step. See GradAccumulator."""
    return GradAccumulator(model, optimizer, steps, scaler=scaler, reduction=reduction, loss_scale=loss_scale,
                           window_end=window_end, bucket_bytes=bucket_bytes, process_group=process_group,
                           comm_dtype=comm_dtype, fuse_linear=fuse_linear)


def _check_attachable(model, optimizer, steps, reduction) -> list[torch.nn.Parameter]:
    """The parameters to manage; raises on anything gacc cannot make exact."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (the micro-steps per optimizer step), got {steps!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    wrapped = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(wrapped, torch.optim.Optimizer):
        raise TypeError(
            f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}, a framework's wrapper. The "
            "framework also scales the loss and decides when to step, so use its integration in "
            "gacc_kernels.integrations; in a loop of your own, attach the torch optimizer it wraps, with "
            "loss_scale=1/K if the loss is divided by K.")
    if model in _ATTACHED:
        raise RuntimeError("attach() was already called on this model; call acc.remove() first")
    _check_wrapper(model)
    for m in model.modules():
        if getattr(m, "sparse", False) is True:
            raise ValueError(f"{type(m).__name__} produces sparse gradients, which gacc cannot accumulate; "
                             "construct it with sparse=False")
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            warnings.warn("the model has BatchNorm layers: their statistics are computed per micro-batch, "
                          "not per optimizer step (use GroupNorm/LayerNorm or larger micro-batches)",
                          stacklevel=4)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    meta = [n for n, p in model.named_parameters() if p.requires_grad and p.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} parameters are on the meta device ({meta[0]}, ...): materialize the "
                         "model first (model.to_empty(device=...) and load or initialize the weights), then attach()")
    managed = {id(p) for p in params}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}  # never get a grad (LoRA's base)
    if any(id(p) not in managed and id(p) not in frozen for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds a parameter that is not a parameter of the model; attach() "
                         "manages the model's parameters only")
    return params


def _check_wrapper(model: torch.nn.Module) -> None:
    """Refuse the data-parallel wrappers gacc cannot be exact under (yet)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and getattr(model, "static_graph", False):
        raise ValueError("gacc does not support DistributedDataParallel(static_graph=True): DDP's reducer then "
                         "expects its own per-backward hooks, which gacc turns off; build DDP without static_graph")
    for m in model.modules():
        if type(m).__name__ == "DeepSpeedEngine":
            raise ValueError("gacc does not run under the DeepSpeed engine: it accumulates, reduces and scales "
                             "gradients itself (gradient_accumulation_steps in its config); use one or the other")
        if type(m).__name__ == "FullyShardedDataParallel":
            raise ValueError("gacc does not support FSDP1 (FullyShardedDataParallel): it reduce-scatters and "
                             "shards the grads before any hook of gacc's could see them; use FSDP2 "
                             "(torch.distributed.fsdp.fully_shard) or DDP")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sharded = [n for n, p in trainable if type(p).__name__ == "DTensor"]
    if not sharded:
        return
    if not fsdp2_modules(model):
        raise ValueError(f"gacc does not support DTensor parameters outside FSDP2 (tensor parallelism), found "
                         f"{sharded[0]}; use fully_shard or DDP")
    plain = [n for n, p in trainable if type(p).__name__ != "DTensor"]
    if plain:
        raise ValueError(f"under FSDP2 every trainable parameter must be sharded, but {plain[0]} is not (its "
                         "grads would not be reduced over the ranks): call fully_shard on the root module too")
    meshes = {p.device_mesh.ndim for _, p in trainable}
    if meshes != {1}:
        raise ValueError("gacc supports FSDP2 on a 1-D device mesh only (not HSDP, nor FSDP with tensor "
                         "parallelism)")


def _data_parallel_group(model: torch.nn.Module, process_group):
    """The process group to reduce over: a DDP wrapper's, or the one given; None on one process."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if process_group is not None and process_group is not model.process_group:
            raise ValueError("process_group= differs from the DistributedDataParallel model's; leave it out")
        return model.process_group
    if process_group is not None and not torch.distributed.is_initialized():
        raise ValueError("process_group= was given, but torch.distributed is not initialized")
    return process_group


def _broadcast_from_first_rank(model: torch.nn.Module, group) -> None:
    """Every rank starts from the same weights and buffers, as DistributedDataParallel does."""
    src = torch.distributed.get_global_rank(group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t, src=src, group=group)


class GradAccumulator:
    """Exact fp32 gradient accumulation over `steps` micro-steps, enabled on an unchanged loop.

    Between micro-steps p.grad is None; each grad goes into the parameter's slot of a flat fp32 buffer
    and is freed. After the K-th backward (or at an early optimizer.step()) p.grad holds the weighted
    mean, sum(w_k g_k) / sum(w_k): a view of the buffer for fp32 parameters, one rounding of it
    otherwise; p.main_grad is always the fp32 view. The loss must not be divided by K.
    reduction="sum" skips the division by sum(w_k), for loops that scale the loss themselves.
    loss_scale is the factor each micro-step's loss was already multiplied by (1/K where a framework
    divides it); the result is divided by it, in the same pass: a loop that divides by K gets the mean
    over the micro-steps it ran, also when a window ends early.
    window_end, a callable read as each backward starts, ends the window after that micro-step when it
    returns True (a framework's sync point), before the K-th; `steps` stays the most a window may hold.

    Data parallel: on a DistributedDataParallel model (DDP's own sync is turned off), or on a plain
    model with process_group= (its parameters and buffers are broadcast from the group's first rank
    at attach, as DDP does), the window's result is summed over the ranks bucket by bucket while the
    last backward runs: the optimizer sees sum over ranks and micro-steps of w*g / the total weight.
    comm_dtype=torch.bfloat16 halves the bytes sent, at bf16 precision (see reduce.AllReduce).

    fuse_linear=True: the weight grad GEMM of each plain nn.Linear with a bf16/fp16 weight on CUDA
    writes the weight's slot itself, in fp32, and no bf16 weight grad is made (see fused_linear).
    Parameters that have a grad_added_to_main_grad attribute at attach (the Megatron and Transformer
    Engine contract for layers that add their weight grad into p.main_grad themselves) keep
    p.main_grad, zeroed, throughout the window; their micro-steps cannot be weighted.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, *,
                 scaler=None, reduction: str = "mean", loss_scale: float = 1.0, window_end=None,
                 bucket_bytes: int = 128 << 20, process_group=None, comm_dtype: torch.dtype = torch.float32,
                 fuse_linear: bool = False):
        params = _check_attachable(model, optimizer, steps, reduction)
        loss_scale = float(loss_scale)
        if not (0.0 < loss_scale < float("inf")):
            raise ValueError(f"loss_scale must be finite and > 0, got {loss_scale}")
        self.model, self.optimizer, self.steps, self.reduction = model, optimizer, steps, reduction
        self.loss_scale = loss_scale
        self._window_end = window_end
        self.window = Window(steps)
        self._params = params  # registration order, to see replaced parameters
        owner = {id(p): (m._parameters, n) for m in model.modules() for n, p in m._parameters.items()
                 if p is not None}
        self._held_in = [owner[id(p)] for p in params]  # (its module's _parameters, its name) for each
        self._n_opt_params = sum(len(g["params"]) for g in optimizer.param_groups)
        devices = list(dict.fromkeys(p.device for p in params))
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        group = _data_parallel_group(model, process_group)
        if group is not None and len(devices) != 1:
            raise ValueError("gacc data parallel needs the parameters on one device per process")
        self._sharded = bool(fsdp2_modules(model))
        if self._sharded and process_group is not None:
            raise ValueError("process_group= with FSDP2: gacc reduces over the FSDP mesh; leave it out")
        if self._sharded and len(devices) != 1:
            raise ValueError("gacc with FSDP2 needs the parameters on one device per process")
        self._buffers = [DeviceBuffer(d, [p for p in params if p.device == d], bucket_bytes) for d in devices]
        self._slots: list[Slot] = [s for b in self._buffers for s in b.slots]
        self._fuse = True  # off once a parameter got two grads in one micro-step
        # layers that add into p.main_grad themselves (see _open_main_grads)
        self._main_grad_slots = {s for s in self._slots if "grad_added_to_main_grad" in vars(s.param)}
        self._capture = Capture(model, self._slots, self)
        self._scaler = None if scaler is None else ScalerBridge(scaler, optimizer, self._found_infs)

        with contextlib.ExitStack() as undo:  # attach is atomic: a failure undoes what was done
            if self._sharded:
                self._reducer = ShardedReducer(model, self.window, undo)
            elif group is None:
                self._reducer = LocalReducer()
            else:
                self._reducer = AllReduce(group, self._buffers[0], comm_dtype)
                if ddp:  # its reducer would all-reduce the grads gacc takes away, i.e. zeros
                    model.require_backward_grad_sync = False
                    undo.callback(setattr, model, "require_backward_grad_sync", True)
                else:
                    _broadcast_from_first_rank(model, group)
            self._capture.install(undo)
            if fuse_linear and fused_linear.install(model, self._slots, self._capture, undo) == 0:
                warnings.warn(f"attach(fuse_linear=True) fused no layer: {fused_linear.why_none_fused()}. "
                              "The weight grads take the hook path, with the same results.", stacklevel=3)
            undo.callback(optimizer.register_step_pre_hook(self._before_step).remove)
            undo.callback(optimizer.register_step_post_hook(self._after_step).remove)
            set_attr(optimizer, "zero_grad", self._zero_grad, undo)
            if self._scaler is not None:
                self._scaler.install(undo)
            _ATTACHED[model] = self
            undo.callback(_ATTACHED.pop, model, None)
            self._undo = undo.pop_all()
        self._open_main_grads()

    # -- capture's events -----------------------------------------------------------------------

    def backward_starting(self, will_accumulate, accumulated: bool) -> None:
        if not self._sharded:  # FSDP2 holds unsharded parameters during forward and backward
            self._check_not_replaced()
        self._reducer.before_backward()
        w = self.window
        if w.state is State.BROKEN:
            raise RuntimeError(self._broken_message())
        if w.state is State.FINISHED:
            if any(s.param.grad is not None for s in self._slots):
                if not will_accumulate():
                    return  # torch.autograd.grad: the finished window stays as it is
                raise RuntimeError(
                    f"backward after the last of steps={self.steps} micro-steps: call optimizer.step() or "
                    "optimizer.zero_grad() after the last micro-step. " + (
                        "This backward did not pass through the model's forward, so autograd has already "
                        "added into p.grad of the first parameter it reached." if accumulated else
                        "Nothing was added; p.grad still holds the finished window."))
            self._new_window()  # the grads were cleared by hand (model.zero_grad())
        elif w.state is State.STEPPED:
            self._new_window()
        w.closing = w.done == self.steps - 1 or (self._window_end is not None and bool(self._window_end()))
        # Armed fused layers (see armed_writes) write with no call back, so no bucket can tell when it is
        # complete: the last pass is then one finalize per segment after backward, not in the launches.
        fuse = (w.closing and w.context < 0 and self._reducer.fuses_last_pass and w.micro > 0 and self._fuse
                and not self._capture.fused)
        scale = self._scales(w.weight_sum + w.weight) if fuse else None
        w.fused = w.micro if scale is not None else -1
        finalize.arm(self._buffers, scale)

    def armed_writes(self, slots: list[Slot]) -> tuple[float, list[float]] | None:
        """Where this backward's fused weight grads go, for fused_linear to write them with no call back:
        the micro-step's weight, and each slot's beta (0 for the window's first grad, which stores). None
        where each must come through write_fused: micro_step() contexts (several backwards make one
        micro-step), and the window's last micro-step under a reducer that sends buckets as they complete."""
        w = self.window
        if w.state is not State.OPEN or w.context >= 0 or (w.closing and not self._reducer.fuses_last_pass):
            return None
        return w.weight, [0.0 if s.window != w.id else 1.0 for s in slots]

    def armed_written(self, slots: list[Slot]) -> None:
        """Grads that fused_linear wrote into these slots as armed: write_fused's bookkeeping, after the
        fact. Their buckets launch what else they hold at the backward's end (backward_done)."""
        w = self.window
        for slot in slots:
            slot.micro, slot.window = w.micro, w.id

    def grad_ready(self, slot: Slot, g: torch.Tensor, stream) -> None:
        if g.layout != torch.strided or g.numel() != slot.numel or g.is_cuda != slot.buffer.is_cuda:
            self._refuse_grad(slot, g)
        w = self.window
        if slot.micro == w.micro:  # a second grad in this micro-step (reentrant checkpointing, micro_step())
            self._fuse = False
            slot.bucket.repeats = True
            if w.is_last() and self._reducer.take_late(slot, g, w.weight):
                return
            slot.bucket.flush(w.weight)  # launch the first before the second
            if slot.fused == w.micro:
                finalize.add_to_finished(slot, g, w.weight)
                return
        slot.micro = w.micro
        store = slot.window != w.id
        slot.window = w.id
        if slot.bucket.add(slot, g, store, w.weight, stream) and w.is_last():
            self._reducer.on_bucket_ready(slot.bucket, w.weight_sum + w.weight)

    def write_fused(self, slot: Slot, write) -> None:
        """A grad that goes straight into the slot, not through p.grad, with grad_ready's bookkeeping.
        write(out, beta, alpha) makes out = beta * out + alpha * grad in fp32 (fused_linear); write is None
        where the parameter's layer has already added the grad into p.main_grad (_open_main_grads)."""
        w = self.window
        if write is None and slot not in self._main_grad_slots:
            raise RuntimeError("a layer added its grad into p.main_grad (grad_added_to_main_grad) of a parameter "
                               "that had no grad_added_to_main_grad attribute at attach(); set it (False) first")
        if slot.micro == w.micro:  # a second grad in this micro-step (tied weights, a layer used twice)
            slot.bucket.repeats = True
            if not slot.bucket.on_wire:
                slot.bucket.flush(w.weight)  # a queued one lands first
            if slot.fused == w.micro or slot.bucket.on_wire:  # finalized, or being reduced: added apart
                self._fuse = False
                if write is None:
                    raise RuntimeError("a layer added its grad into p.main_grad after gacc had finalized or sent "
                                       "it (the parameter also got a grad through autograd in this micro-step)")
                g = torch.empty_like(slot.main)
                write(g, 0.0, 1.0)
                self.grad_ready(slot, g, None)
                return
        slot.micro = w.micro
        store = slot.window != w.id
        slot.window = w.id
        if write is not None:
            write(slot.main, 0.0 if store else 1.0, w.weight)
        if slot.bucket.arrive(slot, w.weight) and w.is_last():
            self._reducer.on_bucket_ready(slot.bucket, w.weight_sum + w.weight)

    def _refuse_grad(self, slot: Slot, g: torch.Tensor) -> None:
        if g.layout != torch.strided:
            raise RuntimeError(f"gacc got a sparse gradient ({g.layout}) for a parameter of shape "
                               f"{tuple(slot.param.shape)}; sparse gradients are not supported")
        raise RuntimeError(f"a parameter of shape {tuple(slot.param.shape)} on {slot.buffer.device} got a grad of "
                           f"shape {tuple(g.shape)} on {g.device}. " + self._replaced_message)

    def backward_done(self, delivered: bool) -> None:
        w = self.window
        for buffer in self._buffers:  # incomplete buckets: the reducer takes them at finish, after
            for bucket in buffer.buckets:  # _finalize has zeroed their slots' values from older windows
                bucket.flush(w.weight)
        if not delivered:
            return  # torch.autograd.grad, or a backward that reached no parameter: not a micro-step
        if w.context >= 0:
            w.context += 1
        else:
            self._end_micro_step()

    def backward_aborted(self, delivered: bool) -> None:
        for buffer in self._buffers:
            for bucket in buffer.buckets:
                bucket.drop()
        finalize.arm(self._buffers, None)
        self._reducer.abort()
        if delivered:  # some of its grads may be in the buffer: this window cannot be exact
            self.window.break_()

    def _broken_message(self) -> str:
        if self.window.broken_why:
            return self.window.broken_why + " Call optimizer.zero_grad() to discard this window."
        return (f"a backward raised an exception during micro-step {self.window.broken_at} of this window, "
                "after some of its gradients had reached gacc's buffer, so the window cannot be exact. "
                "Call optimizer.zero_grad() to discard it (skip the batch), then go on.")

    # -- the window ---------------------------------------------------------------------------------

    def _end_micro_step(self) -> None:
        fused = self.window.fused == self.window.micro
        if self.window.end_micro_step():
            self._finalize(fused)

    def _new_window(self) -> None:
        publish.withdraw(self._slots)
        for buffer in self._buffers:
            buffer.outs = [None] * len(buffer.segments)
            buffer.last_scale = None
        self.window.open()
        self._open_main_grads()

    def _open_main_grads(self) -> None:
        """Parameters whose layers add their grad into p.main_grad themselves (grad_added_to_main_grad:
        Transformer Engine's fuse_wgrad_accumulation, Megatron) see their slot as p.main_grad throughout
        the window, zeroed as it opens, since those layers can only add."""
        w = self.window
        for slot in self._main_grad_slots:
            if slot.window != w.id:
                slot.main.zero_()
                slot.window = w.id
            slot.param.main_grad = slot.main

    def set_weight(self, weight: float) -> None:
        """Weight of the next micro-step (its token count, say); the default is 1. Call before backward."""
        weight = float(weight)
        if not (weight >= 0.0 and weight != float("inf")):
            raise ValueError(f"a micro-step weight must be finite and >= 0, got {weight}")
        if weight != 1.0 and self._main_grad_slots:
            raise ValueError("micro-step weights other than 1 are not possible with parameters whose layers add "
                             "into p.main_grad themselves (grad_added_to_main_grad): those layers cannot weigh")
        self._capture.check_idle()
        if self._capture.task is not None:
            raise RuntimeError("set_weight() during backward; call it before the micro-step's backward")
        self.window.weight = weight

    @contextlib.contextmanager
    def micro_step(self, weight: float | None = None) -> Iterator[None]:
        """One micro-step made of several backward calls: `with acc.micro_step(): l1.backward(); l2.backward()`."""
        w = self.window
        if w.context >= 0:
            raise RuntimeError("micro_step() contexts do not nest")
        if weight is not None:
            self.set_weight(weight)
        w.context = 0
        try:
            yield
        finally:
            backwards, w.context = w.context, -1
            if backwards and w.state is State.OPEN:
                self._end_micro_step()

    # -- finalize and publish -----------------------------------------------------------------------

    def _scales(self, weight_sum: float | torch.Tensor) -> list[torch.Tensor]:
        """Per buffer: 1 / (sum(w) (reduction="mean") * loss_scale), times 1 / the GradScaler's scale."""
        mean = self.reduction == "mean"
        if mean and float(weight_sum) == 0.0:
            raise ValueError("every micro-step in this window had weight 0; cannot take the weighted mean")
        if isinstance(weight_sum, torch.Tensor):  # summed over the ranks, on the device
            inv = ((weight_sum.double() if mean else torch.ones_like(weight_sum, dtype=torch.float64))
                   * self.loss_scale).reciprocal().float().reshape(1)
        else:
            inv = 1.0 / ((weight_sum if mean else 1.0) * self.loss_scale)
        scales = []
        for buffer in self._buffers:
            if isinstance(inv, torch.Tensor):
                scale = inv.to(buffer.device)
            else:  # a fill on the device, no copy from the host
                scale = torch.full((1,), inv, dtype=torch.float32, device=buffer.device)
            if self._scaler is not None and self._scaler.enabled:
                scale = scale * self._scaler.inv_scale(buffer.device)
            scales.append(scale)
        return scales

    def _finalize(self, fused: bool) -> None:
        w = self.window
        written = [s.window == w.id for s in self._slots]
        for slot, wrote in zip(self._slots, written):
            if not wrote:  # stale values from an earlier window: not part of this one
                slot.main.zero_()
                slot.partials().zero_()
            elif fused and slot.fused != w.fused:  # no grad in the fused last micro-step
                finalize.slot(slot, slot.buffer.last_scale)
        if not fused:
            try:
                written, weight_sum = self._reducer.finish(self._buffers, written, w.weight_sum)
            except RanksDisagree as e:  # raised at the step, not inside backward (FSDP's callbacks go on)
                w.break_(str(e))
                return
            finalize.whole_pass(self._buffers, self._scales(weight_sum))
            self._reducer.after_finalize(self._buffers)
        publish.publish(self._buffers, self._slots, written)
        w.state = State.FINISHED

    def _finish_pending(self) -> None:
        """Finalize a window that ends early; refuse a broken one."""
        self._capture.check_idle()
        if self._capture.task is not None:
            raise RuntimeError("the optimizer cannot step during backward")
        w = self.window
        if w.state is State.BROKEN:
            raise RuntimeError(self._broken_message())
        if w.state is State.OPEN and w.done > 0:
            finalize.arm(self._buffers, None)
            self._finalize(fused=False)

    def finish_window(self) -> None:
        """End the window now with the micro-steps done so far (an early optimizer step, the end of an
        epoch): p.grad then holds their weighted mean. optimizer.step() does this by itself."""
        self._finish_pending()

    # -- what the optimizer and the scaler see ------------------------------------------------------

    _replaced_message = (
        "the model's parameters were replaced after attach() (model.to_empty(), load_state_dict(assign=True), "
        "a quantization swap, .to() another device), so gacc no longer sees their gradients as they are. "
        "Call acc.remove() before replacing them and attach() after.")

    def _check_not_replaced(self) -> None:
        """Each parameter is still the object its module holds (checked at each backward and step)."""
        if any(map(operator.is_not, (d.get(n) for d, n in self._held_in), self._params)):
            raise RuntimeError(self._replaced_message)

    def _check_parameters(self) -> None:
        self._check_not_replaced()
        n_model = sum(1 for p in self.model.parameters() if p.requires_grad)
        n_opt = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n_model != len(self._params) or n_opt != self._n_opt_params:
            raise RuntimeError("parameters were added after attach(); call acc.remove() and attach() again")

    def _before_step(self, optimizer, args, kwargs):
        self._check_parameters()
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            self._ready_for_step()
            return None

        def closure_then_finish():  # step(closure) runs the window's last micro-step (Lightning, LBFGS)
            loss = closure()
            self._ready_for_step()
            return loss
        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_finish}
        return (args[0], closure_then_finish, *args[2:]), kwargs

    def _ready_for_step(self) -> None:
        self._finish_pending()
        publish.carry_in_place_edits(self._slots)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.window.state is State.FINISHED:
            self.window.state = State.STEPPED

    def _zero_grad(self, set_to_none: bool = True) -> None:
        self._capture.check_idle()
        type(self.optimizer).zero_grad(self.optimizer, set_to_none)
        self._new_window()

    def _found_infs(self) -> dict[torch.device, torch.Tensor]:
        self._finish_pending()
        if self.window.state not in (State.FINISHED, State.STEPPED):
            raise RuntimeError("unscale_() with no gradients: run at least one micro-step's backward first")
        return {b.device: b.found_inf.view(()) for b in self._buffers}  # 0-dim, as GradScaler makes them

    def total_norm(self) -> torch.Tensor:
        """L2 norm of the finished window's gradients (fp32, from the fused pass; no extra read)."""
        self._finish_pending()
        if self.window.state not in (State.FINISHED, State.STEPPED):
            raise RuntimeError("no finished window: run at least one micro-step's backward")
        first = self._buffers[0].device
        local = torch.stack([b.partials.sum().to(first) for b in self._buffers]).sum()
        return self._reducer.global_sq_norm(local).sqrt()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Like torch.nn.utils.clip_grad_norm_ over the model's gradients, using the fused pass's norm;
        clips p.grad and p.main_grad alike."""
        if float(norm_type) != 2.0:
            raise ValueError("gacc clip_grad_norm_ supports norm_type=2 only; use torch.nn.utils.clip_grad_norm_")
        total = self.total_norm()
        coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0).reshape(1)
        finalize.clip_(self._buffers, coef)
        publish.mark_current(self._slots)
        return total

    def clip_for(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor | None:
        """A framework's clip_grad_norm_(parameters, ...) done by gacc, in fp32 on p.grad and p.main_grad
        alike, when `parameters` are the ones gacc manages (frozen ones aside) and the norm is L2; None
        otherwise (then the framework clips itself). max_norm=inf only measures the norm."""
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if float(norm_type) != 2.0 or {id(p) for p in params if p.requires_grad} != set(map(id, self._params)):
            return None
        return self.total_norm() if float(max_norm) == float("inf") else self.clip_grad_norm_(max_norm)

    def set_while_attached(self, obj: Any, name: str, value: Any) -> None:
        """obj.name = value until remove() (for the framework integrations)."""
        set_attr(obj, name, value, self._undo)

    # -- checkpointing and removal ------------------------------------------------------------------

    def _layout(self) -> list[tuple[int, str, str]]:
        return [(s.numel, str(s.param.dtype), str(s.buffer.device)) for s in self._slots]

    def state_dict(self) -> dict[str, Any]:
        """The window in progress, to resume bit for bit. Take it between micro-steps."""
        self._capture.check_idle()
        w = self.window
        if self._capture.task is not None or w.context >= 0:
            raise RuntimeError("state_dict() inside a micro-step; take it between micro-steps")
        if w.state is State.BROKEN:
            raise RuntimeError(self._broken_message())
        if w.state is State.FINISHED:
            raise RuntimeError("state_dict() with a finished window that the optimizer has not stepped on; "
                               "call optimizer.step() first")
        fresh = w.state is State.STEPPED  # the next backward starts a new window
        return {"steps": self.steps, "layout": self._layout(),
                "micro_steps": 0 if fresh else w.done,
                "weights": [] if fresh else w.weights, "weight": w.weight,
                "written": [not fresh and s.window == w.id for s in self._slots],
                "buffers": [b.buf.clone() for b in self._buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layout"] != self._layout() or state["steps"] != self.steps:
            raise ValueError("this state_dict was saved from a model with other parameters or another steps=")
        self._new_window()
        w = self.window
        for buffer, buf in zip(self._buffers, state["buffers"]):
            buffer.buf.copy_(buf)
        for slot, wrote in zip(self._slots, state["written"]):
            slot.window = w.id if wrote else -1
        w.done, w.weights, w.weight = state["micro_steps"], list(state["weights"]), state["weight"]
        self._open_main_grads()

    def remove(self) -> None:
        """Remove every hook and attribute. A window in progress is finalized into p.grad first (a broken
        one is dropped)."""
        self._capture.check_idle()
        if self.window.state is not State.BROKEN:
            self._finish_pending()
        self._undo.close()
        for s in self._slots:
            if "main_grad" in s.param.__dict__:
                del s.param.main_grad
