"""Lightning: `L.Trainer(accumulate_grad_batches=K, callbacks=[GaccCallback()])`.

What the callback translates (Lightning 2.x, automatic optimization):
- K is `trainer.accumulate_grad_batches`, read at fit start and at each batch's start (so a
  GradientAccumulationScheduler works, wherever it is listed); gacc attaches to
  `trainer.strategy.model` (the DDP wrapper under strategy="ddp") and the torch optimizer under the
  LightningOptimizer.
- Lightning divides every micro-step's loss by K, also in the short last window of an epoch: gacc
  undoes it (loss_scale=1/K), so the optimizer sees the mean over the micro-batches actually run, as a
  run with one K-times larger batch would.
- The K-th backward runs inside optimizer.step(closure); gacc finishes the window inside the closure.
  A short window is finished in on_after_backward, so p.grad is final before on_before_optimizer_step
  and Lightning's gradient clipping.
- With precision="16-mixed", Lightning's GradScaler is handed to gacc (unscale and inf check fused).
- Clipping by norm (`gradient_clip_val`) is gacc's fp32 clip of p.grad and p.main_grad together.
- `GaccCallback(grad_stats=True)`: at each optimizer step the window's gradient noise scale goes to
  the module's logger through `pl_module.log_dict` (gacc/b_simple, gacc/b_simple_ema, gacc/g2,
  gacc/trace; see gacc_kernels.stats).
- The window in progress is saved with the checkpoint (the callback's state) and restored at fit start.
Refused: manual optimization, several optimizers, strategies that accumulate themselves (DeepSpeed),
FSDPStrategy (FSDP1; ModelParallelStrategy with fully_shard, FSDP2, works: Lightning's no-sync context
turns FSDP's gradient sync off and the core's FSDP2 no-sync mode takes each window), and a checkpoint taken
mid-window on more than one process (each rank's partial sums differ).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from ..accumulator import GradAccumulator
from ..attaching import attach

_FSDP1 = "FSDPStrategy"


class GaccCallback(pl.Callback):
    def __init__(self, bucket_bytes: int = 128 << 20, grad_stats: bool = False):
        self.bucket_bytes, self.grad_stats = bucket_bytes, grad_stats
        self.acc: GradAccumulator | None = None
        self._restore: dict[str, Any] | None = None  # a checkpoint's window, loaded before fit start

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("GaccCallback drives automatic optimization only; with manual optimization "
                               "call gacc_kernels.attach(model, optimizer, steps=K) yourself")
        if len(trainer.optimizers) != 1:
            raise RuntimeError("GaccCallback supports one optimizer, the module has "
                               f"{len(trainer.optimizers)}")
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise RuntimeError(f"the {type(trainer.strategy).__name__} strategy accumulates gradients "
                               "itself; remove GaccCallback")
        if type(trainer.strategy).__name__ == _FSDP1:
            raise RuntimeError(f"GaccCallback does not run under Lightning's {_FSDP1} (FSDP1), which shards "
                               "the grads before gacc could see them: use ModelParallelStrategy with "
                               "fully_shard in configure_model (FSDP2), or strategy='ddp'")
        k = trainer.accumulate_grad_batches
        acc = self.acc = attach(trainer.strategy.model, trainer.optimizers[0], steps=k,
                                scaler=getattr(trainer.precision_plugin, "scaler", None), loss_scale=1.0 / k,
                                bucket_bytes=self.bucket_bytes, reduction="mean", grad_stats=self.grad_stats)
        precision = trainer.precision_plugin
        original = precision.clip_grad_by_norm

        def clip_grad_by_norm(optimizer, clip_val):
            if acc.clip_for([p for g in optimizer.param_groups for p in g["params"]], clip_val) is None:
                original(optimizer, clip_val)
        acc.set_while_attached(precision, "clip_grad_by_norm", clip_grad_by_norm)

    def set_weight(self, weight: float) -> None:
        """The weight of the micro-step in progress (its token count, say), from training_step: the
        optimizer then sees the weighted mean over the window, sum(w g) / sum(w)."""
        if self.acc is None:
            raise RuntimeError("GaccCallback.set_weight() before fit started: call it from training_step")
        self.acc.set_weight(weight)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the Trainer's own lightning_module.zero_grad() at the start of the stage
        if self._restore is not None:
            self.acc.load_state_dict(self._restore)
            self._restore = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch,
                             batch_idx) -> None:
        # A GradientAccumulationScheduler sets K at an epoch's start, before or after this callback's
        # own epoch-start hook, depending on their order in callbacks=: read it at the batch instead.
        if self.acc is not None and self.acc.steps != trainer.accumulate_grad_batches:
            self.acc.remove()  # epochs end on an optimizer step: no window is in progress
            self._attach(trainer, pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fit_loop._should_accumulate():  # Lightning steps after this backward
            self.acc.finish_window()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.acc.finish_window()  # a no-op after on_after_backward; covers a step Lightning forces
        if self.grad_stats:
            pl_module.log_dict(self.acc.stats().metrics(), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        if self.acc is None:
            return {}
        state = self.acc.state_dict()
        if state["micro_steps"] and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise RuntimeError("a checkpoint in the middle of a gacc window on several processes cannot be "
                               "resumed exactly (each rank holds its own partial sums); save checkpoints at "
                               "optimizer steps (ModelCheckpoint(every_n_train_steps=...))")
        return {"gacc": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("gacc")
        if state is None:
            return
        if self.acc is None:
            self._restore = state  # Lightning restores callbacks before fit start
        else:
            self.acc.load_state_dict(state)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.acc is not None:
            self.acc.remove()
            self.acc = None
