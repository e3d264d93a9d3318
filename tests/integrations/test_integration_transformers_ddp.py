"""GaccCallback(trainer) with the HF Trainer on two gloo processes (DDP) against the Trainer's own DDP run
without gacc, K=3 with a short last window: the same grads at every step, and the same weights."""
import os

import torch
from test_integration_transformers import Seen, Sequences, tiny_llama

from helpers.spawn import spawn

WORLD = 2


def _train(rank, use_gacc, out):
    import transformers

    from gacc_kernels.integrations.transformers import GaccCallback
    seen = Seen()
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=3, num_train_epochs=2,
        learning_rate=1e-3, max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        use_cpu=True, seed=11, logging_strategy="no", disable_tqdm=True, ddp_backend="gloo")
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=[seen])
    if use_gacc:
        trainer.add_callback(GaccCallback(trainer))
    trainer.train()
    torch.save({"seen": seen.grads, "params": [p.detach().clone() for p in trainer.model.parameters()]},
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def run(tmp_path, use_gacc):
    out = str(tmp_path / ("gacc" if use_gacc else "stock"))
    os.makedirs(out)
    spawn(_train, WORLD, use_gacc, out)
    return [torch.load(f"{out}/rank{r}.pt") for r in range(WORLD)]


def test_trainer_ddp_matches_the_trainers_own_ddp_run(tmp_path):
    gacc, stock = run(tmp_path, True), run(tmp_path, False)
    for g, s in zip(gacc, stock):
        assert len(g["seen"]) == len(s["seen"]) == 4  # 5 sequences per rank: windows of 3 and 2, 2 epochs
        for step, (a, b) in enumerate(zip(g["seen"], s["seen"])):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item(), msg=f"step {step}")
        for p, q in zip(g["params"], s["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
