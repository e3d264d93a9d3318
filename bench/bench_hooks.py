"""The real hook path during backward, against the eager code a user would otherwise write.

Parameter sets: Llama-3.2-1B shapes (146 bf16 tensors, 1.236 B elements) and many small tensors.
A backward hands each parameter a precomputed random bf16 grad (an autograd Function whose backward
returns them), so only gradient handling is timed. Variants:
    gacc     attach(): fused bucketed accumulate, first micro-step stores, one finalize pass
    a-bf16   autograd default, p.grad += g in bf16 (fast, loses precision)
    b-grad_dtype  p.grad_dtype = torch.float32 (native fp32 accumulation, torch >= 2.10)
    c-megatron    hook main_grad.add_(p.grad); p.grad = None; at the step zero_(), GradScaler's
                  unscale + inf check, clip_grad_norm_'s norm and scale
    d-naive  hook main_grad += p.grad.float() / K; p.grad = None; zero_() at the step

    python bench/bench_hooks.py [--out bench/results] [--quick]

--stats instead times gacc with attach(grad_stats=True) against gacc without, alternating in the same
run (the noise scale's cost: one more reduction in the accumulate pass, and a few small reductions
when a window closes), and the accumulate kernels alone with and without stat partials; it writes
hooks_stats.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gacc_kernels
from common import events_ms, gbps, stamp, table, time_ms, write_report

LLAMA_1B = ([(128256, 2048)] + 16 * [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048),
                                     (8192, 2048), (8192, 2048), (2048, 8192), (2048,), (2048,)] + [(2048,)])


class _Inject(torch.autograd.Function):
    """Forward: a scalar that depends on every parameter. Backward: the prepared grads."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return (None, *[g.view_as(g) for g in ctx.grads])  # fresh views, so AccumulateGrad steals them


class ParamSet(torch.nn.Module):
    def __init__(self, shapes, device):
        super().__init__()
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.empty(s, device=device, dtype=torch.bfloat16).normal_()) for s in shapes)
        self.grads = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes]

    def forward(self):
        return _Inject.apply(self.grads, *self.ps)


class Megatron:
    """c: contiguous fp32 main_grad, add_ hooks, and the separate step-time passes."""

    def __init__(self, model, naive_k: int | None = None):
        params = list(model.parameters())
        self.buf = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
        self.main, off = [], 0
        for p in params:
            p.main_grad = self.buf[off: off + p.numel()].view(p.shape)
            self.main.append(p.main_grad)
            off += p.numel()
        self.found_inf = torch.zeros(1, device=self.buf.device)
        self.inv_scale = torch.ones(1, device=self.buf.device)
        hook = self._naive if naive_k else self._add
        self.k = naive_k
        self.handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    @staticmethod
    def _add(p):
        p.main_grad.add_(p.grad)
        p.grad = None

    def _naive(self, p):
        p.main_grad += p.grad.float() / self.k
        p.grad = None

    def step_passes(self, full: bool):
        if full:  # GradScaler unscale + inf check, then clip_grad_norm_
            torch._amp_foreach_non_finite_check_and_unscale_(self.main, self.found_inf, self.inv_scale)
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.main)))
            torch._foreach_mul_(self.main, (1.0 / (total + 1e-6)).clamp(max=1.0))
        self.buf.zero_()

    def remove(self, model):
        for h in self.handles:
            h.remove()
        for p in model.parameters():
            del p.main_grad


def window(model, k, variant, helper=None, acc=None):
    """One optimizer step's worth of gradient work: k backwards and the step-time passes."""
    for _ in range(k):
        model().backward()
    if variant == "gacc":
        acc.optimizer.zero_grad()
    elif variant in ("c-megatron", "d-naive"):
        helper.step_passes(full=variant == "c-megatron")
    for p in model.parameters():
        p.grad = None


def run_variant(model, variant, ks, bucket_mb=None):
    """{k: ms per optimizer step} and ms per steady micro-step."""
    helper = acc = None
    params = list(model.parameters())
    buckets = {} if bucket_mb is None else {"bucket_bytes": bucket_mb << 20}
    if variant == "gacc":
        opt = torch.optim.SGD(params, lr=0.0)
        acc = gacc_kernels.attach(model, opt, steps=10**9, **buckets)
    elif variant == "b-grad_dtype":
        for p in params:
            p.grad_dtype = torch.float32
    elif variant == "c-megatron":
        helper = Megatron(model)
    elif variant == "d-naive":
        helper = Megatron(model, naive_k=8)
    model().backward()  # first micro-step (store / steal) out of the way

    def ten_micro_steps():
        for _ in range(10):
            model().backward()
    micro = events_ms(ten_micro_steps, reps=5) / 10
    for p in params:
        p.grad = None
    if acc is not None:
        acc.remove()
        opt.zero_grad()
    per_step = {}
    for k in ks:
        if variant == "gacc":
            acc = gacc_kernels.attach(model, opt, steps=k, **buckets)
        # three windows back to back, as in training, where the host runs ahead of the GPU
        per_step[k] = events_ms(lambda k=k, acc=acc: [window(model, k, variant, helper, acc) for _ in range(3)],
                                reps=3, warmup=1) / 3
        if acc is not None:
            acc.remove()
            opt.zero_grad()
    if helper is not None:
        helper.remove(model)
    for p in params:
        p.grad = None
    if variant == "b-grad_dtype":
        for p in params:
            p.grad_dtype = p.dtype
    return per_step, micro


def hook_host_us(model, variant) -> float:
    """Median host microseconds inside one parameter hook (launches included when it flushes)."""
    samples = []
    if variant == "gacc":
        acc = gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), steps=10**9)
        inner = acc._capture._on_grad

        def timed(slot, p):
            t = time.perf_counter_ns()
            inner(slot, p)
            samples.append(time.perf_counter_ns() - t)
        acc._capture._on_grad = timed
        for _ in range(5):
            model().backward()
        acc.remove()
    else:
        helper = Megatron(model)
        for h in helper.handles:
            h.remove()

        def timed_c(p):
            t = time.perf_counter_ns()
            Megatron._add(p)
            samples.append(time.perf_counter_ns() - t)
        handles = [p.register_post_accumulate_grad_hook(timed_c) for p in model.parameters()]
        for _ in range(5):
            model().backward()
        for h in handles:
            h.remove()
        helper.remove(model)
    torch.cuda.synchronize()
    for p in model.parameters():
        p.grad = None
    return statistics.median(samples) / 1e3


def _copy_bandwidth(dev: str) -> float:
    """GB/s of a device-to-device fp32 copy of 2^28 elements, bytes read + written."""
    src = torch.randn(1 << 28, device=dev)
    dst = torch.empty_like(src)
    return gbps(8 * src.numel(), time_ms(lambda: dst.copy_(src)))


def _flat_launch_ms(n: int, dev: str) -> float:
    """One gacc accumulate launch over n flat elements: the per-micro-step yardstick."""
    buf = torch.zeros(n, device=dev)
    g = torch.randn(n, device=dev).bfloat16()
    return time_ms(lambda: gacc_kernels.accumulate_(buf, g, 1.0, False))


def gacc_ms(model, k: int, grad_stats: bool) -> tuple[float, float]:
    """gacc's ms per steady micro-step and per optimizer step at K=k, with or without the statistics."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=10**9, grad_stats=grad_stats)
    model().backward()  # the first micro-step (store) out of the way

    def ten_micro_steps():
        for _ in range(10):
            model().backward()
    micro = events_ms(ten_micro_steps, reps=5) / 10
    acc.remove()
    opt.zero_grad()
    acc = gacc_kernels.attach(model, opt, steps=k, grad_stats=grad_stats)
    per_step = events_ms(lambda: [window(model, k, "gacc", acc=acc) for _ in range(3)], reps=3, warmup=1) / 3
    acc.remove()
    opt.zero_grad()
    return micro, per_step


def kernel_ms(n: int, dev: str, backend: str, stats: bool) -> tuple[float, float]:
    """One accumulate_many_ and one accumulate_finalize_ launch over n bf16 elements, with or without
    stat partials."""
    from gacc_kernels.kernels import reference, triton_ops
    many = torch.ops.gacc.accumulate_many_ if backend == "extension" else triton_ops.accumulate_many_
    last = torch.ops.gacc.accumulate_finalize_ if backend == "extension" else triton_ops.accumulate_finalize_
    buf = torch.zeros(n, device=dev)
    g = torch.randn(n, device=dev).bfloat16()
    partials = torch.zeros(reference.norm_partials_size(n), device=dev)
    sp = torch.zeros_like(partials) if stats else None
    one, inf = torch.ones(1, device=dev), torch.zeros(1, device=dev)
    return (time_ms(lambda: many(buf, [g], [0], [False], 1.0, sp)),
            time_ms(lambda: last(buf, [g], [0], [False], 1.0, one, inf, partials, False, sp)))


def stats_report(sets, dev: str, rounds: int = 5, k: int = 8) -> list[str]:
    """gacc with and without grad_stats, alternating (off, on, on, off, ...) so drift cancels."""
    md = ["# The noise scale's cost: gacc with attach(grad_stats=True) against without, in the same run\n",
          f"{stamp()}\n", f"{rounds} alternating rounds each; medians; K={k} for the per-step time.\n"]
    for set_name, shapes in sets.items():
        model = ParamSet(shapes, dev)
        n = sum(p.numel() for p in model.parameters())
        times = {False: [], True: []}
        for r in range(rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                times[on].append(gacc_ms(model, k, on))
        med = {on: [statistics.median(t[i] for t in times[on]) for i in range(2)] for on in times}
        rows = [["off", *med[False]], ["on", *med[True]],
                ["on / off", med[True][0] / med[False][0], med[True][1] / med[False][1]]]
        md.append(f"## {set_name}: {len(shapes)} tensors, {n / 1e9:.3f} B elements\n")
        md.append(table(["grad_stats", "ms / micro-step", f"ms / step K={k}"], rows))
        krows = []
        for backend in ("extension", "triton"):
            off, on = kernel_ms(n, dev, backend, False), kernel_ms(n, dev, backend, True)
            krows.append([backend, off[0], on[0], on[0] / off[0], off[1], on[1], on[1] / off[1]])
        md.append(f"\nOne launch over the {n / 1e9:.3f} B elements (bf16 grads), without and with stat partials:\n")
        md.append(table(["backend", "accumulate_many_ ms", "+ stats ms", "ratio", "accumulate_finalize_ ms",
                         "+ stats ms", "ratio"], krows) + "\n")
        del model
        torch.cuda.empty_cache()
    return md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="smaller sets, for a smoke run")
    ap.add_argument("--bucket-sweep", action="store_true", help="also time gacc at several bucket sizes")
    ap.add_argument("--stats", action="store_true", help="only gacc with and without grad_stats (hooks_stats.md)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    ks = [1, 4, 8, 32]
    variants = ["gacc", "a-bf16", "b-grad_dtype", "c-megatron", "d-naive"]
    sets = {"llama-3.2-1b": LLAMA_1B, "400 x 64K": [(65536,)] * 400}
    if args.quick:
        sets = {"llama-quick": [(4096, 2048)] * 8 + [(2048,)] * 4, "400 x 64K": [(65536,)] * 400}
    if args.stats:
        write_report(args.out, "hooks_stats.md", stats_report(sets, dev))
        return
    md = [f"# Hook path: gradient handling per micro-step and per optimizer step\n\n{stamp()}\n", __doc__]

    copy_bw = _copy_bandwidth(dev)
    md.append(f"Measured device-to-device fp32 copy: {copy_bw:.0f} GB/s (read + write).\n")

    for set_name, shapes in sets.items():
        model = ParamSet(shapes, dev)
        n = sum(p.numel() for p in model.parameters())
        # steal check: without hooks AccumulateGrad must adopt the prepared grad, not copy it
        model().backward()
        stolen = model.ps[0].grad.data_ptr() == model.grads[0].data_ptr()
        for p in model.parameters():
            p.grad = None
        flat_ms = _flat_launch_ms(n, dev)
        results = {v: run_variant(model, v, ks) for v in variants}
        rows = []
        for v in variants:
            per_step, micro = results[v]
            rows.append([v, micro, micro / flat_ms, results["gacc"][1] and micro / results["gacc"][1]]
                        + [per_step[k] for k in ks])
        floor = {k: (6 + 10 * (k - 1)) * n / copy_bw / 1e6 for k in ks}
        rows.append(["byte floor at copy bandwidth", "", "", ""] + [floor[k] for k in ks])
        md.append(f"## {set_name}: {len(shapes)} tensors, {n / 1e9:.3f} B elements\n")
        md.append(f"One flat gacc accumulate launch over the same elements: {flat_ms:.3f} ms "
                  f"({gbps(10 * n, flat_ms):.0f} GB/s). AccumulateGrad adopted the grads without a copy: {stolen}.\n")
        md.append(table(["variant", "ms / micro-step", "x flat launch", "x gacc"] + [f"ms / step K={k}" for k in ks],
                        rows))
        md.append("\nSpeed-up of gacc per optimizer step: " + ", ".join(
            f"K={k}: {results[v][0][k] / results['gacc'][0][k]:.2f}x vs {v}" for k in ks for v in variants[1:]))
        md.append("\ngacc per optimizer step over the byte floor: " + ", ".join(
            f"K={k}: {results['gacc'][0][k] / floor[k]:.3f}" for k in ks) + "\n")
        md.append(f"Host time per hook call (median): gacc {hook_host_us(model, 'gacc'):.2f} us, "
                  f"c-megatron {hook_host_us(model, 'c'):.2f} us.\n")
        if args.bucket_sweep:
            sweep = [[mb, *reversed(run_variant(model, "gacc", [8], bucket_mb=mb))] for mb in (8, 32, 128, 512)]
            md.append("gacc by bucket size:\n\n" + table(
                ["bucket MiB", "ms / micro-step", "ms / step K=8"],
                [[mb, micro, step[8]] for mb, micro, step in sweep]))
        del model
        torch.cuda.empty_cache()

    write_report(args.out, "hooks.md", md)


if __name__ == "__main__":
    main()
