"""Pipeline parallelism: the stock torch.distributed.pipelining schedule against gacc, per stage.

A bf16 Llama-like decoder (token embedding, pre-norm blocks of causal attention and a SwiGLU MLP, final
norm and LM head; no rotary embedding) built from a config and split into stages: the embedding goes with
the first layers, the norm and head with the last. One process per GPU (or per CPU rank with gloo).
Schedules: Schedule1F1B (one stage per rank) and ScheduleZBVZeroBubble (two per rank, V-shaped: its W
actions are where gacc's fused accumulation replaces `weight.grad += dw` in bf16). Variants: `stock` (the
schedule as is) and `gacc` (`gacc_kernels.integrations.pipelining.attach`). Per rank: the median
milliseconds of one optimizer step (schedule.step() over the micro-batches, AdamW step, zero_grad) and
the peak memory (CUDA only).

    torchrun --nproc-per-node=N bench/bench_pipeline.py --out DIR [--layers 8] [--seq 1024] [--micro 8]
    torchrun --nproc-per-node=1 bench/bench_pipeline.py --out DIR                  (one GPU: 1 stage, or 2 for ZBV)
    torchrun --nproc-per-node=2 bench/bench_pipeline.py --device cpu --backend gloo --tiny --out DIR  (CPU smoke)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleZBVZeroBubble

from common import stamp, table, write_report
from gacc_kernels.integrations import pipelining as gacc_pp

SCHEDULES = {"1f1b": (Schedule1F1B, 1), "zbv": (ScheduleZBVZeroBubble, 2)}  # class, stages per rank
VARIANTS = ("stock", "gacc")


# -- the model ----------------------------------------------------------------------------------------

def config(args) -> dict:
    if args.tiny:
        return {"vocab": 256, "hidden": 64, "inter": 128, "heads": 4, "layers": args.layers or 4}
    return {"vocab": 32000, "hidden": 2048, "inter": 5632, "heads": 16, "layers": args.layers or 8}


class Block(torch.nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden"]
        self.heads = c["heads"]
        self.norm1, self.norm2 = torch.nn.RMSNorm(h), torch.nn.RMSNorm(h)
        self.qkv, self.proj = torch.nn.Linear(h, 3 * h, bias=False), torch.nn.Linear(h, h, bias=False)
        self.gate_up = torch.nn.Linear(h, 2 * c["inter"], bias=False)
        self.down = torch.nn.Linear(c["inter"], h, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).transpose(1, 3).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Part(torch.nn.Module):
    """One stage: the embedding (first), some blocks, the norm and head (last)."""

    def __init__(self, c: dict, blocks: int, first: bool, last: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(c["vocab"], c["hidden"]) if first else None
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(blocks))
        self.norm = torch.nn.RMSNorm(c["hidden"]) if last else None
        self.head = torch.nn.Linear(c["hidden"], c["vocab"], bias=False) if last else None

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) if self.head is not None else x


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def stage_indices(schedule: str, rank: int, world: int) -> list[int]:
    return [rank] if schedule == "1f1b" else [rank, 2 * world - 1 - rank]


def build(args, c, schedule, rank, world, dev):
    cls, per_rank = SCHEDULES[schedule]
    n = world * per_rank
    if c["layers"] < n:
        raise SystemExit(f"--layers {c['layers']} is fewer than the {n} stages of {schedule}")
    split = [c["layers"] // n + (i < c["layers"] % n) for i in range(n)]
    parts = {}
    for i in stage_indices(schedule, rank, world):
        torch.manual_seed(i)
        parts[i] = Part(c, split[i], first=i == 0, last=i == n - 1).to(dev, torch.bfloat16)
    stages = [PipelineStage(parts[i], i, n, dev) for i in parts]
    sched = cls(stages[0] if per_rank == 1 else stages, n_microbatches=args.micro, loss_fn=loss_fn)
    params = [p for part in parts.values() for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return parts, sched, opt


def run(args, c, schedule, variant, rank, world, dev) -> dict:
    parts, sched, opt = build(args, c, schedule, rank, world, dev)
    acc = gacc_pp.attach(sched, opt) if variant == "gacc" else None
    n = world * SCHEDULES[schedule][1]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, c["vocab"], (args.micro * args.batch, args.seq + 1), generator=g).to(dev)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        sched.step(*((x,) if 0 in parts else ()), target=y if n - 1 in parts else None)
        opt.step()
        opt.zero_grad()

    cuda = dev.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.reps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
    if acc is not None:
        acc.remove()
    return {"ms": statistics.median(times), "peak_gib": peak, "stages": sorted(parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8, 4 with --tiny)")
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per schedule.step()")
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024, 16 with --tiny)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="nccl")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run on the CPU")
    args = ap.parse_args()
    args.seq = args.seq or (16 if args.tiny else 1024)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        dist.init_process_group(args.backend, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group(args.backend)
    c = config(args)
    rows = []
    for schedule in args.schedules.split(","):
        for variant in VARIANTS:
            got = run(args, c, schedule, variant, rank, world, dev)
            every = [None] * world
            dist.all_gather_object(every, got)
            rows += [[schedule, variant, r, ",".join(map(str, g["stages"])), g["ms"], g["peak_gib"]]
                     for r, g in enumerate(every)]
    if rank == 0:
        md = [f"# Pipeline: stock schedule against gacc ({stamp()})", "",
              (f"world {world}; config {c}; {args.micro} micro-batches of {args.batch} x {args.seq} tokens "
               f"per step; bf16 weights, AdamW; median of {args.reps} steps after {args.warmup}"), "",
              table(["schedule", "variant", "rank", "stages", "step ms", "peak GiB"], rows)]
        write_report(args.out, "pipeline.md", md)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
