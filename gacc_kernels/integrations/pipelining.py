"""torch.distributed.pipelining: `acc = gacc_kernels.integrations.pipelining.attach(schedule, optimizer)`, on
each rank, after building the rank's stage(s) and the schedule, and before the first `schedule.step()`:

    from gacc_kernels.integrations import pipelining as gacc_pp

    schedule = Schedule1F1B(stage, n_microbatches=M, loss_fn=loss_fn)   # or a list of stages per rank
    acc = gacc_pp.attach(schedule, optimizer, outer=1)
    for batch in loader:
        schedule.step(*inputs, target=y)    # inputs on the first stage's rank, target on the last's
        gacc_pp.clip_grad_norm_(acc, 1.0)   # optional: the global norm, over every stage of the pipeline
        optimizer.step()
        optimizer.zero_grad()

What it translates (torch 2.14's pipelining):
- FULL_BACKWARD schedules (GPipe, 1F1B, Interleaved1F1B, LoopedBFS): each micro-batch's backward of a
  stage is one `torch.autograd.backward` call (`stage_backward`), so gacc sees it as one micro-step.
- Zero-bubble schedules (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV, and any
  `_PipelineScheduleRuntime` with I/W actions): a micro-batch's I action (`autograd.grad` on the stage's
  inputs) accumulates no weight grad, and its W action sets `weight.grad = dw` by hand, which no hook sees
  (stage 0's W is a full backward, which they do see). gacc registers its own W action on the runtime
  (`register_custom_function`): the stock W, run inside `acc.grads_by_hand()`, so each W is one micro-step
  whose grads go through the fused fp32 accumulation. A custom W function registered before attach, or
  after it (checked at each forward of a stage), and a W inside an overlapped action, are refused.
- The window on a rank is `n_microbatches x stages on the rank x outer` micro-steps, read from the
  schedule (`schedule._n_microbatches`, `schedule._stage` or `schedule._stages`); `outer` is the number of
  `schedule.step()` calls per optimizer step when the loop accumulates over steps itself (default 1). A
  short window (an early `optimizer.step()`, a clip) is finished there, as in the core.
- DistributedDataParallel as a stage's submodule (one stage per rank): the schedule runs every forward
  under no_sync() and would call DDP's `reducer.prepare_for_backward` before the stage's last backward,
  turning DDP's reducer on behind gacc. gacc keeps every backward a non-last one (the stage's
  `backward_maybe_with_nosync`, called with last_backward=False while attached) and reduces the window
  over DDP's process group itself, once, averaging the ranks as DDP does.
- The schedule's `scale_grads` (its default True divides every p.grad by n_microbatches once per
  `step()`, after the backwards) is turned off while attached (`schedule.scale_grads = False`, restored by
  `acc.remove()`), and the 1/n_microbatches is folded into gacc's last pass (attach's `loss_scale`), so
  nothing is divided twice. The optimizer sees what the stock schedule gives (the sum of the micro-batches'
  grads, divided by n_microbatches where scale_grads=True), accumulated in fp32. With `outer > 1` and
  scale_grads=True, stock torch divides the *whole* p.grad at each step(), so the grads of the earlier
  step()s are divided again (n_microbatches^2, ...); gacc divides each micro-batch once: the result is
  sum over all outer x n_microbatches micro-batches / n_microbatches.
- Token weights: `attach(..., reduction="mean")`, a loss_fn that returns each micro-batch's mean over its
  own tokens, and `set_micro_batch_weights(acc, counts)` on every rank before each `schedule.step()` (the
  micro-batches' token counts, in order): the result is the window's token-weighted mean, over the
  micro-batches of every step() and the data-parallel ranks of a DDP stage, whatever scale_grads says.
  Each count is set on the accumulator before the backward that delivers that micro-batch's grads (a
  stage's `backward_one_chunk` with full_backward=True, wrapped while attached, or gacc's W action).
- FSDP2 (fully_shard) in a stage, FULL_BACKWARD schedules: the stage runs every micro-batch with FSDP's
  gradient sync off, so gacc's FSDP2 no-sync mode takes the window (fp32 sums of the unsharded grads, one
  reduce-scatter per bucket when the window closes); the schedule's REDUCE_GRAD post-backward then finds
  nothing left to reduce.
- One accumulator per rank. With one stage on the rank gacc attaches to its `stage.submod`; with several
  (interleaved and looped schedules, one optimizer over all chunks) to a container module holding the
  chunks (`acc.model`, parameters named `stage<i>.<name>`), whose forward hooks are run at each chunk's
  forward so that each backward is seen from its start, as for one model.
- `clip_grad_norm_(acc, max_norm, group=None)`: the L2 norm over every stage of the pipeline (each rank's
  fp32 norm from gacc's fused pass, the squares all-reduced over `group`, by default the stages' process
  group), then gacc's fp32 clip of p.grad and p.main_grad by that norm. `torch.nn.utils.clip_grad_norm_`
  over a rank's parameters clips by that rank's norm only, as in stock torch.
- A GradScaler: `attach(schedule, opt, scaler=scaler)` on every rank, the loss_fn returning
  `scaler.scale(loss)` on the last stage, `scaler.step(opt)` and `scaler.update()` on every rank. gacc makes
  the scale on the stages that never scale a loss (the same init_scale everywhere), unscales in its fused
  pass, and agrees found_inf over the stages (and a DDP stage's ranks) at unscale, outside the schedule:
  every stage skips the same steps and the scales stay equal.
- kwargs to the core's attach: `loss_scale=c` (the loss_fn multiplies each micro-batch's loss by c;
  combined with the schedule's scaling), `bucket_bytes`, `fuse_linear`.

Refused at attach, with what to do:
- schedules that run their micro-batches in their own way (not GPipe's, 1F1B's or the runtime's loop), a
  PipelineScheduleMulti with I/W actions, custom functions registered on the schedule, stages with a
  `dw_builder`, schedules with no loss_fn (no backward), and `fuse_linear=True` with I/W actions (not
  tried yet).
- DistributedDataParallel with several stages on a rank, or inside a stage's submodule (not the whole of
  it); FSDP1 and `replicate` in a stage; FSDP2 (fully_shard) with a zero-bubble schedule (its W action
  writes the unsharded weights' grads by hand, past gacc's hooks on them).
- `process_group=` / `comm_dtype=` (data parallel across pipelines without
  DDP: not yet), `steps=` and `window_end=` (read from the schedule).
"""
from __future__ import annotations

import inspect
import weakref

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import schedules as pp_schedules
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.nn.parallel import DistributedDataParallel

from ..accumulator import GradAccumulator
from ..attaching import ATTACHED
from ..attaching import attach as attach_core

FULL_BACKWARD_SCHEDULES = "ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B or ScheduleLoopedBFS"
SCHEDULES = (f"{FULL_BACKWARD_SCHEDULES}, or a zero-bubble schedule (ScheduleInterleavedZeroBubble, "
             "ScheduleZBVZeroBubble, ScheduleDualPipeV)")
_PASSED = ("loss_scale", "bucket_bytes", "fuse_linear", "scaler")
_REFUSED_KWARGS = {
    "steps": "the window is read from the schedule (n_microbatches x stages on this rank x outer)",
    "window_end": "the window is read from the schedule (n_microbatches x stages on this rank x outer)",
    "process_group": "data parallel across pipelines is not supported yet with pipelining",
    "comm_dtype": "data parallel across pipelines is not supported yet with pipelining",
}
_FORWARDING = "_gacc_forward_chunks"  # on the container while attached: its chunks run its forward hooks
_GROUPS: weakref.WeakKeyDictionary[GradAccumulator, object] = weakref.WeakKeyDictionary()
_WEIGHTS: weakref.WeakKeyDictionary[GradAccumulator, _Weights] = weakref.WeakKeyDictionary()
_CONTAINER_OF: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def attach(schedule, optimizer, outer: int = 1, **kwargs) -> GradAccumulator:
    """Enable gacc on this rank's stage(s) of a pipelining schedule (FULL_BACKWARD or zero-bubble).
    `optimizer`: the torch optimizer over this rank's stage(s) (or a list of them); `outer`: schedule.step()
    calls per optimizer step. kwargs: reduction ("sum": what the schedule's scale_grads gives; "mean": token
    weights, see set_micro_batch_weights), loss_scale, bucket_bytes, fuse_linear (see gacc_kernels.attach)."""
    if not isinstance(outer, int) or isinstance(outer, bool) or outer < 1:
        raise ValueError(f"outer must be an int >= 1 (schedule.step() calls per optimizer step), "
                         f"got {outer!r}")
    loss_scale = float(kwargs.pop("loss_scale", 1.0))
    reduction = kwargs.pop("reduction", "sum")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' (the schedule's scale_grads) or 'mean' (token weights), "
                         f"got {reduction!r}")
    for name in kwargs:
        if name in _REFUSED_KWARGS:
            raise ValueError(f"{name}= with pipelining.attach: {_REFUSED_KWARGS[name]}")
        if name not in _PASSED:
            raise TypeError(f"pipelining.attach() got an unexpected keyword argument {name!r}")
    stages = stages_of(schedule)
    modules = [stage.submod for stage in stages]
    for module in modules:
        container = _CONTAINER_OF.get(module)
        if module in ATTACHED or (container is not None and vars(container).get(_FORWARDING)):
            raise RuntimeError("gacc is already attached to a stage of this schedule; call acc.remove() "
                               "first")
    check_schedule(schedule)
    split = has_weight_actions(schedule)
    for stage in stages:
        check_stage(stage, several=len(stages) > 1, split=split)
    n = int(schedule._n_microbatches)  # private: the schedule's micro-batch count
    # "sum": the schedule's 1/n (scale_grads) in gacc's pass; "mean": the weights' total divides, which
    # counts each micro-batch once per stage on the rank, while a parameter gets it from its own stage
    scale = (n if schedule.scale_grads else 1) if reduction == "sum" else 1 / len(stages)
    model = modules[0] if len(modules) == 1 else _Chunks(stages)
    if split and kwargs.get("fuse_linear"):
        raise ValueError("fuse_linear=True with a schedule that splits backward into I and W actions has not "
                         "been tried yet; leave fuse_linear off (the default)")
    scaler = kwargs.get("scaler")
    if scaler is not None:  # found_inf agreed over the stages at unscale; the scale made on every stage
        kwargs["scaler_group"] = stages[0].group or dist.group.WORLD
        if scaler.is_enabled():
            scaler.scale(torch.zeros((), device=stages[0].device))  # the loss is scaled on the last only
    acc = attach_core(model, optimizer, steps=n * len(stages) * outer, loss_scale=loss_scale * scale,
                      reduction=reduction, **kwargs)
    try:
        acc.set_while_attached(schedule, "scale_grads", False)  # folded into loss_scale
        if len(modules) > 1:
            acc.set_while_attached(model, _FORWARDING, True)
            for module in modules:
                _forward_hooks_of(model, module)
                _CONTAINER_OF[module] = model
        for stage in stages:
            if isinstance(stage.submod, DistributedDataParallel):
                _keep_ddp_reducer_off(acc, stage)
        weights = _Weights(acc, n) if reduction == "mean" else None
        if weights is not None:
            _WEIGHTS[acc] = weights
            for stage in stages:
                weights.weigh_full_backwards(stage)
        if split:
            _run_weight_actions(acc, schedule, stages, n, weights)
    except BaseException:
        acc.remove()
        raise
    _GROUPS[acc] = stages[0].group
    return acc


def clip_grad_norm_(acc: GradAccumulator, max_norm: float, group=None) -> torch.Tensor:
    """Clip this rank's grads by the L2 norm over all stages of the pipeline, in fp32 (p.grad and p.main_grad
    alike), and return that norm. Every rank of `group` (default: the process group of the stages given to
    attach) must call it. Finishes a pending window first."""
    if group is None:
        group = _GROUPS.get(acc)
    local = acc.total_norm()
    sq = local.double().square().reshape(1)
    dist.all_reduce(sq, group=group)
    total = sq.sqrt().to(local.dtype).reshape(local.shape)
    return acc.clip_grad_norm_(max_norm, total_norm=total)


def set_micro_batch_weights(acc: GradAccumulator, weights) -> None:
    """The weights (token counts) of the next schedule.step()'s micro-batches, in micro-batch order, for
    attach(..., reduction="mean"): the window's result is then sum_k w_k g_k / sum_k w_k over every
    micro-batch of the window (of every step() of an outer loop, and over the data-parallel ranks of a
    DDP stage), where g_k is the grad of micro-batch k's loss, the mean over its own tokens. Call it on every
    rank of the pipeline before each schedule.step(), with the same weights."""
    owner = _WEIGHTS.get(acc)
    if owner is None:
        raise ValueError("set_micro_batch_weights() needs an accumulator from pipelining.attach(..., "
                         "reduction=\"mean\")")
    owner.set(weights)


class _Weights:
    """Each micro-batch's weight, set on the accumulator before the backward that delivers its grads: a
    stage's full backward (B, or stage 0's W), or its W action; its I action delivers none."""

    def __init__(self, acc: GradAccumulator, n: int):
        self.acc, self.n = acc, n
        self.weights: list[float] | None = None
        self.used: set[tuple[int, int]] = set()  # (stage index, micro-batch) since the weights were set

    def set(self, weights) -> None:
        weights = [float(w) for w in weights]
        if len(weights) != self.n:
            raise ValueError(f"set_micro_batch_weights() got {len(weights)} weights for {self.n} "
                             "micro-batches")
        self.weights, self.used = weights, set()

    def use(self, stage_index: int, microbatch: int) -> None:
        key = (stage_index, microbatch)
        if self.weights is None or key in self.used:
            raise RuntimeError("with reduction=\"mean\", call gacc_pp.set_micro_batch_weights(acc, weights) "
                               "before each schedule.step(), on every rank")
        self.used.add(key)
        self.acc.set_weight(self.weights[microbatch])

    def weigh_full_backwards(self, stage) -> None:
        """The stage's full backwards (backward_one_chunk, full_backward=True) weighted, until remove()."""
        backward = type(stage).backward_one_chunk

        def weighted(bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
            if full_backward:
                self.use(stage.stage_index, bwd_chunk_id)
            return backward(stage, bwd_chunk_id, loss=loss, full_backward=full_backward,
                            last_backward=last_backward)

        self.acc.set_while_attached(stage, "backward_one_chunk", weighted)


# -- what the schedule and its stages are ------------------------------------------------------------


def stages_of(schedule) -> list:
    """This rank's stages: schedule._stage (single-stage schedules) or schedule._stages."""
    if isinstance(schedule, pp_schedules.PipelineScheduleSingle):
        return [schedule._stage]  # private: the schedule's stage
    if isinstance(schedule, pp_schedules.PipelineScheduleMulti):
        return list(schedule._stages)  # private: the schedule's stages on this rank
    raise TypeError(f"pipelining.attach() takes a torch.distributed.pipelining schedule, got "
                    f"{type(schedule).__name__}")


def _refuse_run(name: str) -> ValueError:
    return ValueError(f"gacc does not support {name}: it runs its micro-batches in its own way, so gacc "
                      f"cannot tell where each backward's grads go. Use {SCHEDULES}")


def check_schedule(schedule) -> None:
    """A schedule whose backwards gacc sees: full torch.autograd.backward calls, and W actions that the
    runtime runs through the custom function gacc registers."""
    name = type(schedule).__name__
    if schedule._loss_fn is None:  # private: the schedule's loss_fn (None: forward only)
        raise ValueError(f"this {name} has no loss_fn, so it runs no backward: nothing to accumulate")
    run = type(schedule)._step_microbatches
    if isinstance(schedule, pp_schedules.PipelineScheduleSingle):
        if run not in (pp_schedules.ScheduleGPipe._step_microbatches,
                       pp_schedules.Schedule1F1B._step_microbatches):
            raise _refuse_run(name)
        return
    if run is pp_schedules.PipelineScheduleMulti._step_microbatches:
        if _actions(schedule, "pipeline_order", split=True):
            raise _refuse_run(f"this {name} (a PipelineScheduleMulti with I/W actions)")
        return
    if run is not pp_schedules._PipelineScheduleRuntime._step_microbatches:
        raise _refuse_run(name)
    # what gacc's W action and its token weights call on the runtime and its stages
    calls = {"backward_weight_one_chunk": "last_backward", "backward_one_chunk": "full_backward"}
    if has_weight_actions(schedule) and (
            not hasattr(schedule, "register_custom_function") or not hasattr(schedule, "backward_counter")
            or any(arg not in inspect.signature(getattr(_PipelineStageBase, method)).parameters
                   for method, arg in calls.items())):
        raise ValueError(f"gacc runs the W actions of {name} through register_custom_function, "
                         "backward_counter and the stages' backward_weight_one_chunk(last_backward=) and "
                         f"backward_one_chunk(full_backward=), which this torch {torch.__version__} lacks; "
                         f"use a newer torch or a FULL_BACKWARD schedule ({FULL_BACKWARD_SCHEDULES})")
    if getattr(schedule, "_comp_type_to_function_map", None):  # private: custom functions per action type
        raise ValueError(f"gacc does not support a {name} with custom functions registered "
                         "(register_custom_function): it cannot tell what they do with the grads")
    for action in _actions(schedule, "pipeline_order_with_comms", split=False):
        if any(a.computation_type is pp_schedules.BACKWARD_WEIGHT for a in action.sub_actions or ()):
            raise _refuse_run(f"this {name} (a W action inside an overlapped action, which the runtime runs "
                              "past the custom function gacc registers for W)")


def has_weight_actions(schedule) -> bool:
    """A runtime schedule with W actions (zero-bubble): gacc runs them (_run_weight_actions)."""
    return isinstance(schedule, pp_schedules._PipelineScheduleRuntime) and any(
        a.computation_type is pp_schedules.BACKWARD_WEIGHT
        for a in _actions(schedule, "pipeline_order_with_comms", split=True))


def _actions(schedule, order: str, split: bool) -> list:
    """The actions of the schedule's order (all ranks); split: only the I/W/overlapped ones."""
    kinds = (pp_schedules.BACKWARD_INPUT, pp_schedules.BACKWARD_WEIGHT, pp_schedules.OVERLAP_F_B)
    found = []
    for actions in (getattr(schedule, order, None) or {}).values():
        for action in actions:
            if action is not None and (not split or any(
                    a.computation_type in kinds for a in [action, *(action.sub_actions or ())])):
                found.append(action)
    return found


def check_stage(stage, several: bool, split: bool) -> None:
    if not isinstance(stage, _PipelineStageBase):
        raise TypeError(f"the schedule's stage is a {type(stage).__name__}, not a pipelining stage")
    if stage.dw_builder is not None:
        raise ValueError(f"stage {stage.stage_index} has a dw_builder: its weight grads are made by a "
                         "runner of its own, not through autograd's accumulation, so gacc cannot see them. "
                         "Build the stage without dw_builder")
    for m in stage.submod.modules():
        if isinstance(m, DistributedDataParallel) and (several or m is not stage.submod):
            raise ValueError(
                f"stage {stage.stage_index}'s submodule holds DistributedDataParallel "
                + ("with several stages on this rank" if several else "inside it") + ", which gacc does not "
                "support under pipelining yet. Wrap the stage's whole submodule in DDP, one stage per rank "
                "(ScheduleGPipe, Schedule1F1B), or use stock pipelining with DDP")
        if isinstance(m, DistributedDataParallel) and "last_backward" not in inspect.signature(
                type(stage).backward_maybe_with_nosync).parameters:
            raise ValueError(f"gacc keeps DDP's reducer off through the stage's backward_maybe_with_nosync("
                             f"last_backward=), which this torch {torch.__version__} lacks; use stock "
                             "pipelining with DDP")
        fsdp = isinstance(m, FSDPModule) or type(m).__name__ == "FullyShardedDataParallel"
        if fsdp and (split or type(m).__name__ in ("FullyShardedDataParallel", "ReplicateModule")):
            raise ValueError(
                f"stage {stage.stage_index}'s submodule holds {type(m).__name__}, which gacc does not support "
                "under pipelining yet: FSDP2 (fully_shard) works in FULL_BACKWARD schedules "
                f"({FULL_BACKWARD_SCHEDULES}), whose micro-batches run with gradient sync off (gacc's FSDP2 "
                "no-sync mode); a zero-bubble W action writes the unsharded weights' grads by hand, past "
                "gacc's hooks on them. Use a FULL_BACKWARD schedule, or stock pipelining")


# -- zero-bubble: the W actions through gacc -------------------------------------------------------


def _run_weight_actions(acc: GradAccumulator, schedule, stages: list, n: int,
                        weights: _Weights | None) -> None:
    """Each W action (a stage's weight grads of one micro-batch) as one gacc micro-step. The runtime's own W
    sets weight.grad = dw by hand (stage 0's runs a full backward), which no hook sees; gacc's runs the
    same W inside acc.grads_by_hand(), which takes what it writes. Registered through the runtime's
    register_custom_function on a copy of its (empty) function map, which remove() puts back."""
    by_index = {stage.stage_index: stage for stage in stages}

    def weight_action(action, ctx) -> None:
        # what the runtime's own W action does (torch 2.14): count the stage's backwards (DDP and FSDP sync
        # at its n-th), then the stage's weight backward of the micro-batch
        counter, i = schedule.backward_counter, action.stage_index
        counter[i] += 1
        if weights is not None:
            weights.use(i, action.microbatch_index)
        with acc.grads_by_hand():
            by_index[i].backward_weight_one_chunk(action.microbatch_index, last_backward=counter[i] == n)

    functions = schedule._comp_type_to_function_map  # private: the runtime's custom functions
    acc.set_while_attached(schedule, "_comp_type_to_function_map", dict(functions))
    schedule.register_custom_function(pp_schedules.BACKWARD_WEIGHT, weight_action)
    for stage in stages:
        _refuse_other_weight_action(acc, schedule, stage.submod, weight_action)


def _refuse_other_weight_action(acc: GradAccumulator, schedule, module: torch.nn.Module, mine) -> None:
    """At each forward of the stage: gacc's W action is still the schedule's (another registered after
    attach would set weight.grad where gacc never looks). The hook removes itself after acc.remove()."""
    acc_ref, schedule_ref = weakref.ref(acc), weakref.ref(schedule)

    def hook(module, args):
        owner, sched = acc_ref(), schedule_ref()
        if owner is None or sched is None or ATTACHED.get(owner.model) is not owner:
            handle.remove()
            return
        # private: the runtime's custom functions, as above
        if sched._comp_type_to_function_map.get(pp_schedules.BACKWARD_WEIGHT) is not mine:
            raise RuntimeError("a custom function for W actions was registered on the schedule after "
                               "gacc's pipelining.attach(); gacc's own runs each W as a micro-step. Call "
                               "acc.remove() first, or leave W to gacc")

    handle = module.register_forward_pre_hook(hook)


# -- DDP inside a stage ------------------------------------------------------------------------------


def _keep_ddp_reducer_off(acc: GradAccumulator, stage) -> None:
    """The schedule calls DDP's reducer.prepare_for_backward itself before the stage's last backward
    (last_backward=True), which would run DDP's all-reduce behind gacc, on grads gacc has taken (zeros).
    gacc reduces the window over DDP's process group itself, as for any DDP model, so every backward of
    the stage runs as a non-last one (under no_sync()), until remove()."""
    backward = type(stage).backward_maybe_with_nosync

    def without_ddp_sync(backward_type, bwd_kwargs, last_backward=False):
        return backward(stage, backward_type, bwd_kwargs, last_backward=False)

    acc.set_while_attached(stage, "backward_maybe_with_nosync", without_ddp_sync)


# -- several stages on one rank: one accumulator over their chunks --------------------------------------


class _Chunks(torch.nn.Module):
    """The chunks of this rank's stages, for one accumulator over them (one optimizer over all). Never
    called: the schedule runs each chunk, and each chunk's forward runs this module's forward hooks."""

    def __init__(self, stages: list):
        super().__init__()
        for stage in stages:
            self.add_module(f"stage{stage.stage_index}", stage.submod)

    def forward(self, *args, **kwargs):
        raise RuntimeError("this holds the pipeline stages' chunks for gacc; the schedule runs each chunk")


def _forward_hooks_of(container: torch.nn.Module, chunk: torch.nn.Module) -> None:
    """After each forward of the chunk, run the container's forward hooks (gacc's, which hook the outputs
    to see each backward start) on its output; the hook removes itself once the accumulator is removed.
    A copy of the chunk (deepcopy keeps hooks) runs none."""
    container_ref, chunk_ref = weakref.ref(container), weakref.ref(chunk)

    def hook(module, args, output):
        owner = container_ref()
        if owner is None or not vars(owner).get(_FORWARDING):
            handle.remove()
            return
        if module is not chunk_ref():
            return
        # private: Module._forward_hooks, the container's forward hooks (only gacc's capture hooks it)
        for forward_hook in tuple(owner._forward_hooks.values()):
            forward_hook(owner, args, output)

    handle = chunk.register_forward_hook(hook)
