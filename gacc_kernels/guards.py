"""Guards: what gacc refuses, and the checks that find it. At attach: the arguments, the model's layers
and wrappers, the parameters to manage. At each backward and step: the parameters are still the objects,
dtypes and devices gacc laid out, and the optimizer steps only parameters gacc manages."""
from __future__ import annotations

import operator
import warnings

import torch

from .distributed.fsdp2 import fsdp2_modules

REPLACED = (
    "the model's parameters were replaced after attach() (model.to_empty(), load_state_dict(assign=True), "
    "a quantization swap, .to() another device), so gacc no longer sees their gradients as they are. "
    "Call acc.remove() before replacing them and attach() after.")


def check_arguments(optimizer, reduction: str, loss_scale: float) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not (0.0 < loss_scale < float("inf")):
        raise ValueError(f"loss_scale must be finite and > 0, got {loss_scale}")
    wrapped = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(wrapped, torch.optim.Optimizer):
        raise TypeError(
            f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}, a framework's wrapper. The "
            "framework also scales the loss and decides when to step, so use its integration in "
            "gacc_kernels.integrations; in a loop of your own, attach the torch optimizer it wraps, with "
            "loss_scale=1/K if the loss is divided by K.")


def check_model(model: torch.nn.Module) -> None:
    """Refuse the layers and wrappers gacc cannot be exact under (yet)."""
    for m in model.modules():
        if getattr(m, "sparse", False) is True:
            raise ValueError(f"{type(m).__name__} produces sparse gradients, which gacc cannot accumulate; "
                             "construct it with sparse=False")
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            warnings.warn("the model has BatchNorm layers: their statistics are computed per micro-batch, "
                          "not per optimizer step (use GroupNorm/LayerNorm or larger micro-batches)",
                          stacklevel=3)
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
    if {p.device_mesh.ndim for _, p in trainable} != {1}:
        raise ValueError("gacc supports FSDP2 on a 1-D device mesh only (not HSDP, nor FSDP with tensor "
                         "parallelism)")


def managed_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters to manage: the model's trainable ones."""
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


class Guards:
    """The parameters as attach() laid them out, checked at each backward and step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.model, self.optimizer, self.params = model, optimizer, params
        owner = {id(p): (m._parameters, n) for m in model.modules() for n, p in m._parameters.items()
                 if p is not None}
        self._held_in = [owner[id(p)] for p in params]  # (its module's _parameters, its name) for each
        self._n_opt_params = sum(len(g["params"]) for g in optimizer.param_groups)

    def check_not_replaced(self) -> None:
        """Each parameter is still the object its module holds (checked at each backward and step)."""
        if any(map(operator.is_not, (d.get(n) for d, n in self._held_in), self.params)):
            raise RuntimeError(REPLACED)

    def check_at_step(self) -> None:
        self.check_not_replaced()
        n_model = sum(1 for p in self.model.parameters() if p.requires_grad)
        n_opt = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n_model != len(self.params) or n_opt != self._n_opt_params:
            raise RuntimeError("parameters were added after attach(); call acc.remove() and attach() again")


def refuse_grad(slot, g: torch.Tensor) -> None:
    if g.layout != torch.strided:
        raise RuntimeError(f"gacc got a sparse gradient ({g.layout}) for a parameter of shape "
                           f"{tuple(slot.param.shape)}; sparse gradients are not supported")
    raise RuntimeError(f"a parameter of shape {tuple(slot.param.shape)} on {slot.buffer.device} got a grad of "
                       f"shape {tuple(g.shape)} on {g.device}. " + REPLACED)
