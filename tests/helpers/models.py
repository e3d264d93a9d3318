"""Small real models and the stock-PyTorch references that attach() is checked against."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep: tens of milliseconds of one stream kept busy


class MLP(torch.nn.Module):
    def __init__(self, d_in=24, hidden=48, d_out=5):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class TinyLM(torch.nn.Module):
    """A two-layer causal transformer LM."""

    def __init__(self, vocab=61, d=32, layers=2, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(16, d) * 0.02)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class Checkpointed(torch.nn.Module):
    """`shared` is used three times per micro-step, twice inside an activation checkpoint: with
    use_reentrant=True its hook fires once per use."""

    def __init__(self, reentrant: bool, hidden: int = 8):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 8))
        self.shared = torch.nn.Linear(8, 8)
        self.reentrant = reentrant

    def forward(self, x):
        h = checkpoint(lambda t: self.shared(self.inner(self.shared(t))), x, use_reentrant=self.reentrant)
        return self.shared(h)


class SlowBackward(torch.autograd.Function):
    """The identity; its backward keeps the stream it runs on (its forward's) busy first."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        torch.cuda._sleep(SLEEP_CYCLES)
        return grad


def make(kind: str, dtype: torch.dtype, device: str, **kw) -> torch.nn.Module:
    torch.manual_seed(1234)
    model = MLP(**kw) if kind == "mlp" else TinyLM(**kw)
    return model.to(device=device, dtype=dtype)


def batches(kind: str, k: int, device: str, micro: int = 4, seed: int = 7):
    """k micro-batches of random inputs and targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        if kind == "mlp":
            out.append((torch.randn(micro, 24, generator=g).to(device), torch.randn(micro, 5, generator=g).to(device)))
        else:
            tok = torch.randint(0, 61, (micro, 9), generator=g).to(device)
            out.append((tok[:, :-1], tok[:, 1:]))
    return out


def loss_fn(kind: str, model, x, y):
    if kind == "mlp":
        return F.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
    logits = model(x).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def micro_grads(model, kind, data, scale: float = 1.0):
    """Each micro-batch's gradients from stock autograd (on a copy), as float64 lists."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    out = []
    for x, y in data:
        gs = torch.autograd.grad(loss_fn(kind, ref, x, y) * scale, params, allow_unused=True)
        out.append([None if g is None else g.double() for g in gs])
    return out


def weighted_mean(grads, weights=None):
    """sum_k w_k g_k / sum_k w_k in float64; None where no micro-step produced a grad."""
    weights = weights or [1.0] * len(grads)
    total = []
    for i in range(len(grads[0])):
        parts = [w * g[i] for w, g in zip(weights, grads) if g[i] is not None]
        total.append(None if not parts else sum(parts) / sum(weights))
    return total
