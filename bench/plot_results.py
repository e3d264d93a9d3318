"""PNG plots of the tables in a results folder's hooks.md and e2e*.md (kernels.png comes from
bench_kernels.py itself). Runs anywhere: it only reads the markdown.

    python bench/plot_results.py bench/results/h100-2026-11-23
"""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def tables(path: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, rows) of every markdown table in the file."""
    out, heading, rows = [], "", None
    for line in open(path).read().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if rows is None:
                rows = [cells]
            else:
                rows.append(cells)
        elif rows is not None and not line.startswith("|"):
            out.append((heading, rows[0], rows[1:]))
            rows = None
    if rows is not None:
        out.append((heading, rows[0], rows[1:]))
    return out


def stamp(path: str) -> str:
    return next((line for line in open(path) if line.startswith("device:")), "").strip()


def plot_hooks(folder: str) -> None:
    path = os.path.join(folder, "hooks.md")
    sets = [t for t in tables(path) if t[1][0] == "variant"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5))
    for ax, (heading, header, rows) in zip(axes, sets):
        ks = [h.split("K=")[1] for h in header if "K=" in h]
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            values = [float(v) for v in row[4:4 + len(ks)]]
            ax.bar([j + i * width for j in range(len(ks))], values, width, label=row[0])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"K={k}" for k in ks])
        ax.set_yscale("log")
        ax.set_ylabel("ms per optimizer step (gradient handling)")
        ax.set_title(heading.split(":")[0], fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(stamp(path), fontsize=7)
    fig.savefig(os.path.join(folder, "hooks.png"), dpi=120, bbox_inches="tight")


def plot_e2e(folder: str) -> None:
    """One PNG per e2e*.md table (e2e_k8_1x2048.md -> e2e_k8_1x2048.png)."""
    for name in sorted(f for f in os.listdir(folder) if f.startswith("e2e") and f.endswith(".md")):
        path = os.path.join(folder, name)
        _, header, rows = tables(path)[0]
        time, peak = (next(h for h in header if h.startswith(s)) for s in ("ms / optimizer step", "peak GiB"))
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for ax, column, log in ((axes[0], time, False), (axes[1], peak, False),
                                (axes[2], "rel. L2 error", True)):
            i = header.index(column)
            ax.bar([r[0] for r in rows], [float(r[i]) for r in rows], color="tab:blue")
            ax.set_title(column, fontsize=9)
            ax.tick_params(axis="x", labelsize=7, rotation=20)
            if log:
                ax.set_yscale("log")
        fig.suptitle(stamp(path), fontsize=7)
        fig.savefig(os.path.join(folder, name[:-3] + ".png"), dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    if os.path.exists(os.path.join(sys.argv[1], "hooks.md")):
        plot_hooks(sys.argv[1])
    plot_e2e(sys.argv[1])
