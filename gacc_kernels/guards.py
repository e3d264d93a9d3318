"""Guards: what gacc refuses, and the checks that find it. At attach: the arguments, the model's layers
and wrappers, the parameters to manage. At each backward and step: the parameters are still the objects,
dtypes and devices gacc laid out, and the optimizer steps only parameters gacc manages."""
from __future__ import annotations

import operator
import warnings

import torch

from .distributed.fsdp2 import fsdp2_modules
from .kernels.reference import GRAD_DTYPES

REPLACED = (
    "the model's parameters were replaced after attach() (model.to_empty(), load_state_dict(assign=True), "
    "a quantization swap, .to() another device), so gacc no longer sees their gradients as they are. "
    "Call acc.remove() before replacing them and attach() after.")


def optimizers_of(optimizer) -> list[torch.optim.Optimizer]:
    """attach()'s optimizer argument: one torch optimizer, or a list of them over parts of the model."""
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not optimizers:
        raise ValueError("attach() needs at least one optimizer")
    for opt in optimizers:
        wrapped = getattr(opt, "optimizer", None)
        if not isinstance(opt, torch.optim.Optimizer) or isinstance(wrapped, torch.optim.Optimizer):
            raise TypeError(
                f"attach() takes torch.optim.Optimizer objects, got {type(opt).__name__}, a framework's "
                "wrapper. The framework also decides when to step and how the loss is scaled, so use its "
                "integration: gacc_kernels.integrations.transformers (HF Trainer), "
                "gacc_kernels.integrations.accelerate, gacc_kernels.integrations.lightning (Trainer) or "
                "gacc_kernels.integrations.fabric (Lightning Fabric). In a loop of your own, attach the "
                "torch optimizer it wraps (wrapper.optimizer).")
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError("attach() was given the same optimizer twice")
    return optimizers


def check_arguments(reduction: str, loss_scale: float) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not (0.0 < loss_scale < float("inf")):
        raise ValueError(f"loss_scale must be finite and > 0, got {loss_scale}")


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
            raise ValueError("gacc does not run under the DeepSpeed engine, which accumulates, reduces and "
                             "scales gradients itself. DeepSpeed accumulates in data_types.grad_accum_dtype, "
                             "which defaults to the model's dtype (bf16 under bf16): for fp32 accumulation "
                             'set "data_types": {"grad_accum_dtype": "fp32"} in its config, without gacc')
        if type(m).__name__ == "FullyShardedDataParallel":
            raise ValueError("gacc does not support FSDP1 (FullyShardedDataParallel): it reduce-scatters and "
                             "shards the grads before any hook of gacc's could see them; use FSDP2 "
                             "(torch.distributed.fsdp.fully_shard) or DDP")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sharded = [n for n, p in trainable if type(p).__name__ == "DTensor"]
    if not sharded:
        return
    if not fsdp2_modules(model):  # tensor parallelism: one 1-D mesh, each parameter sharded or replicated
        dtensors = [p for _, p in trainable if type(p).__name__ == "DTensor"]
        if len({id(p.device_mesh) for p in dtensors}) != 1 or dtensors[0].device_mesh.ndim != 1:
            raise ValueError(f"gacc supports DTensor parameters outside FSDP2 (tensor parallelism) on one 1-D "
                             f"mesh only; {sharded[0]} is on another or a larger one")
        placements = {type(pl).__name__ for p in dtensors for pl in p.placements}
        if not placements <= {"Shard", "Replicate"}:
            raise ValueError(f"gacc supports DTensor parameters that are sharded or replicated, found "
                             f"{sorted(placements - {'Shard', 'Replicate'})[0]}")
        return
    plain = [n for n, p in trainable if type(p).__name__ != "DTensor"]
    if plain:
        raise ValueError(f"under FSDP2 every trainable parameter must be sharded, but {plain[0]} is not "
                         "(its grads would not be reduced over the ranks): call fully_shard on the root "
                         "module too")
    # 1-D FSDP; HSDP (replicate, shard); FSDP over tensor parallelism (dp, tp), where FSDP shards the tp
    # shards (_StridedShard where both split one dimension)
    fsdp_tp = {(2, (dp, tp)) for dp in ("Shard", "_StridedShard") for tp in ("Shard", "Replicate")}
    meshes = {(p.device_mesh.ndim, tuple(type(pl).__name__ for pl in p.placements)) for _, p in trainable}
    if not (meshes <= {(1, ("Shard",)), (2, ("Replicate", "Shard"))} or meshes <= fsdp_tp):
        raise ValueError(f"gacc supports FSDP2 on a 1-D mesh, HSDP on a (replicate, shard) mesh and FSDP2 over "
                         f"tensor parallelism on a (dp, tp) mesh; found DTensor parameters placed as "
                         f"{sorted(meshes)[0][1]}")


def managed_parameters(model: torch.nn.Module,
                       optimizers: list[torch.optim.Optimizer]) -> list[torch.nn.Parameter]:
    """The parameters to manage: the model's trainable ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    meta = [n for n, p in model.named_parameters() if p.requires_grad and p.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} parameters are on the meta device ({meta[0]}, ...): materialize the "
                         "model first (model.to_empty(device=...) and load or initialize the weights), "
                         "then attach()")
    odd = [(n, p.dtype) for n, p in model.named_parameters()
           if p.requires_grad and p.dtype not in GRAD_DTYPES]
    if odd:
        raise ValueError(f"parameter {odd[0][0]} is {odd[0][1]}: gacc accumulates float32, bfloat16 and "
                         "float16 grads in fp32, and autograd already accumulates this dtype at its own "
                         "precision. Train it without gacc, or in one of those dtypes")
    managed = {id(p) for p in params}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}  # never get a grad (LoRA's base)
    for opt in optimizers:
        if any(id(p) not in managed and id(p) not in frozen
               for group in opt.param_groups for p in group["params"]):
            raise ValueError("the optimizer holds a parameter that is not a parameter of the model; attach() "
                             "manages the model's parameters only")
    shared = [n for n, p in model.named_parameters() if p.requires_grad and
              sum(any(q is p for g in o.param_groups for q in g["params"]) for o in optimizers) > 1]
    if shared:
        raise ValueError(f"parameter {shared[0]} is in more than one of the optimizers given to attach(); "
                         "each parameter may be stepped by one optimizer")
    odd = [n for n, p in model.named_parameters()
           if p.requires_grad and getattr(p, "grad_dtype", p.dtype) != p.dtype]
    if odd:
        raise ValueError(f"parameter {odd[0]} has grad_dtype set to another dtype than its own: autograd "
                         "then makes its grads in that dtype, and gacc already accumulates in fp32. Leave "
                         "grad_dtype unset (p.grad_dtype = None) and attach() again")
    return params


class Guards:
    """The parameters as attach() laid them out, checked at each backward and step."""

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                 params: list[torch.nn.Parameter]):
        self.model, self.optimizers, self.params = model, optimizers, params
        # private: Module._parameters, the dict a module's parameter attributes live in
        owner = {id(p): (m._parameters, n) for m in model.modules() for n, p in m._parameters.items()
                 if p is not None}
        self._held_in = [owner[id(p)] for p in params]  # (its module's _parameters, its name) for each
        self._managed = {id(p) for p in params}
        self._names = {id(p): n for n, p in model.named_parameters()}
        # frozen at attach: a grad for one would be summed by autograd, outside gacc
        self._frozen = [p for p in model.parameters() if not p.requires_grad]
        self._counts = self._optimizer_counts()

    def _optimizer_counts(self) -> list[int]:
        return [sum(len(g["params"]) for g in o.param_groups) for o in self.optimizers]

    def name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"of shape {tuple(p.shape)}")

    def check_not_replaced(self) -> None:
        """Each parameter is still the object its module holds."""
        if any(map(operator.is_not, (d.get(n) for d, n in self._held_in), self.params)):
            raise RuntimeError(REPLACED)

    def check_trainable(self) -> None:
        """Every parameter that will get a grad, or that an optimizer steps, is one gacc manages; checked
        as sets, before any grad of the backward reaches autograd's own accumulation."""
        unfrozen = [p for p in self._frozen if p.requires_grad]
        if unfrozen:
            raise RuntimeError(
                f"parameter {self.name(unfrozen[0])} was frozen at attach() and now requires grad: gacc "
                "has no slot for it, so autograd would sum its grads unscaled, outside the window. Change "
                "which parameters train between windows with acc.remove() before and attach() after "
                "(freezing a managed parameter needs nothing).")
        counts = self._optimizer_counts()
        if counts != self._counts:
            for o in self.optimizers:
                for p in (p for g in o.param_groups for p in g["params"]):
                    if p.requires_grad and id(p) not in self._managed:
                        raise RuntimeError(
                            f"optimizer {type(o).__name__} now steps parameter {self.name(p)}, which gacc "
                            "does not manage (optimizer.add_param_group after attach()): its grads would be "
                            "summed by autograd, unscaled. Call optimizer.zero_grad() to discard this "
                            "window, then acc.remove(), add the parameters, and attach() again.")
            self._counts = counts

    def check_before_backward(self, sharded: bool) -> None:
        if not sharded:  # FSDP2 holds unsharded parameters during forward and backward
            self.check_not_replaced()
        self.check_trainable()

    def check_at_step(self) -> None:
        self.check_not_replaced()
        self.check_trainable()


def refuse_grad(slot, g: torch.Tensor) -> None:
    """A grad gacc cannot take: sparse, or not the parameter's as laid out at attach()."""
    if g.layout != torch.strided:
        raise RuntimeError(f"gacc got a sparse gradient ({g.layout}) for a parameter of shape "
                           f"{tuple(slot.param.shape)}; sparse gradients are not supported")
    raise RuntimeError(f"a parameter of shape {tuple(slot.param.shape)} on {slot.buffer.device} got a "
                       f"grad of shape {tuple(g.shape)} on {g.device}. " + REPLACED)
