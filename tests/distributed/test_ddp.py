"""attach() on DistributedDataParallel: two gloo processes on the CPU against one large batch."""

import torch
import torch.distributed as dist

import gacc_kernels
from helpers.models import batches, make, weighted_mean
from helpers.spawn import spawn

K, WORLD = 3, 2


class TwoHeads(torch.nn.Module):
    """Rank 0 never uses head_b: DDP must still give both ranks the same grads."""

    def __init__(self):
        super().__init__()
        self.body = make("mlp", torch.float32, "cpu")
        self.head_b = torch.nn.Linear(5, 5)

    def forward(self, x, use_b):
        out = self.body(x)
        return self.head_b(out) if use_b else out


def _train(rank, path, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TwoHeads())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gacc_kernels.attach(model, opt, steps=K, reduction="mean")
    weights = [1.0 + rank, 2.0, 0.5]
    for i, (x, y) in enumerate(batches("mlp", K, "cpu", seed=10 + rank)):
        acc.set_weight(weights[i])
        torch.nn.functional.mse_loss(model(x, use_b=rank == 1), y).backward()
    torch.save([p.grad for p in model.parameters()], f"{results}.{rank}")
    acc.remove()
    dist.destroy_process_group()


def test_ddp_all_reduces_the_flat_buffer_once(tmp_path):
    results = str(tmp_path / "grads")
    spawn(_train, WORLD, str(tmp_path / "store"), results)
    ranks = [torch.load(f"{results}.{r}") for r in range(WORLD)]

    torch.manual_seed(0)
    model = TwoHeads()
    grads, weights = [], []
    for rank in range(WORLD):
        for i, (x, y) in enumerate(batches("mlp", K, "cpu", seed=10 + rank)):
            loss = torch.nn.functional.mse_loss(model(x, use_b=rank == 1), y)
            gs = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            grads.append([torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
                          for g, p in zip(gs, model.parameters())])
            weights.append([1.0 + rank, 2.0, 0.5][i])
    expected = weighted_mean(grads, weights)
    for rank_grads in ranks:
        for g, e in zip(rank_grads, expected):
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-8)
    for a, b in zip(*ranks):
        assert torch.equal(a, b), "every rank must hold the same gradients"
