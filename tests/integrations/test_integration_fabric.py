"""integrations.fabric.attach in Fabric's own accumulation loop (unchanged but for the attach line), against
Fabric's own run of that loop without gacc and against the float64 large-batch run: on one device, and
under DDP on two gloo processes; and what is refused."""
import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning.fabric")

from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from lightning.fabric.strategies import (
    DataParallelStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceXLAStrategy,
)

import gacc_kernels
from gacc_kernels.integrations import fabric as gacc_fabric
from helpers.models import MLP
from helpers.spawn import spawn

K, N, MICRO = 3, 7, 4  # 7 micro-batches (per rank): windows of 3, 3 and a short 1, so 3 optimizer steps
MAX_NORM = 0.05        # below every window's norm, with and without / K: the clip bites at each step
WORLD = 2


def micro_batches(n: int = N, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(MICRO, 24, generator=g), torch.randn(MICRO, 5, generator=g)) for _ in range(n)]


def rank_batches(rank: int):
    return micro_batches(WORLD * N)[rank::WORLD]


def windows():
    """The loop's windows, (first, end) micro-batch indices: the last one is short (K does not divide N)."""
    return [(s, min(s + K, N)) for s in range(0, N, K)]


def fabric_loop(fabric, model, optimizer, data, divide: bool, clip: float | None):
    """Fabric's accumulation loop, stepping at the last batch too. Returns the grads the optimizer steps on
    (read after the clip), the norms fabric.clip_gradients returned, and the parameters at the end."""
    seen, norms = [], []
    for i, (x, y) in enumerate(data):
        is_accumulating = (i + 1) % K != 0 and i + 1 < len(data)
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            loss = F.mse_loss(model(x), y)
            fabric.backward(loss / K if divide else loss)
        if not is_accumulating:
            if clip is not None:
                norms.append(full(fabric.clip_gradients(model, optimizer, max_norm=clip)).double())
            seen.append([full(p.grad).detach().double().clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
    return seen, norms, [full(p).detach().double().clone() for p in model.parameters()]


def full(t):
    """A DTensor (FSDP2's parameters and grads) as the whole tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def setup(fabric, net):
    return fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))


def run(net, divide: bool, clip: float | None, gacc: bool, **fabric_kw):
    fabric = Fabric(accelerator="cpu", devices=1, **fabric_kw)
    model, optimizer = setup(fabric, net)
    acc = gacc_fabric.attach(fabric, model, optimizer, steps=K) if gacc else None
    result = fabric_loop(fabric, model, optimizer, micro_batches(), divide, clip)
    if acc is not None:
        acc.remove()
    return result


def large_batch_run(net, per_rank, divide: bool, clip: float | None):
    """float64, no Fabric: each window's micro-batches (of every rank) as one batch, whose mean loss is
    multiplied by what the loop's sum over the window comes to (DDP averaging the ranks): the window's size
    r, or r / K when the loop divides its loss by K. So the loop without / K steps on K times the large-batch
    gradient (r times in the short window)."""
    net = net.double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    seen, norms = [], []
    for start, end in windows():
        x, y = (torch.cat(t).double() for t in zip(*[b for rank in per_rank for b in rank[start:end]]))
        r = end - start
        (F.mse_loss(net(x), y) * (r / K if divide else r)).backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), clip))
        seen.append([p.grad.detach().clone() for p in net.parameters()])
        opt.step()
        opt.zero_grad()
    return seen, norms, [p.detach().clone() for p in net.parameters()]


def assert_same(a, b, rtol: float, what: str):
    (seen_a, norms_a, params_a), (seen_b, norms_b, params_b) = a, b
    assert len(seen_a) == len(seen_b) == len(windows()), what
    assert len(norms_a) == len(norms_b), what
    for step, (ga, gb) in enumerate(zip(seen_a, seen_b)):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item(), msg=f"{what}, step {step}")
    for step, (x, y) in enumerate(zip(norms_a, norms_b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=0.0, msg=f"{what}, norm at step {step}")
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * q.abs().max().item(), msg=f"{what}, parameters")


# -- one device ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [None, MAX_NORM], ids=["no-clip", "clip"])
@pytest.mark.parametrize("divide", [False, True], ids=["loss", "loss-over-K"])
def test_fabric_one_device_matches_fabric_and_the_large_batch_run(divide, clip):
    net = MLP()
    gacc = run(copy.deepcopy(net), divide, clip, gacc=True)
    stock = run(copy.deepcopy(net), divide, clip, gacc=False)
    big = large_batch_run(copy.deepcopy(net), [micro_batches()], divide, clip)
    # Fabric's own fp32 run sums the same fp32 grads: the same to its rounding (bitwise without the clip)
    assert_same(gacc, stock, rtol=1e-6, what="gacc against Fabric's own run")
    # the float64 reference: gacc within fp32 rounding of it, as stock Fabric is
    assert_same(gacc, big, rtol=2e-6, what="gacc against the float64 large-batch run")
    assert_same(stock, big, rtol=2e-6, what="Fabric's own run against the float64 large-batch run")
    if clip is not None:
        assert all(n > clip for n in gacc[1])  # the clip bites, the short window's too


def test_fabric_16_mixed_hands_its_grad_scaler_to_gacc():
    """precision 16-mixed (fp16 autocast on the CPU, through the plugin: the "16-mixed" string means bf16 on
    the CPU). At the clip stock Fabric unscales; had gacc not got the scaler, its p.grad and norm would
    still be scaled there."""
    net = MLP()
    runs = []
    for gacc in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        runs.append(run(copy.deepcopy(net), False, MAX_NORM, gacc=gacc,
                        plugins=MixedPrecision("16-mixed", "cpu", scaler)))
        runs[-1] = (*runs[-1], scaler.get_scale())
    (*gacc, scale_gacc), (*stock, scale_stock) = runs
    assert_same(gacc, stock, rtol=1e-6, what="gacc against Fabric's own 16-mixed run")
    assert scale_gacc == scale_stock == 2.0 ** 8  # no step skipped in either


def test_fabric_clip_gradients_is_gaccs_fp32_clip():
    """precision bf16-true (bf16 parameters): fabric.clip_gradients clips p.main_grad in fp32 and p.grad with
    it, with the norm of the fp32 sum; Fabric's own clip of the bf16 p.grad in place would have gacc copy
    it into p.main_grad at the step, with a warning."""
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    model, optimizer = setup(fabric, MLP())
    acc = gacc_fabric.attach(fabric, model, optimizer, steps=K)
    for i, (x, y) in enumerate(micro_batches()[:K]):
        with fabric.no_backward_sync(model, enabled=i + 1 < K):
            fabric.backward(F.mse_loss(model(x).float(), y))
    params = list(model.parameters())
    unclipped = torch.stack([p.main_grad.double().norm() for p in params]).norm()
    norm = fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)
    torch.testing.assert_close(norm.double(), unclipped, rtol=1e-6, atol=0.0)
    assert norm > MAX_NORM
    clipped = torch.stack([p.main_grad.double().norm() for p in params]).norm()
    torch.testing.assert_close(clipped, torch.tensor(MAX_NORM, dtype=torch.float64), rtol=1e-5, atol=0.0)
    for p in params:
        assert p.grad.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32
        assert torch.equal(p.grad, p.main_grad.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*changed in place after gacc finished")
        optimizer.step()
    optimizer.zero_grad()
    acc.remove()


def test_fabric_zero_grad_in_the_middle_of_a_window_discards_it_as_stock():
    """fabric_optimizer.zero_grad() and fabric_model.zero_grad() after one micro-step: the window restarts."""
    net = MLP()
    results = []
    for gacc in (True, False):
        fabric = Fabric(accelerator="cpu", devices=1)
        model, optimizer = setup(fabric, copy.deepcopy(net))
        acc = gacc_fabric.attach(fabric, model, optimizer, steps=K) if gacc else None
        data = micro_batches()
        for zero_grad in (optimizer.zero_grad, model.zero_grad):
            with fabric.no_backward_sync(model, enabled=True):
                fabric.backward(F.mse_loss(model(data[0][0]), data[0][1]))
            zero_grad()
            results.append(fabric_loop(fabric, model, optimizer, data[1:K + 1], False, None)[0])
        if acc is not None:
            acc.remove()
    for a, b in zip(results[:2], results[2:]):
        assert len(a) == len(b) == 1
        for x, y in zip(a[0], b[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * y.abs().max().item())


def test_fabric_attach_leaves_the_users_module_plain():
    """The Fabric module forwards setattr of names its inner module has: what gacc sets on the Fabric module
    stays there (copies of the user's module are plain), and nothing is left anywhere after remove()."""
    fabric = Fabric(accelerator="cpu", devices=1)
    net = MLP()
    model, optimizer = setup(fabric, net)
    objects = [net, model, optimizer, fabric, fabric.strategy]
    before = [set(vars(o)) for o in objects]
    acc = gacc_fabric.attach(fabric, model, optimizer, steps=K)
    assert "zero_grad" not in vars(net) or vars(net)["zero_grad"] is not vars(model)["zero_grad"]
    x = torch.randn(2, 24)
    torch.testing.assert_close(copy.deepcopy(net)(x), net(x))
    acc.remove()
    assert [set(vars(o)) for o in objects] == before
    assert "remove" not in vars(acc)


# -- data parallel -----------------------------------------------------------------------------------

DDP_CASES = [(divide, clip) for divide in (False, True) for clip in (None, MAX_NORM)]


def fsdp2(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])


def _dp_worker(rank, net, results, strategy):
    if strategy == "ddp":
        fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp")
    else:
        fabric = Fabric(accelerator="cpu", devices=WORLD,
                        strategy=ModelParallelStrategy(fsdp2, data_parallel_size=WORLD, tensor_parallel_size=1))
    fabric.launch()  # the processes are ours (LOCAL_RANK is set): this initializes the gloo group
    out = {}
    for divide, clip in DDP_CASES:
        for gacc in (False, True):
            if strategy == "ddp":
                model, optimizer = setup(fabric, copy.deepcopy(net))
            else:  # sharded by setup_module: the optimizer comes after
                model = fabric.setup_module(copy.deepcopy(net))
                optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
            acc = gacc_fabric.attach(fabric, model, optimizer, steps=K) if gacc else None
            out[divide, clip, gacc] = fabric_loop(fabric, model, optimizer, rank_batches(rank), divide, clip)
            if acc is not None:
                acc.remove()
    torch.save(out, f"{results}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_fabric_data_parallel_matches_fabric_stock(tmp_path, strategy):
    """Two gloo processes, Fabric's loop with no_backward_sync and a short last window, with and without / K
    and the clip. strategy="ddp": gacc finds the DDP wrapper inside the Fabric module and keeps its reducer
    off (else the grads would be all zeros). ModelParallelStrategy with fully_shard ("fsdp2"):
    no_backward_sync turns FSDP's gradient sync off, and gacc's FSDP2 no-sync mode takes each window. The
    optimizer's grads are Fabric's own run's, and within fp32 rounding of the float64 large-batch run of
    both ranks' micro-batches."""
    net = MLP()
    results = str(tmp_path / "rank")
    spawn(_dp_worker, WORLD, copy.deepcopy(net), results, strategy)
    ranks = [torch.load(f"{results}.{r}") for r in range(WORLD)]
    per_rank = [rank_batches(r) for r in range(WORLD)]
    for divide, clip in DDP_CASES:
        big = large_batch_run(copy.deepcopy(net), per_rank, divide, clip)
        for rank, out in enumerate(ranks):
            gacc, stock = out[divide, clip, True], out[divide, clip, False]
            case = f"{strategy}, rank {rank}, divide={divide}, clip={clip}"
            for step, grads in enumerate(gacc[0]):
                assert all(g.abs().max() > 0 for g in grads), f"{case}, step {step}: all-zero grads"
            assert_same(gacc, stock, rtol=1e-6, what=f"{case}: gacc against Fabric's stock run")
            assert_same(gacc, big, rtol=2e-6, what=f"{case}: gacc against the float64 large-batch run")
            assert_same(stock, big, rtol=2e-6, what=f"{case}: Fabric's stock run against the float64 run")
            if clip is not None:
                assert all(n > clip for n in gacc[1])


# -- refused ------------------------------------------------------------------------------------------

def test_core_attach_refuses_fabric_wrappers_and_points_to_the_integration():
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = setup(fabric, MLP())
    with pytest.raises(TypeError, match="FabricSGD") as info:
        gacc_kernels.attach(model, optimizer, steps=K)
    message = str(info.value)
    assert "gacc_kernels.integrations." in message and ".fabric (Lightning Fabric)" in message


@pytest.mark.parametrize(("strategy", "says"), [
    (DeepSpeedStrategy, "accumulates, reduces and scales gradients itself"),
    (FSDPStrategy, "shards the grads (FSDP1)"),
    (SingleDeviceXLAStrategy, "XLA"),
    (DataParallelStrategy, "not supported yet"),
])
def test_fabric_refuses_strategies_that_accumulate_or_shard(strategy, says):
    # most of these cannot be built on a CPU machine (no GPU, DeepSpeed or XLA): the check reads the class
    fabric = types.SimpleNamespace(strategy=object.__new__(strategy))
    with pytest.raises(RuntimeError, match=f"Fabric's {strategy.__name__}") as info:
        gacc_fabric.attach(fabric, None, None, steps=K)
    assert says in str(info.value)


def test_fabric_refuses_64_true():
    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    model, optimizer = setup(fabric, MLP())
    with pytest.raises(RuntimeError, match="64-true"):
        gacc_fabric.attach(fabric, model, optimizer, steps=K)


def test_fabric_refuses_a_module_not_set_up_by_fabric():
    fabric = Fabric(accelerator="cpu", devices=1)
    net = MLP()
    _, optimizer = setup(fabric, net)
    with pytest.raises(TypeError, match=r"fabric\.setup"):
        gacc_fabric.attach(fabric, net, optimizer, steps=K)
