"""Data parallel on several GPUs: K=8 micro-steps per optimizer step, stock DDP and FSDP2 against gacc.

One process per GPU, NCCL; the same model, weights and data for every variant, each rank its own
micro-batches. Variants:
    ddp_nosync          DDP over the bf16 model, no_sync() on the first K-1 micro-steps: autograd accumulates
                        bf16 grads, one bf16 all-reduce during the last backward (loss / K)
    gacc_ddp_fp32       DDP + gacc attach(): fp32 accumulation, fp32 bucket all-reduces during the last backward
    gacc_ddp_bf16       the same with comm_dtype=torch.bfloat16
    gacc_group          the plain bf16 model, attach(process_group=dist.group.WORLD, reduction="mean")
    fsdp2_stock         fully_shard per decoder layer and the root, fp32 sharded parameters,
                        MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), FSDP's own accumulation:
                        a reduce-scatter on every micro-step (FSDP2's default; loss / K)
    fsdp2_stock_nosync  the same with set_requires_gradient_sync(False) on the first K-1 micro-steps: FSDP adds
                        the unsharded grads in fp32 (4 bytes per parameter) and reduce-scatters once
    fsdp2_stock_nosync_bf16  the same with reduce_dtype=bf16 (Accelerate's and the HF Trainer's bf16 default):
                        FSDP adds the unsharded grads in bf16
    gacc_fsdp2          fsdp2_stock + gacc attach(), gradient sync on: FSDP reduce-scatters each micro-step,
                        gacc adds the shards in fp32
    gacc_fsdp2_nosync   gacc with set_requires_gradient_sync(False) on the first K-1 micro-steps: gacc adds the
                        unsharded grads in fp32 and reduce-scatters each bucket once, in fp32
    hsdp_stock          HSDP on a (2, N/2) mesh (N >= 4), sync on every micro-step: a reduce-scatter and an
                        all-reduce each micro-step
    hsdp_stock_no_ar    the same with set_requires_all_reduce(False) on the first K-1 micro-steps
    gacc_hsdp_nosync    HSDP + gacc, sync off on the first K-1: one reduce-scatter and one all-reduce per window

Models: --model e2e, a LlamaForCausalLM (random weights, eager attention: deterministic backward) as in
bench_e2e.py; --model params, the Llama-3.2-1B parameter set of bench_hooks.py in 16 "layers" whose
backward only writes a fresh random grad per parameter (seeded per rank and micro-step), so that only
gradient handling and communication are timed (no compute to hide the communication behind).

    torchrun --nproc-per-node=N bench/bench_dist.py --out DIR [--model e2e|params] [--layers 8] [--seq 2048]
    torchrun --nproc-per-node=2 bench/bench_dist.py --device cpu --backend gloo --tiny --out DIR   (CPU smoke run)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, before the process group exists

import torch
import torch.distributed as dist

import gacc_kernels
from bench_hooks import LLAMA_1B
from common import stamp, table, write_report

K = 8
VARIANTS = ["ddp_nosync", "gacc_ddp_fp32", "gacc_ddp_bf16", "gacc_group", "fsdp2_stock", "fsdp2_stock_nosync",
            "fsdp2_stock_nosync_bf16", "gacc_fsdp2", "gacc_fsdp2_nosync", "hsdp_stock", "hsdp_stock_no_ar",
            "gacc_hsdp_nosync"]
NO_SYNC = {"fsdp2_stock_nosync", "fsdp2_stock_nosync_bf16", "gacc_fsdp2_nosync", "gacc_hsdp_nosync"}
LINKS_GBPS = (50, 400)  # the other link bandwidths of the model at the end of the report


# -- models -------------------------------------------------------------------------------------------

def llama(args, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, inter, heads, kv = (512, 64, 128, 4, 2) if args.tiny else (32000, 1536, 6144, 12, 4)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=args.layers, tie_word_embeddings=False,
                      max_position_embeddings=max(1024, args.seq), attn_implementation="eager")
    torch.manual_seed(0)
    with torch.device(dev):
        return LlamaForCausalLM(cfg)


class _Fake(torch.autograd.Function):
    """Forward: x unchanged. Backward: a fresh normal(0, src.std) grad for each parameter."""

    @staticmethod
    def forward(ctx, x, src, *params):
        ctx.src, ctx.like = src, [(p.shape, p.dtype, p.device) for p in params]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        src = ctx.src
        return (grad, None, *[torch.empty(s, dtype=t, device=d).normal_(0.0, src.std, generator=src.gen)
                              for s, t, d in ctx.like])


class _Source:
    """The fake backward's generator (reseeded by each forward) and std (1/K where the loss is divided)."""

    def __init__(self, dev):
        self.gen, self.std = torch.Generator(device=dev), 1.0


class FakeLayer(torch.nn.Module):
    def __init__(self, shapes, src):
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes)
        self.src = src

    def forward(self, x):
        return _Fake.apply(x, self.src, *self.ps)


class ParamModel(torch.nn.Module):
    """The Llama-3.2-1B parameter set (bench_hooks.LLAMA_1B): embedding, 16 layers of 9, final norm."""

    def __init__(self, shapes, n_layers, dev):
        super().__init__()
        self.src = _Source(dev)
        self.embed = FakeLayer(shapes[:1], self.src)
        self.layers = torch.nn.ModuleList(FakeLayer(shapes[1 + 9 * i: 10 + 9 * i], self.src) for i in range(n_layers))
        self.norm = FakeLayer(shapes[-1:], self.src)

    def forward(self, seed):
        self.src.gen.manual_seed(int(seed))
        x = self.embed(torch.zeros((), device=self.src.gen.device))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def params_model(args, dev):
    d = 64 if args.tiny else 2048  # --tiny: every dimension / 32
    shapes = LLAMA_1B[:1 + 9 * args.layers] + LLAMA_1B[-1:]
    torch.manual_seed(0)
    with torch.device(dev):
        return ParamModel([tuple(n * d // 2048 for n in s) for s in shapes], args.layers, dev)


def build(args, dev, dtype):
    model = llama(args, dev) if args.model == "e2e" else params_model(args, dev)
    with torch.no_grad():  # parameters only: the rotary inv_freq buffer stays fp32, as FSDP's model keeps it
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def decoder_layers(model):
    return model.model.layers if hasattr(model, "model") else model.layers


def make_data(args, dev, rank):
    if args.model == "params":
        return [1000 * rank + i for i in range(K)]  # the fake backward's seeds
    vocab = 512 if args.tiny else 32000
    g = torch.Generator(device=dev).manual_seed(1 + rank)
    return [torch.randint(0, vocab, (args.micro, args.seq), device=dev, generator=g) for _ in range(K)]


def loss_of(inner, model, batch, scale):
    """The micro-batch's mean loss times scale (1/K for the stock variants, 1 for gacc)."""
    if isinstance(inner, ParamModel):
        inner.src.std = scale  # a loss multiplied by scale: grads multiplied by scale
        return model(batch)
    loss = model(input_ids=batch, labels=batch).loss
    return loss if scale == 1.0 else loss * scale


# -- variants -----------------------------------------------------------------------------------------

class Run:
    """One variant, built: model (wrapped), the unwrapped module, optimizer, accumulator or None."""

    def __init__(self, variant, args, dev, mesh, mesh_2d):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.variant, self.acc = variant, None
        fsdp = "fsdp2" in variant or "hsdp" in variant
        inner = build(args, dev, torch.float32 if fsdp else torch.bfloat16)
        if fsdp:
            mesh = mesh_2d if "hsdp" in variant else mesh
            reduce_dtype = torch.bfloat16 if variant.endswith("_bf16") else torch.float32
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
            for layer in decoder_layers(inner):
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(inner, mesh=mesh, mp_policy=mp)
            model = inner
        elif variant == "gacc_group":
            model = inner
        else:
            ids = [dev.index] if dev.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(inner, device_ids=ids)
        self.model, self.inner = model, inner
        gc.collect()
        if dev.type == "cuda":  # what is resident from here on counts: weights, DDP buckets, gacc's buffer
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same cheap update for every variant
        if variant.startswith("gacc"):
            kw = {"reduction": "mean"}  # the loss is not divided by K: gacc takes the mean (attach's default sums)
            if variant == "gacc_ddp_bf16":
                kw["comm_dtype"] = torch.bfloat16
            if variant == "gacc_group":
                kw["process_group"] = dist.group.WORLD
            self.acc = gacc_kernels.attach(model, self.opt, steps=K, **kw)

    def micro_step(self, i, batch):
        last = i == K - 1
        ctx = contextlib.nullcontext()
        if self.variant == "ddp_nosync" and not last:
            ctx = self.model.no_sync()
        elif self.variant in NO_SYNC:
            self.model.set_requires_gradient_sync(last)
        elif self.variant == "hsdp_stock_no_ar":
            self.model.set_requires_all_reduce(last)
        with ctx:
            loss_of(self.inner, self.model, batch, 1.0 if self.acc else 1.0 / K).backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()

    def window(self, data):
        for i, batch in enumerate(data):
            self.micro_step(i, batch)
        self.step()

    def close(self):
        if self.acc is not None:
            self.acc.remove()
        self.opt.zero_grad()
        del self.model, self.inner, self.opt, self.acc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- measurement --------------------------------------------------------------------------------------

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """ms of fn(), bounded by a barrier and a device sync on each side."""
    dist.barrier()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def rank_max(values: list[float], dev) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def reference(args, dev, data, world):
    """float64 mean over all ranks' micro-steps of the bf16 model's grads (rank 0 keeps it, on the CPU)."""
    inner = build(args, dev, torch.bfloat16)
    ref = {p: torch.zeros(p.shape, dtype=torch.float64, device=dev) for p in inner.parameters()}

    def hook(p):
        ref[p] += p.grad.double()
        p.grad = None
    hs = [p.register_post_accumulate_grad_hook(hook) for p in inner.parameters()]
    for batch in data:
        loss_of(inner, inner, batch, 1.0).backward()
    for h in hs:
        h.remove()
    out = {}
    for name, p in inner.named_parameters():
        dist.all_reduce(ref[p])
        if dist.get_rank() == 0:
            out[name] = (ref[p] / (K * world)).cpu()
        del ref[p]
    del inner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def errors(run, ref) -> tuple[float, float]:
    """Against the float64 reference: ||g - ref|| / ||ref|| over all parameters, and the worst per-tensor
    max|g - ref| / max|ref|. g is p.main_grad for gacc (fp32), p.grad otherwise (gathered from the shards
    under FSDP2). Only rank 0's values mean anything."""
    se = sr = worst = 0.0
    for name, p in run.inner.named_parameters():
        g = p.main_grad if run.acc is not None else p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()  # a collective: every rank
        if dist.get_rank() != 0:
            continue
        r = ref[name].to(g.device)
        d = g.double() - r
        se += d.square().sum().item()
        sr += r.square().sum().item()
        worst = max(worst, (d.abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return (math.sqrt(se / sr) if sr else 0.0), worst


def measure(run, data, reps, ref, dev):
    """(ms of each timed window, exposed ms, peak GiB or nan, errors or None); times the max over the ranks."""
    run.window(data)  # warm-up; gacc learns its bucket order from this window
    times = [timed(lambda: run.window(data)) for _ in range(reps)]
    micro = [timed(lambda i=i, b=b: run.micro_step(i, b)) for i, b in enumerate(data)]
    # the last micro-step over a steady one (the first, which stores or steals, left out)
    exposed = micro[-1] - statistics.median(micro[1:-1] if len(micro) > 2 else micro[:1])
    cuda = dev.type == "cuda"
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
    err = None if ref is None else errors(run, ref)
    run.step()
    *times, exposed, peak = rank_max([*times, exposed, peak], dev)
    return times, exposed, peak if cuda else float("nan"), err


# -- report ---------------------------------------------------------------------------------------------

def wire_bytes(variant: str, n: int, world: int) -> float:
    """Bytes each rank sends per window (ring collectives: a reduce-scatter or all-gather sends (N-1)/N of
    its input, an all-reduce twice that), gradients only (FSDP's parameter all-gathers are the same for
    every FSDP variant and left out)."""
    ring = (world - 1) / world
    if variant == "ddp_nosync" or variant == "gacc_ddp_bf16":
        return 2 * ring * 2 * n
    if variant in ("gacc_ddp_fp32", "gacc_group"):
        return 2 * ring * 4 * n
    if variant in ("fsdp2_stock", "gacc_fsdp2"):
        return K * ring * 4 * n
    if variant in ("fsdp2_stock_nosync", "gacc_fsdp2_nosync"):
        return ring * 4 * n
    if variant == "fsdp2_stock_nosync_bf16":
        return ring * 2 * n
    shards, replicas = world // 2, 2
    rs = (shards - 1) / shards * 4 * n
    ar = 2 * (replicas - 1) / replicas * 4 * n / shards
    return {"hsdp_stock": K * (rs + ar), "hsdp_stock_no_ar": K * rs + ar, "gacc_hsdp_nosync": rs + ar}[variant]


def link_rate(dev, n: int) -> float:
    """Bytes per second each rank sends, from one timed fp32 all-reduce of the model's size (at most 1 GiB):
    a ring all-reduce sends 2 (N-1)/N of its input per rank."""
    world = dist.get_world_size()
    t = torch.ones(min(n, 2**28), device=dev)
    dist.all_reduce(t)  # warm
    ms = statistics.median(timed(lambda: dist.all_reduce(t)) for _ in range(3))
    return 2 * (world - 1) / world * t.nbytes / (ms / 1e3) if world > 1 else float("inf")


def link_model(variants, ms, exposed, n, world, rate) -> list[str]:
    """Step time at other link bandwidths, from the measured overlap: the window's gradient bytes take
    wire / rate on the measured link; the exposed ms (what the end of the window adds) is taken as that
    share of it; at bandwidth B the same share of wire / B is exposed, the rest stays hidden."""
    rows = []
    for v in variants:
        wire, ex = wire_bytes(v, n, world), statistics.median(exposed[v])
        comm = wire / rate * 1e3 if rate != float("inf") else 0.0
        share = min(1.0, max(0.0, ex / comm)) if comm else 0.0
        rows.append([v, wire / 2**30, comm, share, ms[v], *(ms[v] + share * (wire / (bw * 1e9) * 1e3 - comm)
                                                            for bw in LINKS_GBPS)])
    return ["\n## Step time at other link bandwidths (a model)\n\n" + " ".join(link_model.__doc__.split())
            + f" Measured link: {rate / 1e9:.1f} GB/s sent per rank (an fp32 all-reduce).\n",
            table(["variant", "GiB sent per rank per window", "ms on the measured link", "exposed share",
                   "ms / step (measured)", *(f"ms / step at {bw} GB/s" for bw in LINKS_GBPS)], rows)]


def plot(out, rows, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no dist.png")
        return
    names = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, col, label in ((axes[0], 1, "ms / optimizer step"), (axes[1], 5, "peak GiB"),
                           (axes[2], 4, "exposed ms (last micro-step over a steady one)")):
        colors = ["tab:orange" if n.startswith("gacc") else "tab:blue" for n in names]
        ax.bar(names, [r[col] if isinstance(r[col], float) else 0.0 for r in rows], color=colors)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=25)
    fig.suptitle(title, fontsize=7)
    fig.savefig(os.path.join(out, "dist.png"), dpi=120, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--model", choices=["e2e", "params"], default="e2e")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 8 e2e, 16 params, 2 tiny)")
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048, 32 with --tiny)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="timed windows per variant and round")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="nccl")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run on the CPU")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = 2 if args.tiny else 8 if args.model == "e2e" else 16
    if args.seq is None:
        args.seq = 32 if args.tiny else 2048
    if args.model == "params" and args.layers > 16:
        ap.error("--model params has 16 layers at most (Llama-3.2-1B)")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group(args.backend, device_id=dev)
    else:
        dev = torch.device(args.device)
        dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,))
    mesh_2d = None
    if any("hsdp" in v for v in variants):
        if world < 4 or world % 2:
            variants = [v for v in variants if "hsdp" not in v]
            if rank == 0:
                print(f"HSDP variants left out: they need an even world size >= 4, not {world}", flush=True)
        else:
            mesh_2d = init_device_mesh(dev.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    data = make_data(args, dev, rank)
    ref = reference(args, dev, data, world)
    count = torch.tensor([sum(p.numel() for p in ref.values())], device=dev)  # rank 0 keeps the reference
    dist.broadcast(count, 0)
    rate = link_rate(dev, int(count))

    times = {v: [] for v in variants}
    exposed = {v: [] for v in variants}
    peaks = dict.fromkeys(variants, 0.0)
    errs = {}
    for rnd in range(args.rounds):  # variants interleaved, the order rotated each round
        for v in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
            run = Run(v, args, dev, mesh, mesh_2d)
            ts, ex, peak, err = measure(run, data, args.reps, ref if rnd == 0 else None, dev)
            run.close()
            del run
            times[v].append(statistics.median(ts))
            exposed[v].append(ex)
            peaks[v] = max(peaks[v], peak)
            if err is not None:
                errs[v] = err
            if rank == 0:
                print(f"round {rnd} {v}: {times[v][-1]:.1f} ms / step, exposed {ex:.2f} ms", flush=True)

    if rank == 0:
        ms = {v: statistics.median(times[v]) for v in variants}
        rows = []
        for v in variants:
            vs_ddp = ms[v] / ms["ddp_nosync"] if "ddp_nosync" in ms else ""
            vs_fsdp = ms[v] / ms["fsdp2_stock"] if "fsdp2" in v and "fsdp2_stock" in ms else ""
            rows.append([v, ms[v], vs_ddp, vs_fsdp, statistics.median(exposed[v]),
                         peaks[v] if dev.type == "cuda" else "n/a", *errs[v]])
        n = sum(r.numel() for r in ref.values())
        nccl = torch.cuda.nccl.version() if dev.type == "cuda" and args.backend == "nccl" else "-"
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        what = (f"LlamaForCausalLM, {args.layers} layers, micro-batch {args.micro} x {args.seq} tokens"
                if args.model == "e2e" else f"Llama-3.2-1B parameter set ({args.layers} layers), fake backward")
        launch = f"torchrun --nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', world)} {' '.join(sys.argv)}"
        md = [f"# Data parallel: {what}, {n / 1e9:.3f} B parameters, K={K}\n\n{stamp()}\n",
              (f"Processes: {world} ({args.device}, {args.backend}); NCCL {nccl}; NCCL_NVLS_ENABLE="
               f"{os.environ.get('NCCL_NVLS_ENABLE')} (the script sets 0 unless set: no NVLink multicast).\n\n"
               f"Launched as: `{launch}`\n"),
              __doc__,
              ("ms / step: one optimizer step (K forward + backward, SGD lr=0 step, zero_grad), bounded by a "
               f"barrier and a device sync, the slowest rank; median over {args.rounds} rounds (variants "
               f"interleaved, order rotated), each round the median of {args.reps} windows after a warm-up "
               "window, on a freshly built model.\n"),
              ("exposed ms: in one more window, each micro-step timed alone (barrier and sync on each side): the "
               "last micro-step's time minus the median of micro-steps 2..K-1. It is what the end of the window "
               "adds after the last backward's compute until the optimizer can step: the communication left "
               "after backward (DDP's last buckets, gacc's buckets, the weight and flag collectives, FSDP's last "
               "reduce-scatter) plus each method's own end-of-window work (gacc's finalize pass and bf16 cast, "
               "DDP's bucket copies). Communication that every micro-step pays (fsdp2_stock, gacc_fsdp2) is in "
               "ms / step, not here.\n"),
              ("peak GiB: torch.cuda.max_memory_allocated, reset once the model is built and wrapped (before "
               "attach), so weights, DDP buckets, gacc's buffer, grads and activations count; the slowest rank.\n"),
              ("Errors: of that same window's gradient against the float64 mean of every rank's micro-step "
               "grads from the plain bf16 model: ||g - g64|| / ||g64|| and the worst per-tensor "
               "max|g - g64| / max|g64|, g being p.main_grad (fp32) for gacc and p.grad for the stock variants "
               "(bf16 under DDP, fp32 under FSDP2).\n"),
              table(["variant", "ms / step", "x ddp_nosync", "x fsdp2_stock", "exposed ms", "peak GiB",
                     "rel. L2 error", "max rel. error"], rows)]
        md += link_model(variants, ms, exposed, n, world, rate)
        write_report(args.out, "dist.md", md)
        plot(args.out, rows, f"{what}, K={K}, {world} x {args.device}\n{stamp()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
