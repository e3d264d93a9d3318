"""torch.distributed.pipelining with gacc (integrations/pipelining.py): two gloo processes on the CPU.

A tiny MLP split into stages (one per rank: GPipe, 1F1B; two per rank: Interleaved1F1B, LoopedBFS), 4
micro-batches per schedule.step(), 3 optimizer steps, optionally an outer loop of 2 step()s per optimizer
step. Every stage's grads at each optimizer step (an optimizer step pre-hook registered after attach) and
the parameters after the 3 steps are compared with the same schedule without gacc (stock) and with a
float64 run of the whole model on the whole batch in one process. One spawn runs every case; the tests
read its results.
"""
import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)

from gacc_kernels.integrations import pipelining as gacc_pp
from helpers.pipeline import LR, MAX_NORM, N_MB, STEPS, close, data, full_model, global_clip, loss_fn, reference, split
from helpers.spawn import spawn

WORLD = 2
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B,
             "looped_bfs": ScheduleLoopedBFS}
MULTI = ("interleaved", "looped_bfs")


def case(schedule, scale, outer, dtype=torch.float32, clip=False):
    return (schedule, scale, outer, str(dtype).removeprefix("torch."), clip)


EXACT = [case(s, scale, outer) for s in ("gpipe", "1f1b") for scale in (True, False) for outer in (1, 2)] + [
    case("interleaved", True, 1), case("looped_bfs", True, 2), case("looped_bfs", False, 1)]
CLIPPED = case("1f1b", True, 1, clip=True)
BF16 = case("gpipe", True, 2, torch.bfloat16)
GACC_CASES = [*EXACT, CLIPPED, BF16]
STOCK_CASES = [*EXACT, CLIPPED]


def stage_indices(schedule, rank):
    """This rank's stages: one, or (looped/interleaved) rank and rank + WORLD."""
    return [rank, rank + WORLD] if schedule in MULTI else [rank]


def build(rank, schedule, scale, dtype, stock_scale=None):
    indices = stage_indices(schedule, rank)
    parts = split(full_model(dtype), WORLD * len(indices))
    stages = [PipelineStage(parts[i], i, len(parts), torch.device("cpu")) for i in indices]
    cls = SCHEDULES[schedule]
    sched = cls(stages if schedule in MULTI else stages[0], n_microbatches=N_MB, loss_fn=loss_fn,
                scale_grads=scale if stock_scale is None else stock_scale)
    opt = torch.optim.SGD([p for i in indices for p in parts[i].parameters()], lr=LR)
    return indices, parts, sched, opt


def run(rank, schedule, scale, outer, dtype, clip, use_gacc, stock_scale=None, divide=False):
    """One training run on this rank; returns per stage index the grads at each step and the final
    parameters. divide: stock with scale_grads=False, dividing p.grad by N_MB once before each step."""
    dtype = getattr(torch, dtype)
    indices, parts, sched, opt = build(rank, schedule, scale, dtype, stock_scale)
    micro = {}  # bf16: each micro-batch's grads as autograd made them (a hook that runs before gacc's)
    if dtype is not torch.float32:
        for i in indices:
            for j, p in enumerate(parts[i].parameters()):
                p.register_post_accumulate_grad_hook(
                    lambda p, key=(i, j): micro.setdefault(key, []).append(p.grad.double().clone()))
    acc = gacc_pp.attach(sched, opt, outer=outer) if use_gacc else None
    out = {"grads": [], "main": [], "micro": [], "norms": []}

    def record(optimizer, args, kwargs):
        out["grads"].append({i: [p.grad.clone() for p in parts[i].parameters()] for i in indices})
        if use_gacc:
            out["main"].append({i: [p.main_grad.clone() for p in parts[i].parameters()] for i in indices})
        out["micro"].append({k: torch.stack(v).sum(0) for k, v in micro.items()})
        micro.clear()

    opt.register_step_pre_hook(record)
    last = WORLD * len(indices) - 1
    for step in range(STEPS):
        for o in range(outer):
            x, y = data(step, o, dtype)
            sched.step(*((x,) if 0 in indices else ()), target=y if last in indices else None)
            if use_gacc:  # the window is n_microbatches x stages on the rank x outer micro-steps
                params = opt.param_groups[0]["params"]
                assert acc.window.has_result() == (o == outer - 1)
                assert all((p.grad is not None) == (o == outer - 1) for p in params)
        if divide:
            for p in opt.param_groups[0]["params"]:
                p.grad.div_(N_MB)
        if clip:
            params = opt.param_groups[0]["params"]
            out["norms"].append(gacc_pp.clip_grad_norm_(acc, MAX_NORM) if use_gacc else global_clip(params))
        opt.step()
        opt.zero_grad()
    out["params"] = {i: [p.detach().clone() for p in parts[i].parameters()] for i in indices}
    if use_gacc:
        assert sched.scale_grads is False
        acc.remove()
        out["scale_restored"] = sched.scale_grads is scale
    return out


def refusals(rank):
    """Each refused setup's message (None where it was not refused)."""
    got = {}

    def attempt(key, fn):
        try:
            fn()
            got[key] = None
        except (ValueError, TypeError) as e:
            got[key] = f"{type(e).__name__}: {e}"

    def multi(cls, indices):
        parts = split(full_model(torch.float32), 4)
        stages = [PipelineStage(parts[i], i, 4, torch.device("cpu")) for i in indices]
        opt = torch.optim.SGD([p for i in indices for p in parts[i].parameters()], lr=LR)
        return cls(stages, n_microbatches=N_MB, loss_fn=loss_fn), opt

    _, _, sched, opt = build(rank, "gpipe", True, torch.float32)
    attempt("reduction", lambda: gacc_pp.attach(sched, opt, reduction="max"))
    summed = gacc_pp.attach(sched, opt)
    attempt("weights_with_sum", lambda: gacc_pp.set_micro_batch_weights(summed, [1.0] * N_MB))
    summed.remove()
    mean = gacc_pp.attach(sched, opt, reduction="mean")
    attempt("weights_count", lambda: gacc_pp.set_micro_batch_weights(mean, [1.0] * (N_MB + 1)))
    mean.remove()
    attempt("steps", lambda: gacc_pp.attach(sched, opt, steps=4))
    attempt("outer", lambda: gacc_pp.attach(sched, opt, outer=0))
    got["untouched"] = sched.scale_grads is True
    attempt("attach_after", lambda: gacc_pp.attach(sched, opt).remove())
    ddps = [torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 16)) for _ in range(2)]
    stages = [PipelineStage(d, i, 2 * WORLD, torch.device("cpu")) for d, i in zip(ddps, (rank, rank + WORLD))]
    attempt("ddp_chunks", lambda: gacc_pp.attach(ScheduleInterleaved1F1B(stages, N_MB, loss_fn=loss_fn),
                                                 torch.optim.SGD([*ddps[0].parameters(), *ddps[1].parameters()])))
    inner = torch.nn.Sequential(torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 16)))
    stage = PipelineStage(inner, rank, WORLD, torch.device("cpu"))
    attempt("ddp_inside", lambda: gacc_pp.attach(ScheduleGPipe(stage, N_MB, loss_fn=loss_fn),
                                                 torch.optim.SGD(inner.parameters(), lr=LR)))
    sharded = fully_shard(torch.nn.Linear(16, 16), mesh=init_device_mesh("cpu", (WORLD,)))
    stage = PipelineStage(sharded, rank, WORLD, torch.device("cpu"))
    attempt("fsdp", lambda: gacc_pp.attach(ScheduleInterleavedZeroBubble([stage], N_MB, loss_fn=loss_fn),
                                           torch.optim.SGD(sharded.parameters(), lr=LR)))
    return got


def with_scaler(rank):
    """GPipe, 2 stages, a GradScaler (init_scale 4): the last stage's loss_fn scales the loss. At step 1 an
    inf reaches only the last stage's grads (a hook on one of its weights): both stages must skip."""
    parts = split(full_model(torch.float32), WORLD)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    stage = PipelineStage(parts[rank], rank, WORLD, torch.device("cpu"))
    sched = ScheduleGPipe(stage, n_microbatches=N_MB, loss_fn=lambda out, y: scaler.scale(loss_fn(out, y)))
    opt = torch.optim.SGD(parts[rank].parameters(), lr=LR)
    inf = {"on": False}
    if rank == WORLD - 1:
        next(parts[rank].parameters()).register_hook(lambda g: g * float("inf") if inf["on"] else g)
    acc = gacc_pp.attach(sched, opt, scaler=scaler)
    out = {"grads": [], "params": [], "scales": []}
    opt.register_step_pre_hook(lambda *_: out["grads"].append([p.grad.clone() for p in parts[rank].parameters()]))
    for step in range(2):
        inf["on"] = step == 1
        x, y = data(step, 0, torch.float32)
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == WORLD - 1 else None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        out["params"].append([p.detach().clone() for p in parts[rank].parameters()])
        out["scales"].append(scaler.get_scale())
    acc.remove()
    return out


def chunks_forwarding(rank):
    """Two stages on a rank: each chunk's forward runs the accumulator's forward hooks (which hook the
    outputs, to see each backward from its start); a copy of a chunk runs none, nor does the chunk
    after acc.remove(), whose hook then removes itself."""
    indices, parts, sched, opt = build(rank, "interleaved", True, torch.float32)
    acc = gacc_pp.attach(sched, opt)
    try:
        gacc_pp.attach(sched, opt)
        again = None
    except RuntimeError as e:
        again = str(e)
    chunk = parts[indices[1]]
    x = torch.randn(2, next(m for m in chunk.modules() if isinstance(m, torch.nn.Linear)).in_features)
    got = {"names": [n for n, _ in acc.model.named_parameters()], "again": again,
           "hooked": bool(chunk(x)._backward_hooks), "copy_hooked": bool(copy.deepcopy(chunk)(x)._backward_hooks)}
    acc.remove()
    got["hooked_after_remove"] = bool(chunk(x)._backward_hooks)
    got["hooks_left"] = len(chunk._forward_hooks)
    gacc_pp.attach(sched, opt).remove()  # attach works again after remove()
    return got


def _train(rank, path):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {"gacc": {}, "stock": {}}
    for c in GACC_CASES:
        results["gacc"][c] = run(rank, *c, use_gacc=True)
    for c in STOCK_CASES:
        scale, outer = c[1:3]
        # stock scale_grads divides the whole p.grad at each step(): with outer > 1 the earlier step()s'
        # grads again. What each step's scaling means is scale_grads=False and one division per micro-batch
        intended = scale and outer > 1
        results["stock"][c] = run(rank, *c, use_gacc=False, stock_scale=False if intended else None,
                                  divide=intended)
    results["stock_rescaled"] = run(rank, "gpipe", True, 2, "float32", False, use_gacc=False)
    results["refusals"] = refusals(rank)
    results["scaler"] = with_scaler(rank)
    results["forwarding"] = chunks_forwarding(rank)
    torch.save(results, f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pipelining") / "out")
    spawn(_train, WORLD, path)
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


def merged(ranks, key, c, field):
    """One list per step (or the final list) over all stages in stage order: the whole model's order."""
    runs = [r[key][c] if c is not None else r[key] for r in ranks]
    if field == "params":
        by_stage = {i: v for run_ in runs for i, v in run_["params"].items()}
        return [t for i in sorted(by_stage) for t in by_stage[i]]
    steps = []
    for s in range(STEPS):
        by_stage = {i: v for run_ in runs for i, v in run_[field][s].items()}
        steps.append([t for i in sorted(by_stage) for t in by_stage[i]])
    return steps


@pytest.mark.parametrize("c", EXACT, ids=lambda c: "-".join(map(str, c[:3])))
def test_fp32_equals_stock_and_float64(results, c):
    scale, outer = c[1:3]
    ref = reference(scale, outer)
    gacc, stock = merged(results, "gacc", c, "grads"), merged(results, "stock", c, "grads")
    for s in range(STEPS):
        # the same fp32 additions in the same order, and a division by 4 (exact): stock's bits
        close(gacc[s], stock[s], 0, 0, f"step {s}: gacc against stock")
        close(gacc[s], ref["grads"][s], 1e-5, 1e-7, f"step {s}: gacc against float64")
    close(merged(results, "gacc", c, "params"), merged(results, "stock", c, "params"), 0, 0,
          "parameters after 3 steps: gacc against stock")
    close(merged(results, "gacc", c, "params"), ref["params"], 1e-5, 1e-6,
          "parameters after 3 steps: gacc against float64")
    for r in results:
        assert r["gacc"][c]["scale_restored"], "acc.remove() gives the schedule its scale_grads back"


def test_stock_scale_grads_divides_earlier_steps_again(results):
    """Why an outer loop with scale_grads=True is compared with one division per micro-batch: stock
    torch divides the accumulated p.grad at every step()."""
    stock = merged(results, "stock_rescaled", None, "grads")
    rescaled, meant = reference(True, 2, rescale=True), reference(True, 2)
    close(stock[0], rescaled["grads"][0], 1e-5, 1e-7, "stock scale_grads with outer=2")
    assert not torch.allclose(stock[0][0].double(), meant["grads"][0][0], rtol=1e-2)


def test_global_clip_is_the_float64_clip_by_the_norm_over_all_stages(results):
    ref = reference(True, 1, clip=True)
    gacc, stock = merged(results, "gacc", CLIPPED, "grads"), merged(results, "stock", CLIPPED, "grads")
    for s in range(STEPS):
        for r in results:
            torch.testing.assert_close(r["gacc"][CLIPPED]["norms"][s].double(), ref["norms"][s], rtol=1e-5, atol=0)
        assert float(ref["norms"][s]) > MAX_NORM, "the case must clip"
        close(gacc[s], ref["grads"][s], 1e-5, 1e-8, f"step {s}: clipped grads against float64")
        close(gacc[s], stock[s], 1e-5, 1e-9, f"step {s}: clipped grads against stock's global clip")
    close(merged(results, "gacc", CLIPPED, "params"), ref["params"], 1e-5, 1e-6, "parameters after 3 steps")


def test_bf16_sums_each_micro_batch_grad_in_fp32(results):
    """bf16 stages: p.main_grad is the fp32 sum of the micro-batches' bf16 grads (as autograd made them)
    / n_microbatches, and p.grad its one rounding to bf16; the weights stay near float64's."""
    main, grads = merged(results, "gacc", BF16, "main"), merged(results, "gacc", BF16, "grads")
    for s in range(STEPS):
        micro = {}
        for r in results:
            micro.update(r["gacc"][BF16]["micro"][s])
        expected = [micro[k] / N_MB for k in sorted(micro)]
        close(main[s], expected, 1e-6, 1e-9, f"step {s}: main_grad against the float64 sum of bf16 grads")
        for g, m in zip(grads[s], main[s]):
            assert g.dtype == torch.bfloat16 and m.dtype == torch.float32
            assert torch.equal(g, m.to(torch.bfloat16))
    close(merged(results, "gacc", BF16, "params"), reference(True, 2)["params"], 0, 2e-2,
          "bf16 parameters after 3 steps against float64")


def test_refusals(results):
    for r in results:
        got = r["refusals"]
        assert "'sum' (the schedule's scale_grads) or 'mean' (token weights)" in got["reduction"]
        assert 'reduction="mean"' in got["weights_with_sum"]
        assert f"got {N_MB + 1} weights for {N_MB} micro-batches" in got["weights_count"]
        assert "read from the schedule" in got["steps"]
        assert got["outer"] is not None
        assert got["untouched"] and got["attach_after"] is None, "a refused attach changes nothing"
        assert "DistributedDataParallel with several stages on this rank" in got["ddp_chunks"]
        assert "DistributedDataParallel inside it" in got["ddp_inside"]
        assert "FSDP2 (fully_shard) works in FULL_BACKWARD schedules" in got["fsdp"]  # not zero-bubble


def test_grad_scaler_unscales_and_every_stage_skips_the_same_step(results):
    ref = reference(True, 1)
    got = [r["scaler"] for r in results]
    close([t for r in got for t in r["grads"][0]], ref["grads"][0], 1e-5, 1e-7, "step 0, unscaled")
    assert len(got[0]["grads"]) == 1, "the inf step skipped the optimizer"
    for rank, r in enumerate(got):  # stage 0's grads were finite: it skips because the stages agree
        close(r["params"][1], r["params"][0], 0, 0, f"rank {rank}: parameters unchanged by the inf step")
        assert r["scales"] == [4.0, 2.0], f"rank {rank}: {r['scales']}"


def test_several_stages_on_a_rank_run_the_accumulators_forward_hooks(results):
    for rank, r in enumerate(results):
        got = r["forwarding"]
        assert got["names"][0] == f"stage{rank}.0.0.weight"
        assert "already attached" in got["again"]
        assert got["hooked"] and not got["copy_hooked"]
        assert not got["hooked_after_remove"] and got["hooks_left"] == 0


def test_refuses_a_schedule_that_is_not_one():
    with pytest.raises(TypeError, match="pipelining schedule"):
        gacc_pp.attach(copy.copy(torch.nn.Linear(2, 2)), torch.optim.SGD(torch.nn.Linear(2, 2).parameters()))
