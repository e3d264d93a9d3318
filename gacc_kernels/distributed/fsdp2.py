"""FSDP2 (fully_shard): gacc accumulates the shards that FSDP hands its hooks after each reduce-scatter
(gradient sync on), or FSDP's unsharded grads, reduce-scattered once per window (sync off).

FSDP's own settings go through its public setters (FSDPModule.set_gradient_divide_factor,
set_force_sum_reduction_for_comms); a torch without them is refused, since FSDP would then average
the ranks and gacc would divide again. FSDP has no public way to hand over its unsharded grads, so the
no-sync mode reads private state, all of it in this module: each module's parameter groups
(`_param_groups`), their sync flag (`reduce_grads`) and FSDPParams (`_fsdp_params`), and each
FSDPParam's unsharded parameter (`_unsharded_param`), checked at attach (`check_private_state`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..kernels import ops
from ..kernels.reference import CHUNK
from ..layout import DeviceBuffer, Slot
from .reducer import LocalReducer, RanksDisagree
from .tp import sq_norm_counted_once

# torch 2.14 renamed reduce_scatter_tensor (deprecated there); 2.11 has only the old name
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_SETTERS = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms")


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that fully_shard (FSDP2) manages."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(module) -> list:
    # private: FSDPState's parameter groups (one per module before torch 2.12, several after)
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _current_settings(module) -> tuple:
    """The module's divide factor and sum-only flag now (private fields of its parameter groups)."""
    groups = _param_groups(module)
    if not groups:
        return None, False
    return groups[0].gradient_divide_factor, groups[0].force_sum_reduction_for_comms


class ShardedReducer(LocalReducer):
    """FSDP2, in one of two modes, chosen by each window's first micro-step (FSDP's gradient sync flag).

    Sync on (FSDP reduce-scatters every micro-step): FSDP hands gacc this rank's shard through the
    post-accumulate-grad hooks it calls after the reduce-scatter. gacc has FSDP sum instead of average
    (gradient divide factor 1, plain SUM) and accumulates the shards in fp32. A micro-step's weight then
    multiplies the ranks' sum, so it must be the same on every rank: checked at the end of each window.

    Sync off (`set_requires_gradient_sync(False)`, the no-sync mode of Accelerate, the HF Trainer and
    Fabric): gacc takes each micro-step's unsharded grad from FSDP's unsharded parameter before FSDP sees
    it, and adds it, weighted, into fp32 sums laid out per bucket of the sharded buffer as `shards` rows
    (row r holds rank r's rows of the bucket's parameters: 4 bytes per parameter, allocated at the
    bucket's first grad in the window). FSDP finds no grad and reduces nothing. At the window's end (its
    K-th micro-step, or the loop turning sync back on) one fp32 reduce-scatter per bucket lands the ranks'
    sums in the sharded buffer, and frees them. Each rank's micro-steps may carry their own weights here:
    they are applied before the sum.
    """
    fuses_last_pass = False

    def __init__(self, model: torch.nn.Module, window, buffer: DeviceBuffer, undo: contextlib.ExitStack):
        self.window, self.buffer = window, buffer
        modules = fsdp2_modules(model)
        missing = [name for name in _SETTERS if not hasattr(modules[0], name)]
        if missing:
            raise RuntimeError(f"this torch ({torch.__version__}) has no FSDPModule.{missing[0]}: gacc "
                               "cannot make FSDP2 sum the ranks' grads, and would divide them twice. Use "
                               "torch >= 2.9")
        self.groups = [g for m in modules for g in _param_groups(m)]
        check_private_state(self.groups)
        first = next(p for p in model.parameters() if hasattr(p, "device_mesh"))
        mesh = first.device_mesh
        # 1-D: one group. HSDP, a (replicate, shard) mesh: reduce-scatter within the shard group, all-reduce
        # over the replicas. FSDP over tensor parallelism, a (dp, tp) mesh: reduce-scatter within the dp
        # group; the tp ranks see the same data, hold other parts of each parameter, and sum nothing.
        self.hsdp = mesh.ndim == 2 and first.placements[0].is_replicate()
        self.tp = mesh.ndim == 2 and not self.hsdp
        fsdp_dim = 0 if self.tp else mesh.ndim - 1
        self.shard_group, self.shards = mesh.get_group(fsdp_dim), mesh.size(fsdp_dim)
        self.replicas = mesh.get_group(0) if self.hsdp else None
        if mesh.ndim == 2 and mesh.size() != dist.get_world_size():
            raise ValueError(f"gacc supports a 2-D FSDP2 mesh of every rank ({dist.get_world_size()}), not "
                             f"of {mesh.size()}")
        # the ranks whose data differ: the window's flags and weights are agreed over them, and they average
        self.group = None if self.hsdp else self.shard_group
        self.world = self.ranks = self.shards if self.tp else mesh.size()
        self.everyone = self.shard_group if mesh.ndim == 1 else None  # found_inf is agreed over them
        self.tp_size = mesh.size(1) if self.tp else 1
        self.tp_copies = [s for s in buffer.slots if self.tp and s.param.placements[1].is_replicate()]
        for m in modules:  # a plain SUM (gloo has no PREMUL_SUM), then a division by 1
            factor, sum_only = _current_settings(m)
            undo.callback(m.set_gradient_divide_factor, factor)
            undo.callback(m.set_force_sum_reduction_for_comms, sum_only)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        self.no_sync = False  # this window's grads come unsharded, to gacc
        # In a no-sync window, per bucket of the sharded buffer: the (shards, bucket length) fp32 sums, row r
        # rank r's rows of the bucket's parameters, and their stat partials (with grad_stats, stats.py).
        # A bucket's are allocated at its first grad and freed after its reduce-scatter.
        self.unsharded: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.bucket_of = {id(s): i for i, b in enumerate(buffer.buckets) for s in b.slots}
        self.cuts = {id(s): s.param.placements[fsdp_dim].dim for s in buffer.slots}  # the dim FSDP shards
        managed = {id(s.param): s for s in buffer.slots}
        # the FSDPParams of managed parameters whose unsharded parameter gacc has not hooked yet
        self.unhooked = [(managed[id(p.sharded_param)], p) for p in _fsdp_params(self.groups)
                         if id(p.sharded_param) in managed]

    # -- the mode, from FSDP's gradient sync flag ----------------------------------------------------

    def _sync(self) -> bool:
        """FSDP reduces this micro-step's grads over every rank. Under HSDP, set_requires_all_reduce(False)
        counts as sync off: gacc takes the grads then too, and all-reduces the replicas once per window."""
        flags = {g.reduce_grads and (g.all_reduce_grads or not self.hsdp) for g in self.groups}
        if len(flags) > 1:
            raise RuntimeError("FSDP2 gradient sync (or HSDP's all-reduce) is on for some modules and off "
                               "for others: gacc needs one setting for the whole model. Call "
                               "set_requires_gradient_sync / set_requires_all_reduce on the root module "
                               "(it sets every submodule)")
        return flags.pop()

    def before_backward(self, first: bool) -> None:
        sync = self._sync()
        if first:
            self.no_sync = not sync
        elif not sync and not self.no_sync:
            raise RuntimeError(
                "FSDP2 gradient sync was turned off (set_requires_gradient_sync(False)) after this window's "
                "first micro-step had run with it on: gacc cannot add FSDP's reduced shards and its own "
                "unsharded sums into one window. Turn sync off from the window's first micro-step to its "
                "last but one (as Accelerate, the HF Trainer and Fabric do), or leave it on throughout")

    def sync_ends_window(self) -> bool:
        """A window signal: in a no-sync window, the loop turning sync back on marks its last micro-step."""
        return self.no_sync and self._sync()

    def unsharded_params(self) -> list[tuple[Slot, torch.nn.Parameter]]:
        """FSDP's unsharded parameters not hooked yet, with their slots. FSDP makes them at its first
        all-gather and keeps them; once all are reported this costs nothing."""
        found = [(slot, p._unsharded_param) for slot, p in self.unhooked  # private: the unsharded parameter
                 if getattr(p, "_unsharded_param", None) is not None]
        if found:
            self.unhooked = [(slot, p) for slot, p in self.unhooked
                             if getattr(p, "_unsharded_param", None) is None]
        return found

    def takes_unsharded(self) -> bool:
        return self.no_sync

    def accumulate_unsharded(self, slot: Slot, grad: torch.Tensor, store: bool, weight: float) -> None:
        """Add a micro-step's whole grad, weighted, into every rank's copy of the slot (store: the window's
        first grad of it)."""
        index = self.bucket_of[id(slot)]
        if index not in self.unsharded:
            bucket, device = self.buffer.buckets[index], self.buffer.device
            length = bucket.end - bucket.begin
            stats = (None if self.buffer.stat_partials is None
                     else torch.zeros(self.shards, length // CHUNK, dtype=torch.float32, device=device))
            self.unsharded[index] = torch.zeros(self.shards, length, device=device), stats
        sums, stats = self.unsharded[index]
        begin = slot.start - self.buffer.buckets[index].begin
        dim = self.cuts[id(slot)]
        size = grad.shape[dim]
        rows = -(-size // self.shards)  # torch.chunk's split, as FSDP's
        pieces = [grad.narrow(dim, r * rows, min(rows, size - r * rows)).contiguous().view(-1)
                  for r in range(self.shards) if r * rows < size]
        offsets = [r * sums.shape[1] + begin for r in range(len(pieces))]
        ops.accumulate_many_(sums.view(-1), pieces, offsets, [store] * len(pieces), weight,
                             None if stats is None else stats.view(-1))

    # -- the window's end ----------------------------------------------------------------------------

    def finish(self, buffers, written, weight_sum):
        (buffer,) = buffers
        steps, weights = self.window.steps, self.window.weights
        if self.no_sync:
            return self._finish_unsharded(buffer, written, weight_sum)
        padded = weights + [0.0] * (steps - len(weights))
        t = torch.tensor([len(weights), *padded, *(-w for w in padded), *written], dtype=torch.float64,
                         device=buffer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        got = t.tolist()
        if got[0] != len(weights) or got[1: steps + 1] != [-w for w in got[steps + 1: 2 * steps + 1]]:
            raise RanksDisagree(
                f"under FSDP2 every rank must run the same micro-steps with the same weights (this rank: "
                f"{weights}); FSDP sums the ranks' grads before gacc sees them, so a per-rank weight "
                "cannot be applied. Weigh each rank's loss yourself and attach with reduction='sum', or "
                "accumulate with gradient sync off (set_requires_gradient_sync(False)), where each rank's "
                "weights are applied before the sum.")
        return [bool(f) for f in got[2 * steps + 1:]], weight_sum * self.world

    def _finish_unsharded(self, buffer: DeviceBuffer, written: list[bool], weight_sum: float):
        """One fp32 reduce-scatter per bucket of the window's sums into the sharded buffer, each freed after
        it (and, under HSDP, one all-reduce of the buffer over the replicas); the total weight and which
        slots any rank wrote, summed over the ranks."""
        count = len(self.window.weights)
        t = torch.tensor([count, weight_sum, *written], dtype=torch.float64, device=buffer.device)
        dist.all_reduce(t, group=self.group)
        wrote = {id(s) for s, w in zip(buffer.slots, written) if w}
        for index, bucket in enumerate(buffer.buckets):
            sums, stats = self.unsharded.pop(index, (None, None))
            if sums is None:
                sums = torch.zeros(self.shards, bucket.end - bucket.begin, device=buffer.device)
            for slot in bucket.slots:
                if id(slot) not in wrote:  # values of an earlier window (or discarded by zero_grad)
                    begin = slot.start - bucket.begin
                    sums[:, begin: begin + slot.span].zero_()
                    if stats is not None:
                        stats[:, begin // CHUNK: (begin + slot.span) // CHUNK].zero_()
            if buffer.stat_partials is not None:  # this rank's sum(w g^2) over whole parameters, by chunk
                part = buffer.stat_partials[bucket.begin // CHUNK: bucket.end // CHUNK]
                part.copy_(stats.sum(0)) if stats is not None else part.zero_()
            _REDUCE_SCATTER(buffer.buf[bucket.begin: bucket.end], sums.view(-1), group=self.shard_group)
            del sums, stats
        if self.replicas is not None:
            dist.all_reduce(buffer.buf, group=self.replicas)
        got = t.tolist()
        if got[0] != count * self.world:
            raise RanksDisagree(f"the ranks ended a no-sync window after different numbers of micro-steps "
                                f"(this rank: {count}); every rank must run the same micro-steps")
        return [f > 0 for f in got[2:]], got[1]

    def after_finalize(self, buffers):
        for buffer in buffers:
            dist.all_reduce(buffer.found_inf, op=dist.ReduceOp.MAX, group=self.everyone)

    def global_sq_norm(self, local):
        if not self.tp:
            dist.all_reduce(local, group=self.shard_group)  # the replicas hold the same shards
            return local
        return sq_norm_counted_once(local, self.tp_copies, None, self.tp_size)  # the tp copies, once

    def stats_totals(self, local):
        """Sync on: the grads came summed over the ranks, so a micro-batch is the ranks' together; q and
        S_big are sums over the shards, the micro-steps and weights this rank's (the same on every rank),
        each micro-batch holding `world` times its weight in units. Sync off: q is this rank's, over whole
        parameters (the unsharded sums' stat partials), summed over every rank as under DDP; S_big over the shards."""
        if self.no_sync:  # one collective over every rank; the replicas' equal S_big parts are divided out
            totals = local.clone()
            dist.all_reduce(totals, group=self.group)
            sbig = totals[1:2] / (self.world // self.shards)
            return torch.cat([totals[:1], sbig, totals[2:4], totals[2:3]])
        shards = local[:2].clone()
        dist.all_reduce(shards, group=self.shard_group)
        return torch.cat([shards, local[2:4], local[2:3] * self.world])

    def abort(self):
        self.unsharded = {}

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"no_sync": self.no_sync,
                "unsharded": {i: tuple(None if t is None else t.clone() for t in pair)
                              for i, pair in self.unsharded.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.no_sync = state.get("no_sync", False)
        self.unsharded = {i: tuple(None if t is None else t.to(self.buffer.device, copy=True) for t in pair)
                          for i, pair in state.get("unsharded", {}).items()}


def check_private_state(groups) -> None:
    """The private FSDP state this module reads is there, or attach fails naming the torch version."""
    missing = [f"FSDPParamGroup.{name}" for name in ("reduce_grads", "fsdp_params")
               if any(not hasattr(g, name) for g in groups)]
    missing += [f"FSDPParam.{name}" for name in ("sharded_param", "init_unsharded_param")
                if any(not hasattr(p, name) for g in groups for p in getattr(g, "fsdp_params", ()))]
    if missing:
        raise RuntimeError(f"gacc reads FSDP2's private {missing[0]}, which this torch ({torch.__version__}) "
                           "does not have: gacc_kernels supports FSDP2 as in torch 2.11 to 2.14; report it")


def _fsdp_params(groups) -> list:
    # private: each parameter group's FSDPParam objects
    return [fsdp_param for g in groups for fsdp_param in g.fsdp_params]
