"""The main job: train a small bf16 transformer LM with K micro-steps per optimizer step, three ways,
from the same weights on the same data, with fp32 master weights and plain SGD:

    exact   each micro-step's bf16 grads summed in float64 (the large-batch gradient)
    gacc    gacc_kernels.attach(): fp32 accumulation, the optimizer reads p.main_grad
    stock   autograd's default: loss / K, grads summed in bf16 in p.grad

It prints how far each run's gradients and weights are from `exact`, then times gradient handling
per optimizer step against the eager baseline. Runs on the CPU; uses the GPU when there is one.

    python bench/demo.py [--steps 20] [--k 16]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import gacc_kernels
from common import events_ms, stamp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers.models import TinyLM


def make_model(device):
    torch.manual_seed(0)
    return TinyLM(vocab=256, d=128, layers=4).to(device=device, dtype=torch.bfloat16)


def data(steps, k, device, micro=4):
    """Sequences that repeat a random 5-token motif, so the loss can fall."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps * k):
        motif = torch.randint(0, 256, (micro, 5), generator=g)
        seq = motif.repeat(1, 4)[:, :16]
        out.append(seq.to(device))
    return out


def loss_fn(model, seq):
    logits = model(seq[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


def train(mode, steps, k, batches, device, lr=0.5):
    """Returns (loss per step, fp32 master weights, relative gradient error of the first step)."""
    model = make_model(device)
    params = list(model.parameters())
    master = [p.detach().float().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.0)  # the update is done by hand on the fp32 master weights
    acc = gacc_kernels.attach(model, opt, steps=k, reduction="mean") if mode == "gacc" else None
    exact = {}
    if mode == "exact":
        def hook(p):
            exact[p] = exact.get(p, 0) + p.grad.double()
            p.grad = None
        for p in params:
            p.register_post_accumulate_grad_hook(hook)
    losses, first_grads = [], None
    for step in range(steps):
        total = 0.0
        for seq in batches[step * k: (step + 1) * k]:
            loss = loss_fn(model, seq)
            (loss / k if mode == "stock" else loss).backward()
            total += loss.item() / k
        if mode == "gacc":
            grads = [p.main_grad for p in params]
        elif mode == "stock":
            grads = [p.grad.float() for p in params]
        else:
            grads = [exact.pop(p) / k for p in params]
        if step == 0:
            first_grads = [g.double().clone() for g in grads]
        with torch.no_grad():
            for m, g, p in zip(master, grads, params):
                m.add_(g.float(), alpha=-lr)
                p.copy_(m)
        opt.zero_grad()
        losses.append(total)
    if acc:
        acc.remove()
    return losses, master, first_grads


def rel(a, b):
    num = torch.sqrt(sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)))
    return (num / torch.sqrt(sum((y.double() ** 2).sum() for y in b))).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(stamp())
    print(gacc_kernels.report(), "\n")
    batches = data(args.steps, args.k, device)
    runs = {mode: train(mode, args.steps, args.k, batches, device) for mode in ("exact", "gacc", "stock")}
    print(f"{args.steps} optimizer steps of K={args.k} micro-batches, bf16 TinyLM on {device}")
    print("step  " + "  ".join(f"{m:>8}" for m in runs))
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i:4d}  " + "  ".join(f"{runs[m][0][i]:8.4f}" for m in runs))
    for mode in ("gacc", "stock"):
        print(f"{mode:>5}: first-step gradient error vs exact {rel(runs[mode][2], runs['exact'][2]):.2e}, "
              f"weights after {args.steps} steps vs exact {rel(runs[mode][1], runs['exact'][1]):.2e}")

    # gradient handling per optimizer step, against the eager Megatron-style hook path
    from bench_hooks import Megatron, ParamSet, window

    shapes = [(512, 512)] * 64 + [(512,)] * 64
    model = ParamSet(shapes, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=args.k, reduction="mean")
    t_gacc = events_ms(lambda: window(model, args.k, "gacc", acc=acc), reps=5, warmup=1)
    acc.remove()
    opt.zero_grad()
    helper = Megatron(model)
    t_eager = events_ms(lambda: window(model, args.k, "c-megatron", helper), reps=5, warmup=1)
    helper.remove(model)
    n = sum(p.numel() for p in model.parameters())
    print(f"\ngradient handling of {len(shapes)} tensors ({n / 1e6:.1f} M bf16 elements), K={args.k}, on {device}: "
          f"gacc {t_gacc:.2f} ms, eager add_ hooks + zero + unscale + norm {t_eager:.2f} ms "
          f"({t_eager / t_gacc:.2f}x)")


if __name__ == "__main__":
    main()
