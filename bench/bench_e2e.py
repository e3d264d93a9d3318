"""End to end: K micro-steps of a bf16 LlamaForCausalLM (random weights) per optimizer step.

Times forward + backward + gradient handling per optimizer step (the optimizer update itself is the
same for every variant and left out), peak memory, and the error of the gradient the optimizer gets
against a float64 accumulation of the same micro-step gradients. Variants as in bench_hooks.py, and
gacc-fused: attach(..., fuse_linear=True, reduction="mean"), whose linear weight grads never take the bf16 rounding that
the reference (a sum of bf16 grads) holds, so its error columns show that rounding, not gacc's.

Timing: each variant has its own copy of the model (the same weights), set up once, and the variants
take turns window by window, the order rotated each round. The host's drift, which moves a window by
10-30% on a shared machine when the micro-step is host-bound (1 x 2048 tokens), then falls on every
variant of a round alike, and the ratio to stock is taken round by round.

    python bench/bench_e2e.py [--out bench/results] [--layers 16] [--k 8] [--micro 1 --seq 2048]
                              [--rounds 20] [--variants gacc,a-bf16]
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch

import gacc_kernels
from bench_hooks import Megatron
from common import stamp, table, write_report

VARIANTS = ("gacc", "gacc-fused", "a-bf16", "b-grad_dtype", "c-megatron", "d-naive")
STOCK = "a-bf16"


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=6144, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)


def micro_batches(k: int, micro: int, seq: int):
    g = torch.Generator(device="cuda").manual_seed(1)
    return [torch.randint(0, 32000, (micro, seq), device="cuda", generator=g) for _ in range(k)]


def loss_of(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def reference_grads(model, data):
    """float64 sum of each micro-step's bf16 grads, divided by K (the number of micro-batches)."""
    ref = {p: torch.zeros(p.shape, dtype=torch.float64, device="cuda") for p in model.parameters()}

    def hook(p):
        ref[p] += p.grad.double()
        p.grad = None
    hs = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    for t in data:
        loss_of(model, t).backward()
    for h in hs:
        h.remove()
    return {p: r / len(data) for p, r in ref.items()}


class Setup:
    """One variant's gradient handling on a model, for as many windows as asked."""

    def __init__(self, model, variant: str, k: int):
        self.model, self.variant, self.k = model, variant, k
        self.params = list(model.parameters())
        self.opt = torch.optim.SGD(self.params, lr=0.0)
        self.helper = self.acc = None
        if variant in ("gacc", "gacc-fused"):
            self.acc = gacc_kernels.attach(model, self.opt, steps=k, fuse_linear=variant == "gacc-fused",
                                           reduction="mean")
        elif variant == "b-grad_dtype":
            for p in self.params:
                p.grad_dtype = torch.float32
        elif variant in ("c-megatron", "d-naive"):
            self.helper = Megatron(model, naive_k=k if variant == "d-naive" else None)
            self.helper.inv_scale.fill_(1.0 / k)

    def backwards(self, data) -> None:
        divide = self.variant in (STOCK, "b-grad_dtype")
        for t in data:
            loss = loss_of(self.model, t)
            (loss / self.k if divide else loss).backward()

    def window(self, data) -> None:
        self.backwards(data)
        if self.helper is not None:
            self.helper.step_passes(full=self.variant == "c-megatron")  # ends with zero_()
        self.opt.zero_grad()

    def grads(self, data) -> list[torch.Tensor]:
        """One more window, and the fp32 grads the optimizer would read from it."""
        self.backwards(data)
        if self.variant == "c-megatron":
            h = self.helper
            torch._amp_foreach_non_finite_check_and_unscale_(h.main, h.found_inf, h.inv_scale)
        if self.acc is not None:
            grads = [p.main_grad for p in self.params]
        elif self.helper is not None:
            grads = self.helper.main
        else:
            grads = [p.grad for p in self.params]
        grads = [g.float().clone() for g in grads]
        self.opt.zero_grad()
        return grads

    def remove(self) -> None:
        self.opt.zero_grad()
        if self.acc is not None:
            self.acc.remove()
        if self.helper is not None:
            self.helper.remove(self.model)
        self.opt.zero_grad()
        if self.variant == "b-grad_dtype":
            for p in self.params:
                p.grad_dtype = p.dtype


def peak_and_error(model, data, variant, ref, ref_norm):
    """Peak GiB above what was resident before the variant's setup (so its buffers count) over two
    windows, and the errors of the second window's grads against the float64 reference."""
    gc.collect()  # the previous variant's buffers, held by reference cycles, would count as resident
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    setup = Setup(model, variant, len(data))
    setup.window(data)
    grads = setup.grads(data)
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**30
    setup.remove()
    err = torch.sqrt(sum(((g.double() - r) ** 2).sum() for g, r in zip(grads, ref))) / ref_norm
    worst = max(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, ref))
    return peak, err.item(), worst


def timed_ms(setup: Setup, data) -> tuple[float, float]:
    """The window's wall time, and the CPU time of the whole process (every thread: autograd runs CUDA
    backwards on its own) during it, in ms. Host-bound, the second is the host's work without the
    preemption and waits that make the first vary from round to round."""
    torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    setup.window(data)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, (time.process_time() - cpu) * 1e3


def median_ci(values: list[float]) -> tuple[float, float, float]:
    """The median and a distribution-free 95% confidence interval for it (order statistics)."""
    v, n = sorted(values), len(values)
    j = 0  # the largest j with P(Binomial(n, 1/2) < j) <= 0.025: the interval is v[j-1] .. v[n-j]
    while sum(math.comb(n, i) for i in range(j + 1)) / 2**n <= 0.025:
        j += 1
    return statistics.median(v), v[max(j - 1, 0)], v[min(n - j, n - 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    variants = args.variants.split(",")
    if STOCK not in variants:
        variants.append(STOCK)
    data = micro_batches(args.k, args.micro, args.seq)

    model = build(args.layers)
    n = sum(p.numel() for p in model.parameters())
    ref = reference_grads(model, data)
    ref = [ref[p] for p in model.parameters()]
    ref_norm = torch.sqrt(sum((r * r).sum() for r in ref))
    measured = {v: peak_and_error(model, data, v, ref, ref_norm) for v in variants}
    del model, ref
    torch.cuda.empty_cache()

    setups = {v: Setup(build(args.layers), v, args.k) for v in variants}
    for setup in setups.values():  # warm-up
        setup.window(data)
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            wall, host = timed_ms(setups[v], data)
            times[v].append(wall)
            cpu[v].append(host)

    tokens = args.k * args.micro * args.seq
    rows = []
    for v in variants:
        ms = statistics.median(times[v])
        ratio, lo, hi = median_ci([t / s for t, s in zip(times[v], times[STOCK])])
        cpu_ratio, cpu_lo, cpu_hi = median_ci([t / s for t, s in zip(cpu[v], cpu[STOCK])])
        peak, err, worst = measured[v]
        rows.append([v, f"{ms:.0f}", f"{min(times[v]):.0f}", f"{max(times[v]):.0f}",
                     f"{ratio:.3f} ({lo:.3f}-{hi:.3f})", tokens / ms * 1e3, f"{statistics.median(cpu[v]):.0f}",
                     f"{cpu_ratio:.3f} ({cpu_lo:.3f}-{cpu_hi:.3f})", peak, err, worst])
    md = [f"# End to end: LlamaForCausalLM, {n / 1e9:.3f} B parameters, bf16, K={args.k}\n\n{stamp()}\n",
          __doc__,
          (f"Micro-batch {args.micro} x {args.seq} tokens, eager attention (deterministic backward), "
           f"{args.layers} layers. Peak: the most memory allocated above what was resident before the variant "
           "was set up (weights, data, the float64 reference), so its accumulation buffers (gacc's flat fp32 "
           "buffer, the Megatron-style main grads) and the grads count. Error: ||g - g64|| / ||g64|| over all "
           "parameters, and the worst per-tensor max|g - g64| / max|g64|.\n"),
          (f"Timing: {args.rounds} rounds after a warm-up window, one window per variant per round, each timed "
           f"with a sync on both sides. Time / {STOCK}: the median over rounds of the ratio within a round, "
           "with a distribution-free 95% confidence interval of that median. Host CPU: the process's CPU time "
           "(all threads) during the window, and its ratio to stock's in the same way.\n"),
          table(["variant", "ms / optimizer step (median)", "min", "max", f"time / {STOCK} (95% CI)",
                 "tokens/s", "host CPU ms", f"host CPU / {STOCK} (95% CI)", "peak GiB incl. buffers",
                 "rel. L2 error", "worst max error"], rows)]
    write_report(args.out, f"e2e_k{args.k}_{args.micro}x{args.seq}.md", md)


if __name__ == "__main__":
    main()
