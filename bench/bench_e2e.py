"""End to end: K micro-steps of a bf16 LlamaForCausalLM (random weights) per optimizer step.

Times forward + backward + gradient handling per optimizer step (the optimizer update itself is the
same for every variant and left out), peak memory, and the error of the gradient the optimizer gets
against a float64 accumulation of the same micro-step gradients. Variants as in bench_hooks.py, and
gacc-fused: attach(..., fuse_linear=True), whose linear weight grads never take the bf16 rounding that
the reference (a sum of bf16 grads) holds, so its error columns show that rounding, not gacc's.

    python bench/bench_e2e.py [--out bench/results] [--layers 16] [--k 8] [--micro 1 --seq 2048]
                              [--variants gacc,a-bf16]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import gacc_kernels
from bench_hooks import Megatron
from common import events_ms, stamp, table, write_report

VARIANTS = ("gacc", "gacc-fused", "a-bf16", "b-grad_dtype", "c-megatron", "d-naive")


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


def run(model, data, variant, keep_grads):
    """Returns (ms per optimizer step, peak GiB, the fp32 grads the optimizer would read or None)."""
    params = list(model.parameters())
    k = len(data)
    opt = torch.optim.SGD(params, lr=0.0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()  # before the variant's own buffers, so that they count
    helper = acc = None
    if variant in ("gacc", "gacc-fused"):
        acc = gacc_kernels.attach(model, opt, steps=k, fuse_linear=variant == "gacc-fused")
    elif variant == "b-grad_dtype":
        for p in params:
            p.grad_dtype = torch.float32
    elif variant in ("c-megatron", "d-naive"):
        helper = Megatron(model, naive_k=k if variant == "d-naive" else None)
        helper.inv_scale.fill_(1.0 / k)
    divide = variant in ("a-bf16", "b-grad_dtype")

    def backwards():
        for t in data:
            loss = loss_of(model, t)
            (loss / k if divide else loss).backward()

    def step():
        backwards()
        if helper is not None:
            helper.step_passes(full=variant == "c-megatron")  # ends with zero_()
        opt.zero_grad()

    ms = events_ms(step, reps=2, warmup=1)
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**30  # above weights, data and reference
    grads = None
    if keep_grads:
        backwards()  # one more window, kept, for the error
        if variant == "c-megatron":
            torch._amp_foreach_non_finite_check_and_unscale_(helper.main, helper.found_inf, helper.inv_scale)
        if variant in ("gacc", "gacc-fused"):
            grads = [p.main_grad for p in params]
        elif variant in ("c-megatron", "d-naive"):
            grads = helper.main
        else:
            grads = [p.grad for p in params]
        grads = [g.float().clone() for g in grads]
    if acc is not None:
        opt.zero_grad()
        acc.remove()
    if helper is not None:
        helper.remove(model)
    opt.zero_grad()
    if variant == "b-grad_dtype":
        for p in params:
            p.grad_dtype = p.dtype
    return ms, peak, grads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    model = build(args.layers)
    n = sum(p.numel() for p in model.parameters())
    data = micro_batches(args.k, args.micro, args.seq)
    ref = reference_grads(model, data)
    ref_list = [ref[p] for p in model.parameters()]
    ref_norm = torch.sqrt(sum((r * r).sum() for r in ref_list))
    del ref
    variants = args.variants.split(",")
    times = {v: [] for v in variants}
    peaks = dict.fromkeys(variants, 0.0)
    errors = {}
    for rnd in range(args.rounds):  # variants interleaved, the order rotated each round
        for variant in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            ms, peak, grads = run(model, data, variant, keep_grads=rnd == 0)
            times[variant].append(ms)
            peaks[variant] = max(peaks[variant], peak)
            if grads is not None:
                err = torch.sqrt(sum(((g.double() - r) ** 2).sum() for g, r in zip(grads, ref_list))) / ref_norm
                worst = max(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                            for g, r in zip(grads, ref_list))
                errors[variant] = (err.item(), worst)
            del grads
    tokens = args.k * args.micro * args.seq
    rows = []
    for v in variants:
        ms = statistics.median(times[v])
        paired = (statistics.median(t / b for t, b in zip(times[v], times["a-bf16"]))
                  if "a-bf16" in times else float("nan"))  # same round, so drift between rounds cancels
        rows.append([v, f"{ms:.0f}", f"{min(times[v]):.0f}", f"{max(times[v]):.0f}", f"{paired:.3f}",
                     tokens / ms * 1e3, peaks[v], *errors[v]])
    md = [f"# End to end: LlamaForCausalLM, {n / 1e9:.3f} B parameters, bf16, K={args.k}\n\n{stamp()}\n",
          __doc__,
          (f"Micro-batch {args.micro} x {args.seq} tokens, eager attention (deterministic backward), "
           f"{args.layers} layers. Peak: the most memory allocated above what was resident before "
           "the variant was set up (weights, data, the float64 reference), so its accumulation buffers (gacc's "
           "flat fp32 buffer, the Megatron-style main grads) and the grads count. Error: ||g - g64|| / ||g64|| "
           "over all parameters, and the worst per-tensor max|g - g64| / max|g64|.\n"),
          (f"Timing: median over {args.rounds} rounds (variants interleaved, order rotated), each round the "
           "median of 2 windows after 1 warm-up.\n"),
          table(["variant", "ms / optimizer step", "min", "max", "time / a-bf16 (per round)", "tokens/s",
                 "peak GiB incl. buffers", "rel. L2 error", "worst max error"], rows)]
    write_report(args.out, f"e2e_k{args.k}_{args.micro}x{args.seq}.md", md)


if __name__ == "__main__":
    main()
