"""attach() on an FSDP2 (fully_shard) model: two gloo processes on the CPU against a float64 large batch."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.models import batches
from helpers.spawn import spawn

K, WORLD = 3, 2
WEIGHTS = [1.0, 2.0, 0.5]  # the same on every rank
CLIP = 0.05  # window 0 is clipped to this global norm


def net():
    # 5 output rows: shards of 3 and 2 rows, so the ranks' slots differ in size
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 48), torch.nn.GELU(),
                               torch.nn.Linear(48, 5))


def data_of(rank, window):
    return batches("mlp", K, "cpu", seed=100 * window + rank)


def _train(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))  # not the GPU fully_shard would pick where there is one
    torch.manual_seed(0)
    model = net()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    acc = gacc_kernels.attach(model, opt, steps=K, scaler=scaler, reduction="mean")
    out = {"grads": [], "errors": []}

    def window(index, micro_steps, weights, inf_on=None):
        for i, (x, y) in enumerate(data_of(rank, index)[:micro_steps]):
            acc.set_weight(weights[i])
            loss = F.mse_loss(model(x), y)
            if (rank, i) == (inf_on, 1):
                loss = loss * float("inf")
            scaler.scale(loss).backward()

    for index, micro_steps in enumerate((K, 2)):  # window 1 ends early
        window(index, micro_steps, WEIGHTS)
        if index == 0:
            out["norm"] = acc.clip_grad_norm_(CLIP)
        scaler.step(opt)
        scaler.update()
        out["grads"].append([p.grad.full_tensor().clone() for p in model.parameters()])
        opt.zero_grad()
    out["params"] = [p.detach().full_tensor() for p in model.parameters()]

    window(2, K, WEIGHTS, inf_on=1)  # an inf on rank 1 only: every rank skips the step
    scaler.step(opt)
    scaler.update()
    out["after_inf"] = [p.detach().full_tensor() for p in model.parameters()]
    out["scale"] = scaler.get_scale()
    opt.zero_grad()

    window(3, K, [1.0, 1.0 + rank, 1.0])  # weights that differ between the ranks
    try:
        scaler.step(opt)
    except RuntimeError as e:
        out["errors"].append(str(e))
    opt.zero_grad()
    (x, y), (x2, y2) = data_of(rank, 4)[:2]
    scaler.scale(F.mse_loss(model(x), y)).backward()  # sync on for the window's first micro-step ...
    model.set_requires_gradient_sync(False)
    try:
        scaler.scale(F.mse_loss(model(x2), y2)).backward()  # ... then off
    except RuntimeError as e:
        out["errors"].append(str(e))
    torch.save(out, f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def reference():
    """float64: sum over ranks and micro-steps of w g, over the total weight; the same SGD steps."""
    torch.manual_seed(0)
    model = net().double()
    params = list(model.parameters())
    out = {"grads": []}
    for index, micro_steps in enumerate((K, 2)):
        total, wsum = [torch.zeros_like(p) for p in params], 0.0
        for rank in range(WORLD):
            for (x, y), w in zip(data_of(rank, index)[:micro_steps], WEIGHTS):
                gs = torch.autograd.grad(F.mse_loss(model(x.double()), y.double()), params)
                for t, g in zip(total, gs):
                    t += w * g
                wsum += w
        grads = [t / wsum for t in total]
        if index == 0:
            out["norm"] = torch.stack([g.norm() for g in grads]).norm()
            grads = [g * min(1.0, CLIP / (float(out["norm"]) + 1e-6)) for g in grads]
        out["grads"].append(grads)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.1 * g
    out["params"] = [p.detach() for p in params]
    return out


def test_fsdp2_against_one_large_batch(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    results = str(tmp_path / "out")
    spawn(_train, WORLD, results)
    ranks, ref = [torch.load(f"{results}.{r}") for r in range(WORLD)], reference()
    for got in ranks:
        for index, (grads, expected) in enumerate(zip(got["grads"], ref["grads"])):
            for j, (g, e) in enumerate(zip(grads, expected)):
                torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, i=index, j=j: f"window {i}, parameter {j}: {m}")
        torch.testing.assert_close(got["norm"].double(), ref["norm"], rtol=1e-5, atol=0)
        for p, e in zip(got["params"], ref["params"]):
            torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(got["after_inf"], got["params"])), "the inf window must be skipped"
        assert got["scale"] == 0.5
        weights, no_sync = got["errors"]
        assert "same micro-steps with the same weights" in weights
        assert "after this window's first micro-step had run with it on" in no_sync


def _buffer_sizes(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gacc_kernels.kernels.reference import CHUNK

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = net()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=K)
    (buffer,) = acc._parts.events.buffers  # private: the flat fp32 buffer and its slots
    # the largest shard: ceil(rows / N) rows, so every rank lays its buffer out alike
    shard = {id(p): (p.to_local().numel(), -(-p.shape[0] // WORLD) * (p.numel() // p.shape[0]))
             for p in model.parameters()}
    torch.save({"chunk": CHUNK, "numel": buffer.buf.numel(), "bytes": buffer.buf.nbytes,
                "slots": [(s.numel, *shard[id(s.param)], s.param.numel()) for s in buffer.slots]},
               f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def test_the_buffer_holds_only_this_ranks_shard(tmp_path):
    """4/N bytes per parameter: each rank's buffer is its shards, each slot CHUNK-aligned and as long as the
    largest shard, the same layout on every rank, and no more."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    results = str(tmp_path / "out")
    spawn(_buffer_sizes, WORLD, results)
    sizes = []
    for rank in range(WORLD):
        got = torch.load(f"{results}.{rank}")
        chunk, slots = got["chunk"], got["slots"]
        assert all(numel == shard for numel, shard, _, _ in slots), "each slot is this rank's shard"
        sharded = sum(-(-largest // chunk) * chunk for _, _, largest, _ in slots)
        whole = sum(-(-full // chunk) * chunk for _, _, _, full in slots)
        sizes.append(got["numel"])
        assert sharded < whole  # this net's shards take fewer CHUNKs than its parameters
        assert got["numel"] == sharded and got["bytes"] == 4 * sharded, \
            f"rank {rank}: a buffer of {got['numel']} floats for shards of {sharded} (whole parameters: {whole})"
    assert len(set(sizes)) == 1, f"the ranks' buffers differ: {sizes}"
