"""Accelerate: `acc = gacc_kernels.integrations.accelerate.attach(accelerator, model, optimizer)`, after
`accelerator.prepare`, in a loop that uses `with accelerator.accumulate(model):` and
`accelerator.backward(loss)`.

What it translates (Accelerate 1.x):
- K is `accelerator.gradient_accumulation_steps`; the window ends where Accelerate syncs
  (`accelerator.sync_gradients`, set by `accumulate()` before the forward), so an epoch's short last
  window ends where Accelerate steps, and p.grad is final before `accelerator.clip_grad_norm_`.
- `accelerator.backward` divides each loss by K, also in the short window, where stock accumulation then
  steps on (r/K) times the mean. gacc undoes the 1/K (loss_scale): the optimizer sees the mean over the
  micro-batches actually run, as one K-times larger batch would give. `acc.set_weight(n_tokens)` before
  a backward gives the token-weighted mean.
- A loop whose losses are already normalised for the whole window (Accelerate's recipe for variable
  sizes: each micro-batch's summed loss times K over the window's token count) attaches with
  reduction="sum": gacc then sums what accelerator.backward gives, as stock Accelerate does, in fp32.
- It attaches to the prepared model (the DDP wrapper under multi-GPU) and the torch optimizer inside
  the AcceleratedOptimizer, with Accelerate's GradScaler for fp16.
- attach(..., grad_stats=True): each `accelerator.log(values)` also sends the last window's gradient
  noise scale to the trackers (gacc/b_simple, gacc/b_simple_ema, gacc/g2, gacc/trace; see
  gacc_kernels.stats).
- `accelerator.clip_grad_norm_` over the model's parameters becomes gacc's fp32 clip of p.grad and
  p.main_grad together, with the norm from the fused pass (else a bf16 p.grad clipped in place would
  have to be copied back into p.main_grad).
- FSDP2 (an FSDP plugin with `fsdp_version=2`): `accumulate()` turns FSDP's gradient sync off for the
  non-final micro-steps (the default `sync_each_batch=False`), and gacc then sums the window's unsharded
  grads in fp32 and reduce-scatters them once, whatever the mixed-precision policy (Accelerate's bf16
  default reduces in bf16). With `sync_each_batch=True` FSDP reduce-scatters each micro-step and gacc
  sums the shards in fp32.
Refused: DeepSpeed, FSDP1, Megatron-LM and XLA (they accumulate or reduce gradients themselves).
"""
from __future__ import annotations

import torch
from accelerate.utils import DistributedType

from ..accumulator import GradAccumulator
from ..attaching import attach as attach_core

_OWN_ACCUMULATION = ("DEEPSPEED", "MEGATRON_LM", "XLA")


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's optimizer wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def attach(accelerator, model: torch.nn.Module, optimizer, reduction: str = "mean",
           **kwargs) -> GradAccumulator:
    if any(accelerator.distributed_type == getattr(DistributedType, name, None)
           for name in _OWN_ACCUMULATION):
        raise RuntimeError(f"gacc does not run under Accelerate's {accelerator.distributed_type}: it "
                           "accumulates or reduces gradients itself")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise RuntimeError("gacc does not run under FSDP1, which shards the grads before any hook of gacc's "
                           "sees them: use FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2), or "
                           "fsdp_version: 2 in the Accelerate config)")
    k = accelerator.gradient_accumulation_steps
    kwargs.setdefault("loss_scale", 1.0 / k if reduction == "mean" else 1.0)  # "sum": the loop's K/K cancels
    acc = attach_core(model, unwrap_optimizer(optimizer), steps=k, scaler=accelerator.scaler,
                      reduction=reduction, window_end=lambda: accelerator.sync_gradients, **kwargs)
    clip_through(acc, accelerator)
    if kwargs.get("grad_stats"):
        original = accelerator.log

        def log(values, *args, **log_kwargs):
            return original({**values, **acc.stats().metrics()}, *args, **log_kwargs)
        acc.set_while_attached(accelerator, "log", log)
    return acc


def clip_through(acc: GradAccumulator, accelerator) -> None:
    """accelerator.clip_grad_norm_ clips through gacc where it can (GradAccumulator.clip_for)."""
    original = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        params = list(parameters)
        norm = acc.clip_for(params, max_norm, norm_type)
        return original(params, max_norm, norm_type) if norm is None else norm
    acc.set_while_attached(accelerator, "clip_grad_norm_", clip_grad_norm_)
