"""integrations.accelerate.attach under Accelerate's multi-process CPU mode, with DDP and with FSDP2: two
gloo processes against the single-process large-batch run (each window: K micro-batches on each rank)."""
import copy

import pytest
import torch

from helpers.models import MLP
from helpers.spawn import spawn

K, WORLD, N, MICRO = 3, 2, 10, 4  # 10 batches: 5 per rank, windows of 3 + 2 per rank per epoch


def dataset():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N * MICRO, 24, generator=g), torch.randn(N * MICRO, 5, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(rank, net, results, fsdp2):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from gacc_kernels.integrations import accelerate as gacc_accelerate
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    if fsdp2:  # Accelerate enables FSDP on GPUs only: its FSDP2 code paths, run on the CPU processes
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as Accelerate's own init does
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="size_based_wrap", min_num_params=100)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO, shuffle=False)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    acc = gacc_accelerate.attach(accelerator, model, opt)
    seen, took = [], []
    for _ in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                if fsdp2 and not accelerator.sync_gradients:  # private: gacc holds the unsharded sums
                    took.append(bool(acc._parts.events.reducer.unsharded))
                if accelerator.sync_gradients:
                    seen.append([full(p.grad).detach().double().clone() for p in model.parameters()])
                opt.step()
                opt.zero_grad()
    acc.remove()
    params = [full(p.detach()).clone() for p in net.parameters()]
    torch.save({"seen": seen, "took": took, "params": params}, f"{results}.{rank}")
    torch.distributed.destroy_process_group()


def large_batch_run(net):
    """One process, no gacc: each window's micro-batches of both ranks as one batch."""
    data = dataset()
    per_rank = [[data[MICRO * i: MICRO * (i + 1)] for i in range(r, N, WORLD)] for r in range(WORLD)]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    seen = []
    for _ in range(2):
        for start in range(0, N // WORLD, K):
            parts = [b for rank in per_rank for b in rank[start:start + K]]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            torch.nn.functional.mse_loss(net(x), y).backward()
            seen.append([p.grad.detach().double().clone() for p in net.parameters()])
            opt.step()
            opt.zero_grad()
    return seen, net


@pytest.mark.parametrize("fsdp2", [False, True], ids=["ddp", "fsdp2"])
def test_accelerate_two_processes_match_the_large_batch_run(tmp_path, fsdp2):
    """FSDP2: accumulate() turns gradient sync off for the non-final micro-steps (sync_each_batch=False),
    so gacc sums the unsharded grads and reduce-scatters each window once."""
    torch.manual_seed(0)
    net = MLP()
    results = str(tmp_path / "rank")
    spawn(_train, WORLD, copy.deepcopy(net), results, fsdp2)
    ranks = [torch.load(f"{results}.{r}") for r in range(WORLD)]
    seen_big, big = large_batch_run(copy.deepcopy(net))
    for rank in ranks:
        assert len(rank["seen"]) == len(seen_big) == 4
        assert rank["took"] == ([True] * 6 if fsdp2 else []), "FSDP2's no-sync micro-steps go to gacc"
        for step, (a, b) in enumerate(zip(rank["seen"], seen_big)):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * y.abs().max().item(), msg=f"step {step}")
        for p, q in zip(rank["params"], big.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-5)
