"""DistributedDataParallel inside pipeline stages with gacc (integrations/pipelining.py): 2 stages x 2
data-parallel ranks on 4 gloo processes.

Pipeline d (ranks 2d, 2d + 1) runs its share of the batches; each stage's submodule is DDP over the ranks
holding that stage. The schedule would call DDP's reducer.prepare_for_backward before each stage's last
backward; gacc keeps DDP's reducer off (a comm hook counts its calls: none) and reduces the window over
DDP's group itself. Every stage's grads at each optimizer step and the parameters after 3 steps are
compared with a float64 run of the whole model on the whole batch. GPipe, 1F1B with an outer loop, and
ScheduleInterleavedZeroBubble (one stage per rank: its W actions under DDP); and token weights
(reduction="mean"): the mean over every token of the window, on both pipelines.
Stock PP + DDP is not compared: on torch 2.14's CPU it fails (DDP's reducer asserts that the rebuilt
parameter indices number twice the parameters; with a comm hook it hangs).
"""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleavedZeroBubble
from torch.nn.parallel import DistributedDataParallel

from gacc_kernels.integrations import pipelining as gacc_pp
from helpers.pipeline import (
    LR,
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

PP, DP = 2, 2
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "izb": ScheduleInterleavedZeroBubble}
CASES = [("gpipe", 1, False), ("1f1b", 2, False), ("izb", 1, False), ("1f1b", 2, True), ("izb", 1, True)]


def _counting_allreduce(calls, bucket):
    calls.append(1)
    work = dist.all_reduce(bucket.buffer().div_(DP), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def run(rank, groups, c):
    schedule, outer, tokens = c
    pipeline, index = divmod(rank, PP)  # pipeline d holds ranks 2d (stage 0) and 2d + 1 (stage 1)
    pp_group, dp_group = groups["pp"][pipeline], groups["dp"][index]
    part = split(full_model(torch.float32), PP)[index]
    ddp = DistributedDataParallel(part, process_group=dp_group)
    calls = []
    ddp.register_comm_hook(calls, _counting_allreduce)
    stage = PipelineStage(ddp, index, PP, torch.device("cpu"), group=pp_group)
    sched = SCHEDULES[schedule]([stage] if schedule == "izb" else stage, n_microbatches=N_MB,
                                loss_fn=token_loss_fn if tokens else loss_fn)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    acc = gacc_pp.attach(sched, opt, outer=outer, reduction="mean" if tokens else "sum")
    out = {"grads": []}
    opt.register_step_pre_hook(lambda *_: out["grads"].append({index: [p.grad.clone() for p in part.parameters()]}))
    for step in range(STEPS):
        for o in range(outer):
            x, y = (token_data if tokens else data)(step, o * DP + pipeline, torch.float32)  # a share each
            if tokens:
                gacc_pp.set_micro_batch_weights(acc, token_counts(y))
            sched.step(*((x,) if index == 0 else ()), target=y if index == PP - 1 else None)
        opt.step()
        opt.zero_grad()
    out["params"] = {index: [p.detach().clone() for p in part.parameters()]}
    out["ddp_reducer_calls"] = len(calls)
    acc.remove()
    out["restored"] = "backward_maybe_with_nosync" not in vars(stage)
    return out


def _train(rank, path):
    dist.init_process_group("gloo", rank=rank, world_size=PP * DP)
    groups = {"pp": [dist.new_group([d * PP + i for i in range(PP)]) for d in range(DP)],
              "dp": [dist.new_group([d * PP + i for d in range(DP)]) for i in range(PP)]}
    results = {c: run(rank, groups, c) for c in CASES}
    torch.save(results, f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pp_ddp") / "out")
    spawn(_train, PP * DP, path)
    return [torch.load(f"{path}.{r}") for r in range(PP * DP)]


def merged(ranks, c, field):
    """Pipeline 0's stages in order (the DP ranks hold the same values; checked in the test)."""
    if field == "params":
        return [t for r in ranks[:PP] for t in next(iter(r[c]["params"].values()))]
    return [[t for r in ranks[:PP] for t in next(iter(r[c]["grads"][s].values()))] for s in range(STEPS)]


@pytest.mark.parametrize("c", CASES, ids=lambda c: f"{c[0]}-outer{c[1]}" + "-tokens" * c[2])
def test_ddp_in_stages_is_the_float64_large_batch_step(results, c):
    _, outer, tokens = c
    ref = reference(True, outer * DP, ranks=DP, tokens=tokens)
    grads = merged(results, c, "grads")
    for s in range(STEPS):
        close(grads[s], ref["grads"][s], 1e-5, 1e-7, f"step {s}: gacc against float64")
    close(merged(results, c, "params"), ref["params"], 1e-5, 1e-6, "parameters after 3 steps")
    for rank, r in enumerate(results):
        mate = results[(rank + PP) % (PP * DP)]  # the same stage in the other pipeline
        for a, b in zip(r[c]["params"].values(), mate[c]["params"].values()):
            close(a, b, 0, 0, "the data-parallel ranks of a stage hold the same parameters")
        assert r[c]["ddp_reducer_calls"] == 0, "DDP's reducer never runs under gacc"
        assert r[c]["restored"]
