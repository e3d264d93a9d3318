"""attach(): the checks, then the stages built and hooked in on one undo stack, so that a failure
anywhere leaves the model, the optimizer and the scaler as they were."""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

from . import fused_linear, guards, publish
from .accumulator import GradAccumulator, Parts
from .amp import ScalerBridge
from .capture import Capture
from .distributed import ddp as ddp_
from .distributed.allreduce import AllReduce
from .distributed.fsdp2 import ShardedReducer, fsdp2_modules
from .distributed.reducer import LocalReducer
from .distributed.tp import TensorParallel, tp_mesh
from .events import Events
from .finalize import Finalizer
from .layout import DeviceBuffer
from .stats import GradStats
from .stepping import Stepping
from .window import Window, check_steps

ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, GradAccumulator] = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, optimizer, steps: int, scaler=None,
           reduction: str = "sum", loss_scale: float = 1.0, window_end=None,
           bucket_bytes: int = 128 << 20, process_group=None,
           comm_dtype: torch.dtype = torch.float32, fuse_linear: bool = False, grad_stats: bool = False,
           stats_beta: float = 0.95, scaler_group=None) -> GradAccumulator:
    """Accumulate `steps` micro-steps of gradients in fp32 before each optimizer step. `optimizer`: the
    torch optimizer, or a list of them (a body and a head, Muon and AdamW). `scaler_group`: the ranks that
    hold the model's other parameters (pipeline stages), over which the GradScaler's found_inf is agreed
    at unscale, so that every one skips the same steps. See GradAccumulator."""
    check_steps(steps)
    loss_scale = float(loss_scale)
    optimizers = guards.optimizers_of(optimizer)
    guards.check_arguments(reduction, loss_scale)
    if model in ATTACHED:
        raise RuntimeError("attach() was already called on this model; call acc.remove() first")
    ddp = ddp_.find_ddp(model)
    if ddp is not None:
        ddp_.check_ddp(ddp)
    guards.check_model(model)
    params = guards.managed_parameters(model, optimizers)
    devices = list(dict.fromkeys(p.device for p in params))
    group = ddp_.data_parallel_group(ddp, process_group)
    if group is not None and len(devices) != 1:
        raise ValueError("gacc data parallel needs the parameters on one device per process")
    sharded = bool(fsdp2_modules(model))
    if sharded and process_group is not None:
        raise ValueError("process_group= with FSDP2: gacc reduces over the FSDP mesh; leave it out")
    if sharded and len(devices) != 1:
        raise ValueError("gacc with FSDP2 needs the parameters on one device per process")
    tensor_parallel = None if sharded else tp_mesh(model)
    if tensor_parallel is not None and (group is not None or len(devices) != 1 or grad_stats):
        raise ValueError("gacc with tensor parallelism (DTensor parameters) supports one device per process, "
                         "without DDP, process_group= or grad_stats")

    # -- the stages ---------------------------------------------------------------------------------
    window = Window(steps)
    buffers = [DeviceBuffer(d, [p for p in params if p.device == d], bucket_bytes) for d in devices]
    slots = [s for b in buffers for s in b.slots]
    # layers that add into p.main_grad themselves (publish.open_main_grads)
    main_grad_slots = {s for s in slots if "grad_added_to_main_grad" in vars(s.param)}
    checks = guards.Guards(model, optimizers, params)

    with contextlib.ExitStack() as undo:
        # -- reduce: nothing, the ranks' all-reduce, or FSDP2's shards ------------------------------
        if sharded:
            reducer = ShardedReducer(model, window, buffers[0], undo)
            if reducer.tp and grad_stats:
                raise ValueError("grad_stats under FSDP2 with tensor parallelism is not supported yet: attach "
                                 "without it")
        elif tensor_parallel is not None:
            reducer = TensorParallel(tensor_parallel, buffers[0])
        elif group is None:
            reducer = LocalReducer()
        else:
            reducer = AllReduce(group, buffers[0], comm_dtype)
            if ddp is None:
                ddp_.broadcast_from_first_rank(model, group)
        if ddp is not None:  # DDP's reducer stays off; the loop's sync flag is read as the window's end
            sync = ddp_.SyncFlag(ddp)
            sync.install(undo)
        finalizer = Finalizer(buffers, reduction == "mean", loss_scale, None, reducer.ranks)
        stats = GradStats(buffers, reducer, float(stats_beta)) if grad_stats else None
        events = Events(window, buffers, reducer, finalizer, checks, window_end, main_grad_slots, stats)
        if ddp is not None:
            events.add_window_signal(sync.ends_window)
        if sharded:
            events.add_window_signal(reducer.sync_ends_window)

        # -- hooks: autograd, the fused layers, the optimizer, the scaler ---------------------------
        capture = Capture(model, slots, events)
        events.listen(capture)
        capture.install(undo)
        if sharded:
            capture.watch_unsharded(reducer.unsharded_params, undo)
        if fuse_linear and fused_linear.install(model, slots, capture, undo) == 0:
            warnings.warn(f"attach(fuse_linear=True) fused no layer: {fused_linear.why_none_fused()}. "
                          "The weight grads take the hook path, with the same results.", stacklevel=2)
        stepping = Stepping(model, optimizers, events, checks)
        stepping.install(undo)
        if scaler is not None:
            bridge = ScalerBridge(scaler, optimizers,
                                  lambda opt: events.found_infs(stepping.slots_of[id(opt)]),
                                  window.stepped, stepping.steps_managed, scaler_group)
            finalizer.use_scaler(bridge)
            bridge.install(undo)
        undo.callback(ATTACHED.pop, model, None)
        kept = undo.pop_all()
    acc = ATTACHED[model] = GradAccumulator(Parts(model, optimizers, reduction, loss_scale, events, stepping,
                                                  kept))
    publish.open_main_grads(main_grad_slots, window.id)
    return acc
