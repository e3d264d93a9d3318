"""integrations.accelerate.attach under Accelerate's multi-process CPU mode: two gloo processes
against the single-process large-batch run (each window: K micro-batches on each rank)."""
import copy

import torch

from helpers.models import MLP
from helpers.spawn import spawn

K, WORLD, N, MICRO = 3, 2, 10, 4  # 10 batches: 5 per rank, windows of 3 + 2 per rank per epoch


def dataset():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N * MICRO, 24, generator=g), torch.randn(N * MICRO, 5, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _train(rank, net, results):
    from accelerate import Accelerator

    from gacc_kernels.integrations import accelerate as gacc_accelerate
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO, shuffle=False)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    acc = gacc_accelerate.attach(accelerator, model, opt)
    seen = []
    for _ in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    seen.append([p.grad.detach().double().clone() for p in model.parameters()])
                opt.step()
                opt.zero_grad()
    acc.remove()
    torch.save({"seen": seen, "params": [p.detach().clone() for p in net.parameters()]}, f"{results}.{rank}")
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


def test_accelerate_two_processes_match_the_large_batch_run(tmp_path):
    torch.manual_seed(0)
    net = MLP()
    results = str(tmp_path / "rank")
    spawn(_train, WORLD, copy.deepcopy(net), results)
    ranks = [torch.load(f"{results}.{r}") for r in range(WORLD)]
    seen_big, big = large_batch_run(copy.deepcopy(net))
    for rank in ranks:
        assert len(rank["seen"]) == len(seen_big) == 4
        for step, (a, b) in enumerate(zip(rank["seen"], seen_big)):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * y.abs().max().item(), msg=f"step {step}")
        for p, q in zip(rank["params"], big.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-5)
