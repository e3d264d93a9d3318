"""GaccCallback in the HF Trainer, against the Trainer's own large-batch run (K=1, K-times larger batches)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from gacc_kernels.integrations.transformers import GaccCallback  # noqa: E402

N, SEQ, VOCAB = 10, 12, 97  # 10 sequences of variable length; K=3 and K=4 end each epoch with a short window


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


class Sequences(torch.utils.data.Dataset):
    """Random token sequences of lengths 3..SEQ, padded to SEQ; pads are masked and labelled -100."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.items = []
        for _ in range(N):
            n = int(torch.randint(3, SEQ + 1, (1,), generator=g))
            ids = torch.zeros(SEQ, dtype=torch.long)
            ids[:n] = torch.randint(1, VOCAB, (n,), generator=g)
            mask = (torch.arange(SEQ) < n).long()
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.items[i]


class Seen(transformers.TrainerCallback):
    """The grads the optimizer is about to use (after the Trainer's clip), at every step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().double().clone() for p in model.parameters() if p.requires_grad])


def train(model, k, batch, use_gacc, tmp_path, clip=0.0, checkpointing=False, bf16=False):
    seen = Seen()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=k,
        num_train_epochs=2, learning_rate=1e-3, max_grad_norm=clip, lr_scheduler_type="constant",
        save_strategy="no", report_to=[], use_cpu=True, seed=11, logging_strategy="no",
        gradient_checkpointing=checkpointing, bf16=bf16, disable_tqdm=True)
    callbacks = [seen, GaccCallback()] if use_gacc else [seen]
    transformers.Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=callbacks).train()
    return seen.grads, model


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("clip", [0.0, 0.5], ids=["no-clip", "clip"])
def test_trainer_matches_its_large_batch_run(k, clip, tmp_path):
    model = tiny_llama()
    seen, trained = train(copy.deepcopy(model), k, 2, True, tmp_path, clip)
    seen_big, big = train(copy.deepcopy(model), 1, 2 * k, False, tmp_path, clip)
    assert len(seen) == len(seen_big) == 2 * -(-N // (2 * k))
    for step, (a, b) in enumerate(zip(seen, seen_big)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item(), msg=f"step {step}")
    for p, q in zip(trained.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_trainer_with_gradient_checkpointing(tmp_path):
    model = tiny_llama()
    seen, _ = train(copy.deepcopy(model), 3, 2, True, tmp_path, checkpointing=True)
    seen_big, _ = train(copy.deepcopy(model), 1, 6, False, tmp_path)
    for a, b in zip(seen, seen_big):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_trainer_with_lora(tmp_path):
    """PEFT LoRA: only the adapters train; their grads match the Trainer's large-batch run."""
    peft = pytest.importorskip("peft")

    def lora():
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(tiny_llama(), config)
        for name, p in model.named_parameters():  # LoRA's B starts at 0: make its grads and steps non-trivial
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    seen, trained = train(lora(), 3, 2, True, tmp_path, clip=0.5)
    seen_big, big = train(lora(), 1, 6, False, tmp_path, clip=0.5)
    assert len(seen) == len(seen_big) > 0
    for a, b in zip(seen, seen_big):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    for (name, p), q in zip(trained.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_bf16_autocast(tmp_path):
    """bf16=True (autocast, fp32 parameters): the same windows and grads as the large-batch run, to the
    bf16 rounding of the forward."""
    model = tiny_llama()
    seen, _ = train(copy.deepcopy(model), 4, 2, True, tmp_path, bf16=True)
    seen_big, _ = train(copy.deepcopy(model), 1, 8, False, tmp_path, bf16=True)
    assert len(seen) == len(seen_big) == 4
    for a, b in zip(seen, seen_big):
        err = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert err <= 2e-2 * max(y.abs().max().item() for y in b)


def test_grad_stats_go_into_the_trainers_logs(tmp_path):
    """GaccCallback(trainer, grad_stats=True): each training log, as recorded in log_history (and handed to
    the reporting callbacks), holds the last window's noise scale, and training is unchanged."""
    model = tiny_llama()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3,
        num_train_epochs=1, learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, seed=11,
        logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences())
    callback = GaccCallback(trainer, grad_stats=True)
    trainer.add_callback(callback)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2  # 5 micro-batches: a window of 3, then a short one of 2
    for entry in logs:
        assert {"gacc/b_simple", "gacc/b_simple_ema", "gacc/g2", "gacc/trace"} <= entry.keys()
        assert entry["gacc/trace"] > 0
    with pytest.raises(ValueError, match="needs the trainer"):
        GaccCallback(grad_stats=True)


@pytest.mark.parametrize(("setting", "says"), [({"fsdp": "full_shard"}, "FSDP1"),
                                               ({"deepspeed": "ds.json"}, "DeepSpeed")])
def test_fsdp1_and_deepspeed_are_refused_at_train_begin(setting, says):
    """FSDP1 (fsdp= without fsdp_version 2, or without the trainer to tell) and DeepSpeed: refused before
    anything is attached, naming what to use."""
    import types
    args = types.SimpleNamespace(**{"deepspeed": None, "fsdp": None, "world_size": 1, **setting})
    with pytest.raises(RuntimeError, match=says) as info:
        GaccCallback().on_train_begin(args, None, None, model=torch.nn.Linear(2, 2))
    assert "fsdp_version" in str(info.value) or says == "DeepSpeed"
