"""Fine-tuning with each framework's stock accumulation and with gacc's integration, against fp32.

One small LlamaForCausalLM (bf16 parameters, random init from one seed) trained for a few optimizer
steps of K micro-batches on a learnable synthetic corpus (a fixed random Markov chain), the same
micro-batches in the same order for every run: the HF Trainer, a plain Accelerate loop and a Lightning
module, each once with its stock accumulation (bf16 grads summed in bf16) and once with gacc (summed in
fp32). The reference is the same model with fp32 parameters in a plain torch loop. Every run minimizes the
Trainer's loss: the token-weighted mean over the window's tokens (the loss of one K-times larger batch).

    python bench/bench_frameworks.py [--out bench/results]       (CUDA)
    python bench/bench_frameworks.py --tiny --device cpu --out /tmp/fw       (smoke test)
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.metadata
import os
import tempfile
import time

import torch

from common import stamp, table, write_report


def corpus(args) -> list[dict[str, torch.Tensor]]:
    """Sequences of lengths uniform in [L/4, L] from a fixed random Markov chain (8 successors per token,
    drawn from a Zipf distribution over the vocabulary and Zipf-weighted), right-padded with token 0;
    labels -100 at the padding and at position 0 (never a target of the shifted loss, so every transformers
    version counts the same tokens)."""
    g = torch.Generator().manual_seed(args.seed)
    n, L, V = args.steps * args.k * args.micro, args.seq, args.vocab
    zipf = 1.0 / torch.arange(1, V, dtype=torch.float)
    succ = 1 + torch.multinomial(zipf, V * 8, replacement=True, generator=g).view(V, 8)
    probs = zipf[:8]
    ids = torch.zeros(n, L, dtype=torch.long)
    ids[:, 0] = torch.randint(1, V, (n,), generator=g)
    for t in range(1, L):
        ids[:, t] = succ[ids[:, t - 1], torch.multinomial(probs, n, replacement=True, generator=g)]
    lengths = torch.randint(L // 4, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids *= mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]


def build(args, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)


def adamw(model, args):
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def train_reference(model, data, args, tick):
    """fp32 parameters, a plain loop: the loss of each micro-batch over the window's token count."""
    opt = adamw(model, args)
    for i, batch in enumerate(torch.utils.data.DataLoader(data, batch_size=args.micro)):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        model(**batch, num_items_in_batch=args.window_targets[i // args.k]).loss.backward()
        if (i + 1) % args.k == 0:
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad()
            tick()


def train_hf(model, data, args, tick, use_gacc):
    import transformers
    from accelerate.state import AcceleratorState, GradientState

    from gacc_kernels.integrations.transformers import GaccCallback

    class Tick(transformers.TrainerCallback):
        def on_step_end(self, *a, **kw):
            tick()

    class Sequential(transformers.Trainer):  # the corpus in order, as in the other runs
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.k,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0,
            optim="adamw_torch", max_grad_norm=args.clip, save_strategy="no", report_to=[], logging_steps=1,
            use_cpu=args.device == "cpu", seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
        callbacks = [Tick(), GaccCallback()] if use_gacc else [Tick()]
        trainer = Sequential(model=model, args=targs, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_accelerate(model, data, args, tick, use_gacc):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from gacc_kernels.integrations import accelerate as gacc_accelerate

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=args.k, cpu=args.device == "cpu")
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro)
    model, opt, loader = accelerator.prepare(model, adamw(model, args), loader)
    acc = gacc_accelerate.attach(accelerator, model, opt) if use_gacc else None
    for i, batch in enumerate(loader):
        with accelerator.accumulate(model):
            loss = model(**batch, num_items_in_batch=args.window_targets[i // args.k]).loss
            accelerator.backward(loss * args.k)  # Accelerate divides by K
            if accelerator.sync_gradients and args.clip:
                accelerator.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            tick()
    if acc is not None:
        acc.remove()


def train_lightning(model, data, args, tick, use_gacc):
    import lightning.pytorch as pl

    from gacc_kernels.integrations.lightning import GaccCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, i):  # Lightning divides by K
            return self.model(**batch, num_items_in_batch=args.window_targets[i // args.k]).loss * args.k

        def configure_optimizers(self):
            return adamw(self.model, args)

    class Tick(pl.Callback):
        steps = 0

        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step > self.steps:  # this batch ended a window
                self.steps = trainer.global_step
                tick()

    callbacks = [Tick(), GaccCallback()] if use_gacc else [Tick()]
    trainer = pl.Trainer(accelerator="cpu" if args.device == "cpu" else "gpu", devices=1, max_steps=args.steps,
                         accumulate_grad_batches=args.k, precision="bf16-true", gradient_clip_val=args.clip or None,
                         callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=args.micro))


def measured(args, data, dtype, train, *extra):
    """One run on a fresh model: (tokens/s after the first optimizer step, peak GiB, loss per step, logged).
    The peak counts everything allocated after the reset: weights, optimizer state, grads (gacc's fp32
    buffer included), activations."""
    cuda = args.device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    model = build(args, dtype)
    losses, ticks = [], []
    hook = model.register_forward_hook(lambda m, a, out: losses.append(out.loss.detach()))

    def tick():
        if cuda:
            torch.cuda.synchronize()
        ticks.append(time.perf_counter())

    logged = train(model, data, args, tick, *extra)
    hook.remove()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    assert len(ticks) == args.steps and len(losses) == args.steps * args.k, (len(ticks), len(losses))
    per_step = torch.stack(losses).float().view(args.steps, args.k).sum(1).tolist()
    tokens = sum(args.window_tokens[1:])
    return tokens / (ticks[-1] - ticks[0]), peak, per_step, logged


def gib(peak: float | None) -> str:
    return "-" if peak is None else f"{peak:.3f}"


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def plot(path: str, ref: list[float], curves: dict[str, dict[str, list[float]]], title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no frameworks_loss.png (the curves are in frameworks_loss.csv)."
    fig, axes = plt.subplots(2, len(curves), figsize=(5 * len(curves), 7), sharex=True, sharey="row",
                             height_ratios=[2, 1])
    steps = range(1, len(ref) + 1)
    for col, (framework, runs) in zip(axes.T, curves.items()):
        for variant in ("gacc", "stock bf16"):
            col[0].plot(steps, runs[variant], label=variant, lw=1.5)
            col[1].plot(steps, [a - b for a, b in zip(runs[variant], ref)], label=variant, lw=1.5)
        col[0].plot(steps, ref, "k--", label="fp32 reference", lw=1)
        col[1].axhline(0.0, color="k", ls="--", lw=1)
        col[0].set_title(framework, fontsize=10)
        col[1].set_xlabel("optimizer step")
        col[0].legend(fontsize=8)
    axes[0, 0].set_ylabel("loss (token mean over the window)")
    axes[1, 0].set_ylabel("loss - fp32 reference")
    fig.suptitle(title, fontsize=7, y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return "Loss curves: [frameworks_loss.png](frameworks_loss.png); values in frameworks_loss.csv."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="max grad norm, 0 for none")
    ap.add_argument("--seed", type=int, default=0)
    if ap.parse_args().tiny:  # smaller defaults; options given still win
        ap.set_defaults(hidden=64, layers=2, heads=4, vocab=256, seq=32, micro=2, steps=6, lr=1e-2)
    args = ap.parse_args()
    data = corpus(args)
    windows = [data[i:i + args.k * args.micro] for i in range(0, len(data), args.k * args.micro)]
    args.window_tokens = [sum(int(d["attention_mask"].sum()) for d in w) for w in windows]
    args.window_targets = [sum(int((d["labels"] != -100).sum()) for d in w) for w in windows]
    n = sum(p.numel() for p in build(args, torch.float32).parameters())

    ref_tps, ref_peak, ref, _ = measured(args, data, torch.float32, train_reference)
    frameworks = {"HF Trainer": train_hf, "Accelerate": train_accelerate, "Lightning": train_lightning}
    rows, curves, notes = {}, {}, []
    for name, train in frameworks.items():
        rows[name], curves[name] = [], {}
        for variant, use_gacc in (("stock bf16", False), ("gacc", True)):
            tps, peak, loss, logged = measured(args, data, torch.bfloat16, train, use_gacc)
            if logged is not None:
                worst = max(abs(a - b) for a, b in zip(loss, logged))
                notes.append(f"{name} {variant}: the Trainer's logged loss is within {worst:.2g} of the recorded one.")
            diff = [abs(a - b) for a, b in zip(loss, ref)]
            rows[name].append([variant, tps, gib(peak), f"{loss[-1]:.4f}", f"{loss[-1] - ref[-1]:+.4f}", max(diff),
                               sum(diff) / len(diff)])
            curves[name][variant] = loss
            print(name, variant, f"{tps:.0f} tokens/s, peak {gib(peak)} GiB, final loss {loss[-1]:.4f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "frameworks_loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "fp32 reference"] + [f"{fw} {v}" for fw, runs in curves.items() for v in runs])
        for s in range(args.steps):
            w.writerow([s + 1, ref[s]] + [runs[v][s] for runs in curves.values() for v in runs])
    versions = "; ".join(f"{m} {version(m)}" for m in ("transformers", "accelerate", "lightning", "peft"))
    head = (f"LlamaForCausalLM, {n / 1e6:.1f} M parameters ({args.layers} layers, hidden {args.hidden}, "
            f"vocab {args.vocab}), K={args.k} x {args.micro} sequences of {args.seq // 4}..{args.seq} tokens")
    md = [f"# Frameworks: fine-tuning with stock accumulation and with gacc\n\n{stamp()}; {versions}\n", __doc__,
          (f"{head}, {args.steps} optimizer steps, AdamW lr {args.lr} constant, no weight decay, "
           f"{f'clipping at {args.clip}' if args.clip else 'no clipping'}, sdpa attention. Lightning runs "
           "precision=\"bf16-true\"; the Trainer and Accelerate run the bf16 model as it is (no autocast).\n"),
          ("tokens/s: non-pad tokens of steps 2.. over their wall time (synchronized at each optimizer step). "
           "Peak GiB: max_memory_allocated over the run from before the model is built (weights, AdamW state, "
           "grads and gacc's fp32 buffer, activations). Loss: per optimizer step, the sum of the window's "
           "micro-batch losses (each over the window's token count), as the model returned them; "
           "|loss - fp32|: against the fp32 reference at the same step.\n"),
          plot(os.path.join(args.out, "frameworks_loss.png"), ref, curves, f"{head}\n{stamp()}") + "\n",
          "## fp32 reference (plain torch loop)\n",
          table(["variant", "tokens/s", "peak GiB", "final loss"],
                [["fp32 parameters", ref_tps, gib(ref_peak), f"{ref[-1]:.4f}"]])]
    header = ["variant", "tokens/s", "peak GiB", "final loss", "final - fp32", "max |loss - fp32|",
              "mean |loss - fp32|"]
    for name, r in rows.items():
        md += [f"\n## {name}\n", table(header, r)]
    md += ["\n" + "\n".join(notes)]
    write_report(args.out, "frameworks.md", md)


if __name__ == "__main__":
    main()
