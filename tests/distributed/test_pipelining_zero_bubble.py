"""Zero-bubble pipelining schedules with gacc (integrations/pipelining.py): two gloo processes on the CPU.

ScheduleInterleavedZeroBubble with one stage per rank (2 stages) and two (4 stages), ScheduleZBVZeroBubble
and ScheduleDualPipeV (4 stages, two per rank, V-shaped). Their W actions set weight.grad = dw by hand;
gacc runs each as one micro-step through acc.grads_by_hand(). Every stage's grads at each optimizer step
and the parameters after 3 steps are compared with a float64 run of the whole model on the whole batch,
with an outer loop of schedule.step()s, an early optimizer step and the global clip. In bf16, gacc's
main_grad is the fp32 sum of the micro-batches' bf16 weight grads, where the stock schedule's bf16
p.grad (weight.grad += dw) is measurably off it. One spawn runs every case; the tests read its results.
"""
import functools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import BACKWARD_WEIGHT as W

from gacc_kernels.integrations import pipelining as gacc_pp
from helpers.pipeline import (
    LR,
    MAX_NORM,
    N_MB,
    STEPS,
    close,
    data,
    full_model,
    loss_fn,
    reference,
    split,
    token_counts,
    token_data,
    token_loss_fn,
)
from helpers.spawn import spawn

WORLD = 2
SCHEDULES = {"izb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV,
             "1f1b": Schedule1F1B}


def case(schedule, per_rank, outer=1, early=False, clip=False, tokens=False):
    """early: the second optimizer step comes after one schedule.step() of `outer` (a short window).
    tokens: reduction="mean" with each micro-batch's token count as its weight (token_data)."""
    return (schedule, per_rank, outer, early, clip, tokens)


CASES = [case("izb", 1), case("izb", 2, outer=2, early=True), case("zbv", 2, clip=True),
         case("dualpipev", 2, outer=2), case("zbv", 2, outer=2, early=True),
         case("zbv", 2, outer=2, tokens=True), case("dualpipev", 2, tokens=True), case("1f1b", 1, tokens=True)]


def outers(c):
    """schedule.step()s per optimizer step."""
    outer, early = c[2], c[3]
    return [1 if early and s == 1 else outer for s in range(STEPS)]


def stage_indices(schedule, per_rank, rank):
    if per_rank == 1:
        return [rank]
    return [rank, 2 * WORLD - 1 - rank] if schedule in ("zbv", "dualpipev") else [rank, rank + WORLD]


def run(rank, c):
    schedule, per_rank, outer, _, clip, tokens = c
    indices = stage_indices(schedule, per_rank, rank)
    parts = split(full_model(torch.float32), WORLD * per_rank)
    stages = [PipelineStage(parts[i], i, len(parts), torch.device("cpu")) for i in indices]
    sched = SCHEDULES[schedule](stages[0] if schedule == "1f1b" else stages, n_microbatches=N_MB,
                                loss_fn=token_loss_fn if tokens else loss_fn)
    opt = torch.optim.SGD([p for i in indices for p in parts[i].parameters()], lr=LR)
    acc = gacc_pp.attach(sched, opt, outer=outer, reduction="mean" if tokens else "sum")
    out = {"grads": [], "norms": []}

    def record(optimizer, args, kwargs):  # registered after gacc's, which finishes a short window first
        out["grads"].append({i: [p.grad.clone() for p in parts[i].parameters()] for i in indices})

    opt.register_step_pre_hook(record)
    first, last = 0 in indices, 2 * WORLD - 1 in indices if per_rank == 2 else rank == WORLD - 1
    for step in range(STEPS):
        for o in range(outers(c)[step]):
            x, y = (token_data if tokens else data)(step, o, torch.float32)
            if tokens:  # every rank knows the counts (here from the targets; a loader may count them)
                gacc_pp.set_micro_batch_weights(acc, token_counts(y))
            sched.step(*((x,) if first else ()), target=y if last else None)
        if clip:
            out["norms"].append(gacc_pp.clip_grad_norm_(acc, MAX_NORM))
        opt.step()
        opt.zero_grad()
    out["params"] = {i: [p.detach().clone() for p in parts[i].parameters()] for i in indices}
    acc.remove()
    out["restored"] = (sched.scale_grads is True and not getattr(sched, "_comp_type_to_function_map", None)
                       and all(not {"backward_maybe_with_nosync", "backward_one_chunk"} & set(vars(s))
                               for s in stages))
    return out


def bf16_micro_grads(rank):
    """Step 0 in bf16, gacc and stock: each parameter's main_grad / p.grad, and the micro-batches' grads."""
    got = {}
    for use_gacc in (True, False):
        indices = stage_indices("zbv", 2, rank)
        parts = split(full_model(torch.bfloat16), 2 * WORLD)
        stages = [PipelineStage(parts[i], i, len(parts), torch.device("cpu")) for i in indices]
        sched = ScheduleZBVZeroBubble(stages, n_microbatches=N_MB, loss_fn=loss_fn)
        opt = torch.optim.SGD([p for i in indices for p in parts[i].parameters()], lr=LR)
        params = [p for i in indices for p in parts[i].parameters()]
        dws = [[] for _ in params]
        for p, mine in zip(params, dws):  # the grad flowing into p.grad: a full backward's, or a W's dw
            p.register_hook(functools.partial(_append_double, mine))
        acc = gacc_pp.attach(sched, opt) if use_gacc else None
        x, y = data(0, 0, torch.bfloat16)
        sched.step(*((x,) if 0 in indices else ()), target=y if 2 * WORLD - 1 in indices else None)
        key = "gacc" if use_gacc else "stock"
        got[key] = [(p.main_grad if use_gacc else p.grad).double().clone() for p in params]
        got[key + "_dws"] = dws
        if acc is not None:
            acc.remove()
    return got


def other_weight_functions(rank):
    """A custom W function registered before attach is refused there; one registered after it is refused
    at the next forward of a stage (it would set weight.grad where gacc never looks), until remove()."""
    indices = stage_indices("zbv", 2, rank)
    parts = split(full_model(torch.float32), 2 * WORLD)
    stages = [PipelineStage(parts[i], i, len(parts), torch.device("cpu")) for i in indices]
    sched = ScheduleZBVZeroBubble(stages, n_microbatches=N_MB, loss_fn=loss_fn)
    opt = torch.optim.SGD([p for i in indices for p in parts[i].parameters()], lr=LR)
    x = _inputs(parts[indices[0]])
    got = {}
    sched.register_custom_function(W, lambda action, ctx: None)
    try:
        gacc_pp.attach(sched, opt)
    except ValueError as e:
        got["before"] = str(e)
    sched._comp_type_to_function_map.clear()
    counter = sched.backward_counter
    del sched.backward_counter  # as in a torch without it
    try:
        gacc_pp.attach(sched, opt)
    except ValueError as e:
        got["old_torch"] = str(e)
    sched.backward_counter = counter
    acc = gacc_pp.attach(sched, opt)
    sched.register_custom_function(W, lambda action, ctx: None)
    try:
        parts[indices[0]](x)
    except RuntimeError as e:
        got["after"] = str(e)
    acc.remove()
    parts[indices[0]](x)  # the check is gone with the accumulator: each hook removes itself at its forward
    parts[indices[1]](_inputs(parts[indices[1]]))
    got["hooks_left"] = sum(len(parts[i]._forward_pre_hooks) for i in indices)
    return got


def _inputs(part):
    return torch.randn(2, next(m for m in part.modules() if isinstance(m, torch.nn.Linear)).in_features)


def _append_double(into, grad):
    into.append(grad.double().clone())


def _train(rank, path):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {c: run(rank, c) for c in CASES}
    results["bf16"] = bf16_micro_grads(rank)
    results["other_w"] = other_weight_functions(rank)
    torch.save(results, f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("zero_bubble") / "out")
    spawn(_train, WORLD, path)
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


def merged(ranks, c, field):
    """One list per step (or the final list) over all stages in stage order: the whole model's order."""
    if field == "params":
        by_stage = {i: v for r in ranks for i, v in r[c]["params"].items()}
        return [t for i in sorted(by_stage) for t in by_stage[i]]
    return [[t for i, v in sorted((i, v) for r in ranks for i, v in r[c][field][s].items()) for t in v]
            for s in range(STEPS)]


@pytest.mark.parametrize("c", CASES, ids=lambda c: "-".join(map(str, c)))
def test_zero_bubble_is_the_float64_large_batch_step(results, c):
    clip, tokens = c[4:]
    ref = reference(True, outers(c), clip=clip, tokens=tokens)
    grads = merged(results, c, "grads")
    for s in range(STEPS):
        close(grads[s], ref["grads"][s], 1e-5, 1e-7, f"step {s}: gacc against float64")
        if clip:
            assert float(ref["norms"][s]) > MAX_NORM, "the case must clip"
            for r in results:
                torch.testing.assert_close(r[c]["norms"][s].double(), ref["norms"][s], rtol=1e-5, atol=0)
    close(merged(results, c, "params"), ref["params"], 1e-5, 1e-6, "parameters after 3 steps: gacc against float64")
    for r in results:
        assert r[c]["restored"], "acc.remove() gives the schedule and its stages back as they were"


def test_bf16_main_grad_is_the_fp32_sum_where_stock_is_lossy(results):
    worst = {"gacc": 0.0, "stock": 0.0}
    for r in results:
        got = r["bf16"]
        for key in worst:
            for value, dws in zip(got[key], got[key + "_dws"]):
                assert len(dws) == N_MB, "one weight grad per micro-batch, none missed or counted twice"
                exact = torch.stack(dws).sum(0) / N_MB
                err = ((value - exact).abs().max() / exact.abs().max()).item()
                worst[key] = max(worst[key], err)
    # gacc: fp32 additions of bf16 values (exact here) and one division by 4; stock: bf16 additions
    assert worst["gacc"] < 1e-6, worst
    assert worst["stock"] > 1e-3, worst


def test_a_custom_w_function_or_an_older_runtime_is_refused(results):
    for r in results:
        got = r["other_w"]
        assert "custom functions registered" in got["before"]
        assert "which this torch" in got["old_torch"] and "FULL_BACKWARD schedule" in got["old_torch"]
        assert "registered on the schedule after gacc's pipelining.attach()" in got["after"]
        assert got["hooks_left"] == 0
