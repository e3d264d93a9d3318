"""attach(grad_stats=True) on two gloo ranks: DDP and FSDP2 with gradient sync off (each rank's
micro-batches are micro-batches of the window, per-rank token weights, loss_scale, an early step) and FSDP2
with sync on (the ranks' micro-batch together is one), against the float64 reference computed from every
rank's micro-grads."""
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gacc_kernels
from helpers.models import batches
from helpers.noise import assert_stats, flat, reference
from helpers.spawn import spawn

K, WORLD, LS = 3, 2, 4.0
WINDOWS = (K, 2)  # the second window ends early


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 5))


def data_of(rank, window):
    return batches("mlp", K, "cpu", seed=100 * window + rank)


def weight_of(rank, i, per_rank):
    return 1.0 + i + (rank if per_rank else 0)


def estimate(model, x, y):
    params = list(model.parameters())
    return flat(torch.autograd.grad(F.mse_loss(model(x), y), params))


def _train(rank, path, results, sharded, no_sync=False):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    model = net()
    plain = copy.deepcopy(model)  # the reference's model: the same parameters, before any step
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=K, reduction="mean", loss_scale=LS, grad_stats=True)
    out = []
    for index, micro_steps in enumerate(WINDOWS):
        for i, (x, y) in enumerate(data_of(rank, index)[:micro_steps]):
            if no_sync:
                model.set_requires_gradient_sync(i == micro_steps - 1)
            acc.set_weight(weight_of(rank, i, per_rank=not sharded or no_sync))
            (F.mse_loss(model(x), y) * LS).backward()
        opt.step()
        opt.zero_grad()
        out.append(acc.stats())
    torch.save({"stats": out, "params": [p.detach().clone() for p in plain.parameters()]}, f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def _expected(params, sharded):
    """sharded: FSDP2 with gradient sync on (FSDP sums the ranks' grads before gacc sees them)."""
    """Per window: every rank's micro-batch estimates, from the model before the first step (the
    second window's are from the parameters after it, recomputed here from stock SGD on the float64 mean)."""
    model = net()
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)
    expected = []
    for index, micro_steps in enumerate(WINDOWS):
        per_rank = [[estimate(model, x, y) for x, y in data_of(r, index)[:micro_steps]] for r in range(WORLD)]
        if sharded:  # one micro-batch per micro-step: the ranks' together, WORLD times the weight
            ests = [sum(per_rank[r][i] for r in range(WORLD)) / WORLD for i in range(micro_steps)]
            weights = [weight_of(0, i, False) for i in range(micro_steps)]
            exp = reference(ests, weights, units_per_weight=WORLD)
        else:
            ests = [e for r in range(WORLD) for e in per_rank[r]]
            weights = [weight_of(r, i, True) for r in range(WORLD) for i in range(micro_steps)]
            exp = reference(ests, weights)
        expected.append(exp)
        g = sum(w * e for w, e in zip(weights, ests)) / sum(weights)  # the window's mean, a step of lr 0.1
        with torch.no_grad():
            start = 0
            for p in model.parameters():
                p -= 0.1 * g[start: start + p.numel()].view_as(p).float()
                start += p.numel()
    return expected


def _check(tmp_path, sharded, no_sync=False):
    results = str(tmp_path / "stats")
    spawn(_train, WORLD, str(tmp_path / "store"), results, sharded, no_sync)
    ranks = [torch.load(f"{results}.{r}", weights_only=False) for r in range(WORLD)]
    expected = _expected(ranks[0]["params"], sharded and not no_sync)
    for got in ranks:
        for stats, exp in zip(got["stats"], expected):
            assert_stats(stats, *exp, rtol=1e-3)
            assert stats.covered == 1.0
    assert ranks[0]["stats"] == ranks[1]["stats"], "every rank reports the same statistics"


def test_ddp_two_ranks(tmp_path):
    _check(tmp_path, sharded=False)


def test_fsdp2_two_ranks(tmp_path):
    _check(tmp_path, sharded=True)


def test_fsdp2_no_sync_two_ranks(tmp_path):
    """Sync off: gacc sees each rank's unsharded grads, so each rank's micro-batch counts, as under DDP."""
    _check(tmp_path, sharded=True, no_sync=True)
