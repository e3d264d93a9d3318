"""Lightning Fabric: `acc = gacc_kernels.integrations.fabric.attach(fabric, model, optimizer, steps=K)`, after
`model, optimizer = fabric.setup(model, optimizer)`, in Fabric's own accumulation loop, unchanged:

    for i, batch in enumerate(loader):
        is_accumulating = (i + 1) % K != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            fabric.backward(compute_loss(model, batch))
        if not is_accumulating:
            fabric.clip_gradients(model, optimizer, max_norm=1.0)   # optional; p.grad is final here
            optimizer.step()
            optimizer.zero_grad()

What it translates (Fabric 2.x):
- Fabric has no K of its own: the loop decides, so `steps=K` is given here. The loss stays the loop's:
  reduction="sum" (the default) gives what stock Fabric gives, the sum of the micro-steps' grads, in fp32
  (a loop that divides its loss by K gets the mean, one that does not gets K times it, as in stock);
  under DDP the ranks are averaged as DDP does. reduction="mean" (with loss_scale=) as in attach().
- gacc attaches to the Fabric module (it holds the DDP wrapper under strategy="ddp", whose own reducer
  gacc keeps off) and the torch optimizer inside the Fabric optimizer.
- The window ends at the K-th micro-step, or earlier where the loop syncs: a micro-step inside
  `fabric.no_backward_sync(model, enabled=False)` after others with enabled=True (under DDP gacc reads
  DDP's flag; on one device, where Fabric drops `enabled`, this module reads it). So p.grad is final
  right after the backward before the loop's step, a short last window included; without the context,
  `optimizer.step()` or the clip finishes a short window.
- `fabric_optimizer.zero_grad()` is the torch optimizer's, through gacc (the Fabric optimizer would
  otherwise run torch's zero_grad on itself and a mid-window zero_grad would not discard the window).
- With precision="16-mixed", Fabric's GradScaler (`fabric.strategy.precision.scaler`) is handed to gacc:
  unscale and inf check happen in the fused pass.
- `fabric.clip_gradients(model, optimizer, max_norm=...)` over the attached optimizer's parameters is
  gacc's fp32 clip of p.grad and p.main_grad together, with the norm from the fused pass (L2; it raises
  on a non-finite norm when error_if_nonfinite, as Fabric does). Other clips go to Fabric.
- ModelParallelStrategy with FSDP2 (fully_shard in the parallelize_fn): Fabric's no_backward_sync turns
  FSDP's gradient sync off, and gacc then sums the unsharded grads in fp32 and reduce-scatters each
  window once (the core's FSDP2 no-sync mode). Tensor parallelism is refused by the core.
Refused: strategies that accumulate, reduce or shard gradients themselves (DeepSpeed, FSDP1), and those
not supported yet (DataParallel, XLA); single device, DDP and ModelParallelStrategy are supported.
Also precision="64-true" (float64 parameters already accumulate in float64).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from lightning.fabric.plugins import DoublePrecision
from lightning.fabric.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
)
from lightning.fabric.wrappers import _FabricModule, _FabricOptimizer, _unwrap_compiled

from ..accumulator import GradAccumulator
from ..attaching import attach as attach_core

_DDP = 'use strategy="ddp"'
_REFUSED = (
    (DeepSpeedStrategy, ("it accumulates, reduces and scales gradients itself (for fp32 accumulation set "
                         '"data_types": {"grad_accum_dtype": "fp32"} in its config, without gacc)')),
    (FSDPStrategy, f"it reduce-scatters and shards the grads (FSDP1) before gacc could see them; {_DDP}"),
    (SingleDeviceXLAStrategy, "gacc's Fabric integration does not support XLA"),
)


def check_strategy(strategy) -> None:
    """Single device, DDP and ModelParallelStrategy (FSDP2; the core refuses tensor parallelism); others
    are refused, naming the strategy."""
    name = type(strategy).__name__
    for cls, why in _REFUSED:
        if isinstance(strategy, cls):
            raise RuntimeError(f"gacc does not run under Fabric's {name}: {why}")
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
        raise RuntimeError(f"gacc does not run under Fabric's {name} (not supported yet): use a single "
                           'device, strategy="ddp" or ModelParallelStrategy with FSDP2')


def attach(fabric, model: torch.nn.Module, optimizer, steps: int, **kwargs) -> GradAccumulator:
    """`model` and `optimizer` as fabric.setup returned them (several optimizers as a list); kwargs go to
    gacc_kernels.attach (reduction, loss_scale, bucket_bytes, comm_dtype, ...)."""
    check_strategy(fabric.strategy)
    if not isinstance(_unwrap_compiled(model)[0], _FabricModule):
        raise TypeError("attach() takes the module that fabric.setup() returned, got "
                        f"{type(model).__name__}: under DDP the DDP wrapper is inside it")
    wrappers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    optimizers = [o.optimizer if isinstance(o, _FabricOptimizer) else o for o in wrappers]
    precision = fabric.strategy.precision
    if isinstance(precision, DoublePrecision):
        raise RuntimeError("gacc does not run under Fabric's precision=\"64-true\": it accumulates in fp32, "
                           "and stock accumulation of float64 parameters is float64 already")
    kwargs.setdefault("scaler", getattr(precision, "scaler", None))
    module = _unwrap_compiled(model)[0]
    sync = LoopSync(fabric, module)
    given = kwargs.pop("window_end", None)
    kwargs["window_end"] = sync.ends_window if given is None else lambda: sync.ends_window() | bool(given())
    acc = attach_core(model, optimizers, steps=steps, **kwargs)
    acc.set_while_attached(fabric, "no_backward_sync", sync.no_backward_sync)
    for wrapper, opt in zip(wrappers, optimizers):
        if wrapper is not opt:  # torch's zero_grad would run on the wrapper itself, not gacc's
            acc.set_while_attached(wrapper, "zero_grad", opt.zero_grad)
    clip_through(acc, fabric.strategy)
    return acc


class LoopSync:
    """The loop's word on the window: `fabric.no_backward_sync(model, enabled=is_accumulating)`, which
    Fabric itself drops on one device. As for DDP's flag (distributed.ddp): once the loop has skipped the
    sync of some micro-step, a backward inside `no_backward_sync(model, enabled=False)` ends the window
    (so p.grad is final right after it, a short last window included)."""

    def __init__(self, fabric, module: _FabricModule):
        self.original, self.module = fabric.no_backward_sync, module
        self.toggled = False  # the loop has skipped a sync since attach
        self.skip: bool | None = None  # `enabled` of the context the loop is in; None outside

    def no_backward_sync(self, module, enabled: bool = True):
        context = self.original(module, enabled)  # Fabric's checks and DDP's no_sync, as before
        return self._within(context, bool(enabled)) if _unwrap_compiled(module)[0] is self.module else context

    @contextlib.contextmanager
    def _within(self, context, skip: bool):
        with context:
            outer, self.skip = self.skip, skip
            self.toggled |= skip
            try:
                yield
            finally:
                self.skip = outer

    def ends_window(self) -> bool:
        return self.toggled and self.skip is False


def clip_through(acc: GradAccumulator, strategy) -> None:
    """fabric.clip_gradients(..., max_norm=) clips through gacc where it can (GradAccumulator.clip_for)."""
    original = strategy.clip_gradients_norm

    @functools.wraps(original)
    def clip_gradients_norm(module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True):
        params = list(strategy.precision.main_params(optimizer))
        norm = acc.clip_for(params, float("inf"), norm_type)  # the norm only; None: not gacc's to clip
        if norm is None:
            return original(module, optimizer, max_norm, norm_type, error_if_nonfinite)
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
                "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
                "norm anyway, set `error_if_nonfinite=False`")
        if float(max_norm) != float("inf"):
            acc.clip_grad_norm_(max_norm)
        return norm
    acc.set_while_attached(strategy, "clip_gradients_norm", clip_gradients_norm)
