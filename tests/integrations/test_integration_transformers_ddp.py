"""GaccCallback(trainer) with the HF Trainer on two gloo processes, DDP and FSDP2, against the Trainer's own
run without gacc, K=3 with a short last window: the same grads at every step, and the same weights."""
import os

import pytest
import torch
from test_integration_transformers import Seen, Sequences, tiny_llama

from helpers.spawn import spawn

WORLD = 2


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def as_fsdp2(trainer):
    """The Trainer's FSDP2 code paths on CPU processes: Accelerate enables FSDP on GPUs only, so its state is
    set to FSDP (version 2, a unit per decoder layer) after the Trainer made its Accelerator."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def _train(rank, use_gacc, out, fsdp2):
    import transformers

    from gacc_kernels.integrations.transformers import GaccCallback
    seen = Seen()
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}} if fsdp2 else {}
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=3, num_train_epochs=2,
        learning_rate=1e-3, max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        use_cpu=True, seed=11, logging_strategy="no", disable_tqdm=True, ddp_backend="gloo", **fsdp)
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=[seen])
    if fsdp2:
        as_fsdp2(trainer)
    if use_gacc:
        trainer.add_callback(GaccCallback(trainer))
    trainer.train()
    seen_full = [[full(g) for g in step] for step in seen.grads]
    torch.save({"seen": seen_full, "params": [full(p.detach()).clone() for p in trainer.model.parameters()]},
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def run(tmp_path, use_gacc, fsdp2):
    out = str(tmp_path / ("gacc" if use_gacc else "stock"))
    os.makedirs(out)
    spawn(_train, WORLD, use_gacc, out, fsdp2)
    return [torch.load(f"{out}/rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("fsdp2", [False, True], ids=["ddp", "fsdp2"])
def test_trainer_matches_the_trainers_own_run(tmp_path, fsdp2):
    """FSDP2: the Trainer's non-final micro-steps run under Accelerate's no_sync, which turns FSDP's
    gradient sync off; gacc sums the unsharded grads and reduce-scatters each window once."""
    gacc, stock = run(tmp_path, True, fsdp2), run(tmp_path, False, fsdp2)
    for g, s in zip(gacc, stock):
        assert len(g["seen"]) == len(s["seen"]) == 4  # 5 sequences per rank: windows of 3 and 2, 2 epochs
        for step, (a, b) in enumerate(zip(g["seen"], s["seen"])):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item(), msg=f"step {step}")
        for p, q in zip(g["params"], s["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
