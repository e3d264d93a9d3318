"""The pipeline tests' model, data and float64 reference: a tiny MLP (four blocks, split into 2 or 4 stages),
N_MB micro-batches of ROWS // N_MB rows per schedule.step(), STEPS optimizer steps of SGD."""
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

N_MB, STEPS, LR, ROWS, MAX_NORM = 4, 3, 0.1, 16, 0.05
DIMS = [8, 16, 16, 16, 4]


def full_model(dtype=torch.float64) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh()) for a, b in itertools.pairwise(DIMS[:-1])]
    return torch.nn.Sequential(*layers, torch.nn.Linear(DIMS[-2], DIMS[-1])).to(dtype)


def split(model: torch.nn.Sequential, parts: int) -> list[torch.nn.Sequential]:
    per = len(model) // parts
    return [torch.nn.Sequential(*model[i * per:(i + 1) * per]) for i in range(parts)]


def data(step, o, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 * step + o)
    return torch.randn(ROWS, DIMS[0], generator=g).to(dtype), torch.randn(ROWS, DIMS[-1], generator=g).to(dtype)


def loss_fn(out, target):
    return F.mse_loss(out, target)


def global_clip(params, group=None):
    """Stock: clip by the norm over all ranks' parameters, in the grads' dtype."""
    sq = torch.stack([p.grad.double().square().sum() for p in params]).sum().reshape(1)
    dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    coef = min(1.0, MAX_NORM / (float(norm) + 1e-6))
    for p in params:
        p.grad.mul_(coef)
    return norm


def token_data(step, o, dtype=torch.float64):
    """data() with about a third of the targets masked (NaN): a micro-batch's tokens are its others."""
    x, y = data(step, o, dtype)
    g = torch.Generator().manual_seed(7 + 1000 * step + o)
    y[torch.rand(y.shape, generator=g) < 0.35] = float("nan")
    return x, y


def token_loss_fn(out, target):
    """The mean squared error over the micro-batch's tokens (its targets that are not masked)."""
    valid = ~target.isnan()
    return ((out - target.nan_to_num()) ** 2 * valid).sum() / valid.sum()


def token_counts(target) -> list[int]:
    """Each micro-batch's number of tokens, as the schedule splits the batch."""
    return [int((~t.isnan()).sum()) for t in target.chunk(N_MB)]


def reference(scale, outer, clip=False, rescale=False, ranks=1, tokens=False):
    """float64, one process, the whole model on the whole batch: each step's grads, and the parameters
    after the steps. outer: schedule.step()s per optimizer step, or a list of them per step (an early
    step). rescale: stock's scale_grads with outer > 1 (the earlier step()s divided again). ranks: data
    parallel pipelines, each given a share of the outer loop's batches, averaged as DDP does. tokens:
    token_data, and the mean over all the window's tokens (of every batch, on every pipeline)."""
    model = full_model()
    params = list(model.parameters())
    out = {"grads": [], "norms": []}
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        count = 0
        for o in range(outer if isinstance(outer, int) else outer[step]):
            x, y = (token_data if tokens else data)(step, o)
            for m in range(N_MB):
                rows = slice(m * ROWS // N_MB, (m + 1) * ROWS // N_MB)
                if tokens:  # each token's squared error, summed
                    n = int((~y[rows].isnan()).sum())
                    count += n
                    loss = token_loss_fn(model(x[rows]), y[rows]) * n
                else:
                    loss = loss_fn(model(x[rows]), y[rows])
                gs = torch.autograd.grad(loss, params)
                total = [t + g / (N_MB if scale and not rescale and not tokens else 1) for t, g in zip(total, gs)]
            if rescale:
                total = [t / N_MB for t in total]
        total = [t / (count if tokens else ranks) for t in total]
        if clip:
            norm = torch.stack([g.norm() for g in total]).norm()
            out["norms"].append(norm)
            total = [g * min(1.0, MAX_NORM / (float(norm) + 1e-6)) for g in total]
        out["grads"].append(total)
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= LR * g
    out["params"] = [p.detach().clone() for p in params]
    return out


def close(got, expected, rtol, atol, what):
    assert len(got) == len(expected), what
    for j, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g.double(), e.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, j=j: f"{what}, parameter {j}: {m}")
