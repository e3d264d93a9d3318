"""GB/s of each op against a device-to-device copy, over sizes from 1M to 1B elements.

    python bench/bench_kernels.py [--out bench/results] [--max-log2 30]
"""
from __future__ import annotations

import argparse
import os

import torch

from common import gbps, stamp, table, time_ms, write_report
from gacc_kernels.kernels import ops, reference, triton_ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--max-log2", type=int, default=30)
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    ext = {name: getattr(torch.ops.gacc, name) for name in ops.OPS} if ops.EXTENSION_ERROR is None else None
    impls = {"cuda-ext": ext, "triton": {name: getattr(triton_ops, name) for name in ops.OPS}}
    rows, plot = [], {}
    for log2 in range(20, args.max_log2 + 1, 2):
        for row in _measure(log2, dev, impls):
            rows.append(row)
            plot.setdefault(row[1], []).append((1 << log2, row[4]))
        torch.cuda.empty_cache()

    md = [f"# Kernel bandwidth\n\n{stamp()}\n",
          ("Median of triton.testing.do_bench; bytes per element counted by hand "
           "(accumulate: read 2 + 4, write 4; store: read 2, write 4; finalize: read 4, write 4 [+2 bf16 out]; "
           "last micro-step: read 2 + 4, write 4 + 2).\n"),
          table(["n", "op", "B/elem", "ms", "GB/s", "% of copy"], rows)]
    write_report(args.out, "kernels.md", md)
    _plot(plot, os.path.join(args.out, "kernels.png"))


def _measure(log2: int, dev: str, impls: dict) -> list[list]:
    """Rows [n, op, bytes/elem, ms, GB/s, % of copy] at n = 2^log2 elements."""
    n = 1 << log2
    buf = torch.randn(n, device=dev)
    g = torch.randn(n, device=dev).bfloat16()
    dst = torch.empty_like(buf)
    copy_ms = time_ms(lambda: dst.copy_(buf))
    copy_bw = gbps(8 * n, copy_ms)
    one = torch.ones(1, device=dev)
    found_inf = torch.zeros(1, device=dev)
    partials = torch.zeros(reference.norm_partials_size(n), device=dev)
    out16 = torch.empty(n, device=dev, dtype=torch.bfloat16)
    g_last, half = g.clone(), torch.full((1,), 0.5, device=dev)  # (buf + g) / 2 stays finite
    cases = [("eager add_(bf16, alpha)", 10, lambda: buf.add_(g, alpha=0.125))]
    for name, impl in impls.items():
        if impl is None:
            continue
        cases += [
            (f"{name} accumulate", 10, lambda impl=impl: impl["accumulate_"](buf, g, 0.125, False)),
            (f"{name} store", 6, lambda impl=impl: impl["accumulate_"](buf, g, 0.125, True)),
            (f"{name} finalize", 8, lambda impl=impl: impl["finalize_"](buf, one, found_inf, partials, None)),
            (f"{name} finalize+bf16 out", 10,
             lambda impl=impl: impl["finalize_"](buf, one, found_inf, partials, out16)),
            (f"{name} last micro-step (accumulate+finalize, bf16 result over the grad)", 12,
             lambda impl=impl: impl["accumulate_finalize_"](buf, [g_last], [0], [False], 1.0, half, found_inf,
                                                            partials, True)),
        ]
    rows = []
    for label, bpe, fn in cases:
        ms = time_ms(fn)
        bw = gbps(bpe * n, ms)
        rows.append([f"2^{log2}", label, bpe, ms, bw, 100 * bw / copy_bw])
    rows.append([f"2^{log2}", "d2d copy fp32", 8, copy_ms, copy_bw, 100.0])
    return rows


def _plot(series, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                linestyle="--" if "copy" in label or "eager" in label else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements")
    ax.set_ylabel("GB/s (bytes counted by hand)")
    ax.set_title(stamp(), fontsize=7)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
