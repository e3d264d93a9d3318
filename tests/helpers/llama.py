"""A tiny LlamaForCausalLM on variable-length padded sequences, for the framework integration tests."""
import copy

import pytest
import torch

SEQS, SEQ, VOCAB, SEQ_MICRO = 10, 12, 97, 2  # 5 micro-batches of 2 sequences: K=3 and K=4 end each epoch short


def tiny_llama(lora=False, checkpointing=False):
    """A 2-layer LlamaForCausalLM (hidden 64) from a config; with LoRA on q_proj/v_proj only the adapters train."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=SEQ)
    model = transformers.LlamaForCausalLM(config)
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        peft = pytest.importorskip("peft")
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
        for name, p in model.named_parameters():  # LoRA's B starts at 0: make its grads and steps non-trivial
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


def sequences():
    """Random token sequences of lengths 3..SEQ, padded to SEQ; pads are masked and labelled -100."""
    g = torch.Generator().manual_seed(5)
    items = []
    for _ in range(SEQS):
        n = int(torch.randint(3, SEQ + 1, (1,), generator=g))
        ids = torch.zeros(SEQ, dtype=torch.long)
        ids[:n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask = (torch.arange(SEQ) < n).long()
        items.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return items


def tokens(batch) -> int:
    """The label tokens the model's loss averages over (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def assert_same_steps(seen, trained, seen_big, big, steps: int) -> None:
    """Every step's grads and the final parameters equal the large-batch run's, to fp32 rounding."""
    assert len(seen) == len(seen_big) == steps
    for step, (a, b) in enumerate(zip(seen, seen_big)):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * y.abs().max().item(), msg=f"step {step}")
    for (name, p), q in zip(trained.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def check_lora_with_checkpointing(train) -> None:
    """PEFT LoRA (only the adapters train) and non-reentrant gradient checkpointing, K=3, against the
    framework's own large-batch run; the clip at 0.2 is active at every step (the adapters' grad norm is
    about 0.32). train(model, k, batch, use_gacc, clip) returns (each step's grads, the trained model)."""
    model = tiny_llama(lora=True, checkpointing=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    gacc_model = copy.deepcopy(model)
    mlp = next(m for m in gacc_model.modules() if type(m).__name__ == "LlamaMLP")  # inside a checkpointed layer
    calls = []
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    seen, trained = train(gacc_model, 3, SEQ_MICRO, True, 0.2)
    assert len(calls) == 2 * 2 * (SEQS // SEQ_MICRO)  # 2 epochs x 5 micro-batches x (forward, recompute)
    seen_big, big = train(copy.deepcopy(model), 1, SEQ_MICRO * 3, False, 0.2)
    assert_same_steps(seen, trained, seen_big, big, 4)
    assert all(len(step) == len(trainable) for step in seen)
    for name, p in trained.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
