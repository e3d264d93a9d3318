"""HF Trainer: `Trainer(..., callbacks=[gacc_kernels.integrations.transformers.GaccCallback()])`, or
under DDP (several processes), `trainer.add_callback(GaccCallback(trainer))`.

What it translates (transformers 5.x):
- K is `args.gradient_accumulation_steps`; the window ends where the Trainer syncs (it sets
  Accelerate's `sync_gradients` before each micro-step), so an epoch's short last window ends there too,
  and p.grad is final before the Trainer clips, logs grad_norm and calls on_pre_optimizer_step.
- The Trainer already scales each micro-step's loss for the whole window: by the window's token count
  (`num_items_in_batch`) for models that take loss kwargs, else by the window's micro-step count. gacc
  sums (reduction="sum"), so the optimizer sees the Trainer's own large-batch gradient, accumulated in
  fp32.
- It attaches at on_train_begin to the model and the torch optimizer inside the AcceleratedOptimizer
  (with its GradScaler for fp16), and removes itself at on_train_end. Given the trainer, the Trainer's
  clip and grad_norm (`accelerator.clip_grad_norm_`) go through gacc's fp32 clip.
- The Trainer saves checkpoints only at optimizer steps, so there is no window state to save.
- Under DDP gacc takes over the reducer's job on the DDP wrapper (`trainer.model_wrapped`, which only
  the trainer knows) and averages the ranks, as DDP does (the Trainer's losses are scaled for that).
- Under FSDP2 (`fsdp_config={"fsdp_version": 2}`, the trainer given): the Trainer runs its non-final
  micro-steps under Accelerate's no_sync, which turns FSDP's gradient sync off, and gacc sums the
  unsharded grads in fp32 and reduce-scatters each window once (the core's FSDP2 no-sync mode).
- `GaccCallback(trainer, grad_stats=True)`: each training log (the Trainer's `logs`, so its
  log_history and every reporting integration) also holds the last window's gradient noise scale
  (gacc/b_simple, gacc/b_simple_ema, gacc/g2, gacc/trace; see gacc_kernels.stats).
Refused: FSDP1 and DeepSpeed; DDP and FSDP2 without the trainer given to the callback.
"""
from __future__ import annotations

import torch
from accelerate.state import GradientState
from transformers import TrainerCallback

from ..accumulator import GradAccumulator
from ..attaching import attach
from .accelerate import clip_through, unwrap_optimizer


class GaccCallback(TrainerCallback):
    def __init__(self, trainer=None, bucket_bytes: int = 128 << 20, grad_stats: bool = False):
        if grad_stats and trainer is None:
            raise ValueError("grad_stats=True needs the trainer, whose logs it adds to: "
                             "trainer.add_callback(GaccCallback(trainer, grad_stats=True))")
        self.trainer, self.bucket_bytes, self.grad_stats = trainer, bucket_bytes, grad_stats
        self.acc: GradAccumulator | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed", None):
            raise RuntimeError("gacc does not run under DeepSpeed, which accumulates and reduces gradients "
                               "itself; train without GaccCallback")
        fsdp2 = self.trainer is not None and self.trainer.accelerator.is_fsdp2
        if getattr(args, "fsdp", None) and not fsdp2:
            raise RuntimeError("gacc does not run under FSDP1, which shards the grads before any hook of "
                               "gacc's sees them: use FSDP2 (fsdp_config={'fsdp_version': 2}) with "
                               "trainer.add_callback(GaccCallback(trainer))")
        if fsdp2:  # the Trainer has sharded the model in place: model_wrapped is the FSDP2 module
            model = self.trainer.model_wrapped
        elif args.world_size > 1:
            if self.trainer is None:
                raise RuntimeError("under DDP the callback needs the trainer, for its DDP-wrapped model: "
                                   "trainer.add_callback(GaccCallback(trainer))")
            model = self.trainer.model_wrapped
            if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
                raise RuntimeError(f"gacc runs on several processes only under DDP; the Trainer wrapped the "
                                   f"model in {type(model).__name__}")
        sync = GradientState()  # shared state: the Trainer sets sync_gradients before each micro-step
        self.acc = attach(model, unwrap_optimizer(optimizer), steps=args.gradient_accumulation_steps,
                          scaler=getattr(optimizer, "scaler", None), reduction="sum",
                          window_end=lambda: sync.sync_gradients, bucket_bytes=self.bucket_bytes,
                          grad_stats=self.grad_stats)
        if self.trainer is not None:
            clip_through(self.acc, self.trainer.accelerator)
        if self.grad_stats:
            self._log_stats(self.acc, self.trainer)

    @staticmethod
    def _log_stats(acc: GradAccumulator, trainer) -> None:
        """trainer.log adds the noise scale to each training log (the ones with the loss), before the
        Trainer records it and hands it to the reporting callbacks."""
        original = trainer.log

        def log(logs, *args, **kwargs):
            if "loss" in logs:
                logs.update(acc.stats().metrics())
            return original(logs, *args, **kwargs)
        acc.set_while_attached(trainer, "log", log)

    def on_train_end(self, args, state, control, **kwargs):
        if self.acc is not None:
            self.acc.remove()
            self.acc = None
