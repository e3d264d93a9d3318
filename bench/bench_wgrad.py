"""Weight-grad GEMMs of the Llama-3.2-1B linear layers, and what accumulating their result costs.

Per micro-step of T tokens, over every nn.Linear weight of Llama-3.2-1B (16 layers of q, k, v, o,
gate, up, down, and the 128256 x 2048 lm_head: 113 GEMMs dW = dY^T X, 1.236 B elements), bf16 operands,
in backward order:
    gemm         the GEMM alone, into a bf16 tensor (what autograd makes)
    stock        GEMM into a new bf16 tensor, then p.grad += it in bf16 (autograd from the second
                 micro-step on)
    gacc         GEMM into a new bf16 tensor, then gacc's accumulate_many_ into the fp32 buffer, one
                 launch per 128 MiB of grads (the hook path, attach() today)
    fused        addmm(main, dY^T, X, beta=1, out_dtype=float32, out=main): the GEMM accumulates into
                 the fp32 slot (attach(..., fuse_linear=True, reduction="mean")); fused-store: the window's first
                 micro-step (beta=0)
Bytes moved per weight element besides the GEMM's operands: gemm 2 (write), stock 8 (write; read, read
and write the bf16 grad), gacc 12 (write, read; read and write the fp32 slot), fused 8 (read and write
the slot), fused-store 4 (write).

    python bench/bench_wgrad.py [--out bench/results] [--tokens 1024 2048 8192]
"""
from __future__ import annotations

import argparse

import torch

from common import stamp, table, time_ms, write_report
from gacc_kernels.kernels import ops
from gacc_kernels.kernels.reference import CHUNK

LAYERS = 16
SHAPES = {"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048), "gate": (8192, 2048),
          "up": (8192, 2048), "down": (2048, 8192), "lm_head": (128256, 2048)}
BYTES = {"gemm": 2, "stock": 8, "gacc": 12, "fused": 8, "fused-store": 4}
BUCKET = 128 << 20


class Weight:
    """One linear weight: its fp32 slot in the flat buffer, its bf16 p.grad, a bf16 GEMM output."""

    def __init__(self, name: str, buf: torch.Tensor, start: int):
        self.name = name
        self.out_dim, self.in_dim = SHAPES[name]
        n = self.out_dim * self.in_dim
        self.start = start
        self.main = buf[start: start + n].view(self.out_dim, self.in_dim)
        self.grad = torch.zeros(self.out_dim, self.in_dim, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.grad)


def build() -> tuple[list[Weight], torch.Tensor]:
    names = ["lm_head"] + LAYERS * ["down", "up", "gate", "o", "v", "k", "q"]  # backward order
    sizes = [-(-SHAPES[n][0] * SHAPES[n][1] // CHUNK) * CHUNK for n in names]
    buf = torch.zeros(sum(sizes), device="cuda")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [Weight(n, buf, s) for n, s in zip(names, starts)], buf


def variants(buf, dy, x):
    """name -> fn(weights, T) running that variant over the weights for one micro-step of T tokens."""
    def ops_of(w, t):
        return dy[w.out_dim][:t].t(), x[w.in_dim][:t]

    def gemm(ws, t):
        for w in ws:
            torch.mm(*ops_of(w, t), out=w.out)

    def stock(ws, t):
        for w in ws:
            w.grad.add_(torch.mm(*ops_of(w, t)))

    def gacc(ws, t):
        grads, offsets, size = [], [], 0
        for w in ws:
            g = torch.mm(*ops_of(w, t))
            grads.append(g.view(-1))
            offsets.append(w.start)
            size += g.numel() * g.element_size()
            if size >= BUCKET:
                ops.accumulate_many_(buf, grads, offsets, [False] * len(grads), 1.0)
                grads, offsets, size = [], [], 0
        if grads:
            ops.accumulate_many_(buf, grads, offsets, [False] * len(grads), 1.0)

    def fused(beta):
        def run(ws, t):
            for w in ws:
                torch.addmm(w.main, *ops_of(w, t), beta=beta, out_dtype=torch.float32, out=w.main)
        return run

    return {"gemm": gemm, "stock": stock, "gacc": gacc, "fused": fused(1.0), "fused-store": fused(0.0)}


def check_fused(dy, x) -> float:
    """The fused GEMM against float64 on one q-sized weight at 1024 tokens: max error / max |dW|."""
    a, b = dy[2048][:1024], x[2048][:1024]
    main = torch.full((2048, 2048), float("nan"), device="cuda")
    torch.addmm(main, a.t(), b, beta=0.0, out_dtype=torch.float32, out=main)
    torch.addmm(main, a.t(), b, beta=1.0, alpha=0.5, out_dtype=torch.float32, out=main)
    ref = 1.5 * (a.double().t() @ b.double())
    return ((main.double() - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 8192])
    args = ap.parse_args()
    torch.manual_seed(0)
    weights, buf = build()
    n = sum(w.main.numel() for w in weights)
    t_max = max(args.tokens)
    dy = {d: (torch.randn(t_max, d, device="cuda") * 0.1).bfloat16() for d in {s[0] for s in SHAPES.values()}}
    x = {d: torch.randn(t_max, d, device="cuda").bfloat16() for d in {s[1] for s in SHAPES.values()}}
    err = check_fused(dy, x)
    runs = variants(buf, dy, x)
    names = list(runs)
    rows, shape_rows = [], []
    for t in args.tokens:
        ms = {v: time_ms(lambda v=v, t=t: runs[v](weights, t), reps=20, warmup=2) for v in names}
        tflops = 2 * t * n / ms["gemm"] / 1e9
        rows.append([t, *(ms[v] for v in names), tflops, ms["fused"] / ms["stock"], ms["fused"] / ms["gacc"],
                     ms["stock"] - ms["gemm"], ms["gacc"] - ms["gemm"], ms["fused"] - ms["gemm"]])
        for name in SHAPES:
            one = [next(w for w in weights if w.name == name)]
            per = {v: time_ms(lambda v=v, t=t, one=one: runs[v](one, t), reps=20, warmup=2) for v in names}
            shape_rows.append([t, name, "x".join(map(str, SHAPES[name])), *(per[v] for v in names),
                               per["fused"] / per["stock"], per["fused"] / per["gacc"]])
    md = [f"# Weight-grad GEMMs of Llama-3.2-1B: accumulating their result\n\n{stamp()}\n", __doc__,
          (f"{len(weights)} weights, {n / 1e9:.3f} B elements. The fused GEMM (store, then add with alpha 0.5) "
           f"against float64: max error {err:.2e} of max |dW|.\n"),
          "## All weights, one micro-step (ms)\n",
          table(["tokens", *names, "gemm TFLOP/s", "fused / stock", "fused / gacc", "stock - gemm",
                 "gacc - gemm", "fused - gemm"], rows),
          "\nBytes per weight element besides the GEMM's operands: "
          + ", ".join(f"{v} {b}" for v, b in BYTES.items()) + ".\n",
          "## One weight of each shape (ms)\n",
          table(["tokens", "weight", "shape", *names, "fused / stock", "fused / gacc"], shape_rows)]
    write_report(args.out, "wgrad.md", md)


if __name__ == "__main__":
    main()
