"""FSDP2 (fully_shard) inside pipeline stages with gacc (integrations/pipelining.py): 2 stages x 2
data-parallel ranks on 4 gloo processes, a (dp, pp) mesh.

The stage runs every micro-batch with FSDP's gradient sync off and calls FSDP's post-backward itself after
the last (REDUCE_GRAD); gacc's FSDP2 no-sync mode takes each unsharded grad, sums the window in fp32 and
reduce-scatters it when the window closes. Every stage's grads at each optimizer step and the parameters
after 3 steps are compared with a float64 run of the whole model on the whole batch, for GPipe and for
1F1B with an outer loop; stock pipelining with FSDP2 (GPipe, no outer loop: with one, stock divides the
earlier step()s' grads again) is held to the same reference, as a check of the harness."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from gacc_kernels.integrations import pipelining as gacc_pp
from helpers.pipeline import LR, N_MB, STEPS, close, data, full_model, loss_fn, reference, split
from helpers.spawn import spawn

PP, DP = 2, 2
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
CASES = [("gpipe", 1, True), ("1f1b", 2, True), ("gpipe", 1, False)]


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(rank, mesh, c):
    from torch.distributed.fsdp import fully_shard
    schedule, outer, gacc = c
    pipeline, index = divmod(rank, PP)  # mesh (dp, pp): pipeline d holds ranks 2d (stage 0) and 2d + 1
    part = split(full_model(torch.float32), PP)[index]
    for layer in part:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(part, mesh=mesh["dp"])
    stage = PipelineStage(part, index, PP, torch.device("cpu"), group=mesh["pp"].get_group())
    sched = SCHEDULES[schedule](stage, n_microbatches=N_MB, loss_fn=loss_fn)
    opt = torch.optim.SGD(part.parameters(), lr=LR)
    acc = gacc_pp.attach(sched, opt, outer=outer) if gacc else None
    out = {"grads": []}
    opt.register_step_pre_hook(lambda *_: out["grads"].append([full(p.grad).clone() for p in part.parameters()]))
    for step in range(STEPS):
        for o in range(outer):
            x, y = data(step, o * DP + pipeline, torch.float32)  # a share each
            sched.step(*((x,) if index == 0 else ()), target=y if index == PP - 1 else None)
        if acc is not None:  # private: the window was gacc's no-sync mode (FSDP reduced nothing)
            out.setdefault("no_sync", []).append(acc._parts.events.reducer.no_sync)
        opt.step()
        opt.zero_grad()
    out["params"] = [full(p.detach()).clone() for p in part.parameters()]
    if acc is not None:
        acc.remove()
    return out


def _train(rank, path):
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", rank=rank, world_size=PP * DP)
    mesh = init_device_mesh("cpu", (DP, PP), mesh_dim_names=("dp", "pp"))
    results = {c: run(rank, mesh, c) for c in CASES}
    torch.save(results, f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pp_fsdp") / "out")
    spawn(_train, PP * DP, path)
    return [torch.load(f"{path}.{r}") for r in range(PP * DP)]


@pytest.mark.parametrize("c", CASES, ids=lambda c: f"{c[0]}-outer{c[1]}" + ("" if c[2] else "-stock"))
def test_fsdp2_in_stages_is_the_float64_large_batch_step(results, c):
    _, outer, gacc = c
    ref = reference(True, outer * DP, ranks=DP)
    who = "gacc" if gacc else "stock pipelining with FSDP2"
    for s in range(STEPS):
        grads = [t for r in results[:PP] for t in r[c]["grads"][s]]
        close(grads, ref["grads"][s], 1e-5, 1e-7, f"step {s}: {who} against float64")
    close([t for r in results[:PP] for t in r[c]["params"]], ref["params"], 1e-5, 1e-6, "parameters")
    if gacc:
        assert all(r[c]["no_sync"] == [True] * STEPS for r in results)
