"""Where exact accumulation changes what users get, and where it does not (CPU, a few minutes).

A small bf16 LlamaForCausalLM (built from a config, nothing downloaded) on a fixed synthetic dataset:
each sequence follows a fixed random bigram map (next = perm[token]) with 10% of the tokens replaced by
noise, so the loss can fall within a few tens of optimizer steps.

Part 1, gradient error against float64, K in {8, 32, 128, 256}: the same bf16 micro-batch grads
(backward of loss / K), accumulated three ways:
    stock      autograd's default, p.grad += g in bf16
    grad_dtype p.grad_dtype = torch.float32 on the bf16 parameters (autograd accumulates in fp32)
    gacc       gacc_kernels.attach(model, opt, steps=K): p.main_grad (fp32) and p.grad (its bf16 rounding)
The reference is the float64 sum of each micro-batch's grad, taken by a tensor hook on every parameter
(before autograd accumulates) in the same run; the runs of the three methods must see bit-identical
micro-batch grads, which the script checks. Error: ||g - ref|| / ||ref|| over all parameters.
`bf16(ref)` is the exact sum rounded once to bf16: the floor for any bf16 p.grad.

Part 2, loss curves at a large K against an fp32 run of the same loop (fp32 weights, fp32 grads,
AdamW): (i) bf16 weights stepped by torch AdamW, stock vs gacc; (ii) bf16 weights stepped through fp32
master weights (MasterAdamW below: fp32 copies stepped with p.main_grad or an fp32 copy of p.grad, then
copied back to bf16), stock vs gacc vs grad_dtype.

    python bench/bench_exactness.py [--out bench/results/cpu-...] [--ks 8,32,128,256] [--k-train 128] [--steps 30]

Writes gradient_error.md/.csv, loss_curves.md/.csv and, when matplotlib is installed, the plots.
One CPU thread and deterministic algorithms, so two runs give the same numbers.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import subprocess
import time

import torch

import gacc_kernels
from common import stamp, table, write_report

VOCAB, SEQ, MICRO = 128, 32, 4  # a micro-batch: 4 sequences of 32 tokens
NOISE = 0.1


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(dtype)


def dataset(n: int, seed: int) -> list[torch.Tensor]:
    """n micro-batches of MICRO x SEQ tokens: next = perm[token], each token noise with probability NOISE."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1234))  # the same map for every seed
    out = []
    for _ in range(n):
        seq = torch.empty(MICRO, SEQ, dtype=torch.long)
        seq[:, 0] = torch.randint(0, VOCAB, (MICRO,), generator=g)
        for t in range(1, SEQ):
            noise = torch.rand(MICRO, generator=g) < NOISE
            seq[:, t] = torch.where(noise, torch.randint(0, VOCAB, (MICRO,), generator=g), perm[seq[:, t - 1]])
        out.append(seq)
    return out


def loss_of(model, seq) -> torch.Tensor:
    return model(input_ids=seq, labels=seq).loss  # transformers computes the loss in fp32


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b))
    den = sum((y.double() ** 2).sum() for y in b)
    return math.sqrt(num / den)


# -- part 1: gradient error against float64 ------------------------------------------------------------

def accumulate(base, method: str, batches) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """One window of len(batches) micro-steps. Returns (the float64 sum of the micro-batch grads, the
    accumulated grads the method gives, extras)."""
    model = copy.deepcopy(base)
    params = list(model.parameters())
    k = len(batches)
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    def hook(i):
        def f(g):
            ref[i] += g.double()  # the micro-batch grad as autograd made it, before accumulation
        return f

    handles = [p.register_hook(hook(i)) for i, p in enumerate(params)]
    acc = None
    if method == "grad_dtype":
        for p in params:
            p.grad_dtype = torch.float32
    if method == "gacc":
        opt = torch.optim.AdamW(params, lr=0.0)
        acc = gacc_kernels.attach(model, opt, steps=k)
    for seq in batches:
        (loss_of(model, seq) / k).backward()
    extras = {}
    if method == "gacc":
        got = [p.main_grad.clone() for p in params]
        extras["bf16_grad"] = [p.grad.clone() for p in params]
        acc.remove()
    else:
        got = [p.grad.clone() for p in params]
    extras["dtype"] = str(got[0].dtype).replace("torch.", "")
    for h in handles:
        h.remove()
    return ref, got, extras


def part1(ks: list[int], seeds: list[int], out: str) -> list[str]:
    base = make_model(torch.bfloat16)
    n_params = sum(p.numel() for p in base.parameters())
    rows, csv_rows, identical = [], [], True
    t0 = time.perf_counter()
    for k in ks:
        per = {m: [] for m in ("stock", "grad_dtype", "gacc", "gacc_bf16", "floor", "stock_worst")}
        same_bits, refs = [], []
        for seed in seeds:
            batches = dataset(k, seed)
            ref, stock, _ = accumulate(base, "stock", batches)
            ref_b, gd, _ = accumulate(base, "grad_dtype", batches)
            ref_c, ga, ex = accumulate(base, "gacc", batches)
            refs.append(ref)
            same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ref, ref_b, ref_c))
            identical &= same
            same_bits.append(all(torch.equal(a, b) for a, b in zip(gd, ga)))
            errs = {"stock": rel(stock, ref), "grad_dtype": rel(gd, ref), "gacc": rel(ga, ref),
                    "gacc_bf16": rel(ex["bf16_grad"], ref),
                    "floor": rel([r.to(torch.bfloat16) for r in ref], ref),
                    "stock_worst": max(rel([a], [r]) for a, r in zip(stock, ref) if r.abs().sum() > 0)}
            for m, e in errs.items():
                per[m].append(e)
                csv_rows.append([k, seed, m, f"{e:.6e}"])
        med = {m: sorted(v)[len(v) // 2] for m, v in per.items()}
        rows.append([k, med["stock"], med["grad_dtype"], med["gacc"], med["gacc_bf16"], med["floor"],
                     f"{min(per['stock']):.3g}-{max(per['stock']):.3g}", med["stock_worst"],
                     rel(refs[0], refs[1]) if len(refs) > 1 else "",
                     f"{sum(same_bits)}/{len(same_bits)}"])
        print(f"K={k}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    with open(os.path.join(out, "gradient_error.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["K", "seed", "method", "rel_error"])
        w.writerows(csv_rows)
    md = [(f"# Gradient error against float64 ({n_params / 1e3:.0f} K-parameter bf16 LlamaForCausalLM, "
           f"{MICRO} x {SEQ} tokens per micro-batch)"), "",
          (f"Relative error ||g - ref|| / ||ref|| over all parameters, median of {len(seeds)} data seeds "
           f"({', '.join(map(str, seeds))}); ref is the float64 sum of the same bf16 micro-batch grads. "
           f"Every method's run saw bit-identical micro-batch grads: {identical}. Worst tensor: the largest "
           "error of one parameter tensor against its own ref. Seeds 0 and 1's refs apart: "
           "||ref_0 - ref_1|| / ||ref_1||, two windows of K other micro-batches at the same weights, "
           "the sampling noise of the gradient itself, for scale."), "",
          table(["K", "stock bf16 p.grad", "grad_dtype=fp32 p.grad", "gacc p.main_grad (fp32)",
                 "gacc p.grad (bf16)", "bf16(ref): one rounding", "stock, min-max over seeds",
                 "stock, worst tensor", "seeds 0 and 1's refs apart", "grad_dtype == gacc bits"], rows), "",
          f"part 1 took {time.perf_counter() - t0:.0f} s"]
    return md, rows


# -- part 2: loss curves --------------------------------------------------------------------------------

class MasterAdamW(torch.optim.Optimizer):
    """bf16 parameters stepped through fp32 master weights: the fp32 copies take an AdamW step with
    p.main_grad (gacc) or an fp32 copy of p.grad, and are copied back into the bf16 parameters."""

    def __init__(self, params, **kw):
        super().__init__(params, {})
        self.masters = [p.detach().float().clone() for g in self.param_groups for p in g["params"]]
        self.inner = torch.optim.AdamW(self.masters, **kw)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        for p, m in zip(params, self.masters):
            g = getattr(p, "main_grad", None)
            m.grad = (g if g is not None else p.grad).float()
        self.inner.step()
        for p, m in zip(params, self.masters):
            p.copy_(m)
            m.grad = None


def train(variant: str, batches, k: int, steps: int, lr: float):
    """Returns (mean loss of each window, the fp32 view of the final weights the optimizer keeps)."""
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model = make_model(dtype)
    params = list(model.parameters())
    kw = {"lr": lr, "betas": (0.9, 0.95), "weight_decay": 0.01}
    master = variant.startswith("master")
    opt = MasterAdamW(params, **kw) if master else torch.optim.AdamW(params, **kw)
    if variant.endswith("grad_dtype"):
        for p in params:
            p.grad_dtype = torch.float32
    acc = gacc_kernels.attach(model, opt, steps=k) if variant.endswith("gacc") else None
    losses = []
    for step in range(steps):
        total = 0.0
        for seq in batches[step * k:(step + 1) * k]:
            loss = loss_of(model, seq)
            (loss / k).backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total / k)
    if acc:
        acc.remove()
    weights = opt.masters if master else [p.detach().float() for p in params]
    return losses, weights


VARIANTS = [
    ("fp32", "fp32 weights and grads, AdamW (the reference)"),
    ("bf16-stock", "(i) bf16 weights, torch AdamW, stock bf16 accumulation"),
    ("bf16-gacc", "(i) bf16 weights, torch AdamW, gacc (AdamW reads gacc's bf16 p.grad)"),
    ("master-stock", "(ii) bf16 weights, fp32 master AdamW, stock bf16 accumulation (p.grad.float())"),
    ("master-gacc", "(ii) bf16 weights, fp32 master AdamW, gacc (p.main_grad)"),
    ("master-grad_dtype", "(ii) bf16 weights, fp32 master AdamW, p.grad_dtype = float32"),
]


def part2(k: int, steps: int, lr: float, out: str):
    batches = dataset(k * steps, seed=100)
    t0 = time.perf_counter()
    runs = {}
    for name, _ in VARIANTS:
        runs[name] = train(name, batches, k, steps, lr)
        print(f"{name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    ref_loss, ref_w = runs["fp32"]
    rows = []
    for name, desc in VARIANTS:
        losses, w = runs[name]
        d = [abs(a - b) for a, b in zip(losses, ref_loss)]
        twin = {"bf16-stock": "bf16-gacc", "master-stock": "master-gacc"}.get(name)
        rows.append([name, desc, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{max(d):.4f}",
                     f"{sum(d) / len(d):.4f}", f"{losses[-1] - ref_loss[-1]:+.4f}", f"{rel(w, ref_w):.3g}",
                     f"{rel(w, runs[twin][1]):.3g}" if twin else "",
                     f"{max(abs(a - b) for a, b in zip(losses, runs[twin][0])):.4f}" if twin else ""])
    same = torch.equal(torch.tensor(runs["master-gacc"][0]), torch.tensor(runs["master-grad_dtype"][0])) and \
        all(torch.equal(a, b) for a, b in zip(runs["master-gacc"][1], runs["master-grad_dtype"][1]))
    with open(os.path.join(out, "loss_curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [n for n, _ in VARIANTS])
        for i in range(steps):
            w.writerow([i] + [f"{runs[n][0][i]:.6f}" for n, _ in VARIANTS])
    md = [(f"# Loss curves against fp32, K={k}, {steps} optimizer steps "
           f"({k * MICRO * SEQ} tokens per step, AdamW lr {lr}, betas (0.9, 0.95), weight decay 0.01)"), "",
          ("Loss of a step: the mean of its K micro-batch losses, each computed by that run's own model. "
           "Weights vs fp32: ||w - w_fp32|| / ||w_fp32|| after the last step, over the weights the optimizer "
           "keeps (the fp32 masters in (ii)). "
           "Its gacc twin: the run that differs from a stock run only in how the grads are accumulated."), "",
          table(["run", "what", "first loss", "final loss", "max abs diff from fp32", "mean abs diff",
                 "final - fp32 final", "weights vs fp32", "weights vs its gacc twin",
                 "max abs loss diff from its gacc twin"], rows), "",
          f"master-gacc and master-grad_dtype bit-identical (losses and master weights): {same}", "",
          "Every step (also in loss_curves.csv):", "",
          table(["step"] + [n for n, _ in VARIANTS],
                [[i] + [f"{runs[n][0][i]:.4f}" for n, _ in VARIANTS] for i in range(steps)]), "",
          f"part 2 took {time.perf_counter() - t0:.0f} s"]
    return md, runs


# -- plots ----------------------------------------------------------------------------------------------

def plots(out: str, ks, rows1, runs, k_train) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plots; the data are in the .csv and .md files."
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for col, label in [(1, "stock bf16"), (2, "grad_dtype=fp32"), (3, "gacc main_grad (fp32)"),
                       (4, "gacc p.grad (bf16)"), (5, "bf16(ref), one rounding")]:
        ax.loglog(ks, [r[col] for r in rows1], "o-", label=label)
    ax.set_xlabel("K micro-batches"), ax.set_ylabel("relative error vs float64"), ax.legend(fontsize=8)
    ax.set_xticks(ks, [str(k) for k in ks])
    fig.tight_layout(), fig.savefig(os.path.join(out, "gradient_error.png"), dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, _ in VARIANTS:
        axes[0].plot(runs[name][0], label=name)
        axes[1].plot([a - b for a, b in zip(runs[name][0], runs["fp32"][0])], label=name)
    axes[0].set_ylabel("training loss"), axes[1].set_ylabel("loss - fp32 loss")
    for ax in axes:
        ax.set_xlabel(f"optimizer step (K={k_train})"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(os.path.join(out, "loss_curves.png"), dpi=120)
    return "plots: gradient_error.png, loss_curves.png"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-2026-12-06-exactness"))
    ap.add_argument("--ks", default="8,32,128,256")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k-train", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=["1", "2", "all"], default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    import transformers

    head = [(f"{stamp()}; transformers {transformers.__version__}; {torch.get_num_threads()} thread(s); "
             f"commit {commit}"), ""]
    ks = [int(k) for k in args.ks.split(",")]
    rows1, runs = None, None
    if args.part in ("1", "all"):
        md, rows1 = part1(ks, [int(s) for s in args.seeds.split(",")], args.out)
        write_report(args.out, "gradient_error.md", head + md)
    if args.part in ("2", "all"):
        md, runs = part2(args.k_train, args.steps, args.lr, args.out)
        write_report(args.out, "loss_curves.md", head + md)
    if rows1 and runs:
        print(plots(args.out, ks, rows1, runs, args.k_train))


if __name__ == "__main__":
    main()
