"""GaccCallback in Lightning against Lightning's own large-batch run (K=1, K-times larger batches)."""
import copy

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from gacc_kernels.integrations.lightning import GaccCallback  # noqa: E402
from helpers.llama import (  # noqa: E402
    SEQ_MICRO,
    SEQS,
    assert_same_steps,
    check_lora_with_checkpointing,
    sequences,
    tiny_llama,
    tokens,
)
from helpers.models import MLP  # noqa: E402

N_BATCHES, MICRO = 10, 4  # 10 micro-batches per epoch: K=3 and K=4 end each epoch with a short window


class Module(pl.LightningModule):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.seen: list[list[torch.Tensor]] = []  # the grads at each on_before_optimizer_step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).float(), y)

    def on_before_optimizer_step(self, optimizer):
        self.seen.append([p.grad.detach().double().clone() for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def micro_batches(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(MICRO, 24, generator=g), torch.randn(MICRO, 5, generator=g)) for _ in range(N_BATCHES)]


def windows(k: int):
    """Lightning's windows of K micro-batches, concatenated: the large-batch run's batches."""
    data = micro_batches()
    return [tuple(torch.cat(t) for t in zip(*data[i:i + k])) for i in range(0, N_BATCHES, k)]


def fit(module, data, k, callbacks=(), epochs=2, **kw):
    trainer = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=k, callbacks=list(callbacks), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, **kw)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None, shuffle=False))
    return trainer


def assert_same_run(a: Module, b: Module, rtol: float):
    assert len(a.seen) == len(b.seen) > 0
    for step, (ga, gb) in enumerate(zip(a.seen, b.seen)):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item(), msg=f"step {step}")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_lightning_matches_its_large_batch_run(k, clip):
    torch.manual_seed(0)
    net = MLP()
    gacc, big = Module(copy.deepcopy(net)), Module(copy.deepcopy(net))
    fit(gacc, micro_batches(), k, [GaccCallback()], gradient_clip_val=clip)
    fit(big, windows(k), 1, gradient_clip_val=clip)
    assert_same_run(gacc, big, rtol=2e-5)


def test_stock_lightning_accumulation_is_not_the_large_batch_run():
    """The comparison above can fail: stock accumulation divides the short window by K."""
    torch.manual_seed(0)
    net = MLP()
    stock, big = Module(copy.deepcopy(net)), Module(copy.deepcopy(net))
    fit(stock, micro_batches(), 3)
    fit(big, windows(3), 1)
    with pytest.raises(AssertionError):
        assert_same_run(stock, big, rtol=2e-5)


def test_lightning_bf16_mixed_is_closer_to_the_large_batch_run_than_stock():
    torch.manual_seed(0)
    net = MLP()
    gacc, stock, big = (Module(copy.deepcopy(net)) for _ in range(3))
    fit(gacc, micro_batches(), 3, [GaccCallback()], precision="bf16-mixed")
    fit(stock, micro_batches(), 3, precision="bf16-mixed")
    fit(big, windows(3), 1, precision="bf16-mixed")
    for step in range(len(big.seen)):  # the short window of each epoch is where stock goes wrong
        err = [max((x - y).abs().max().item() for x, y in zip(run.seen[step], big.seen[step])) for run in (gacc, stock)]
        scale = max(y.abs().max().item() for y in big.seen[step])
        assert err[0] <= 2e-2 * scale, f"step {step}: gacc is {err[0]} from the large-batch grads"
    assert len(gacc.seen) == len(stock.seen) == len(big.seen)


class SaveAt(pl.Callback):
    """Saves a checkpoint after the given global micro-batch (mid-window), then stops the fit."""

    def __init__(self, path, at: int):
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class Probe(pl.Callback):
    """Records the gacc window as the resumed fit starts its first batch."""

    def __init__(self, gacc: GaccCallback):
        self.gacc, self.window = gacc, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.window is None:
            self.window = self.gacc.acc.state_dict()


def test_a_mid_window_checkpoint_carries_the_window_bit_for_bit(tmp_path):
    """Lightning restarts a non-stateful dataloader from its first batch on resume, so the runs are not
    comparable end to end; what gacc owns, the window in progress, must come back exactly."""
    torch.manual_seed(0)
    path = str(tmp_path / "mid.ckpt")
    saved = GaccCallback()
    fit(Module(MLP()), micro_batches(), 3, [saved, SaveAt(path, at=4)], epochs=1)  # 2 of 3 micro-steps done
    state = torch.load(path, weights_only=False)["callbacks"]["GaccCallback"]["gacc"]
    assert state["micro_steps"] == 2
    resumed = GaccCallback()
    probe = Probe(resumed)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[resumed, probe], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(Module(MLP()), torch.utils.data.DataLoader(micro_batches(), batch_size=None), ckpt_path=path)
    assert probe.window["micro_steps"] == 2 and probe.window["written"] == state["written"]
    for a, b in zip(probe.window["buffers"], state["buffers"]):
        assert torch.equal(a, b)


def test_lightning_ddp_spawn_two_processes_match_the_large_batch_run():
    """strategy="ddp_spawn" on two CPU processes (gloo), K=3: the weights Lightning brings back equal a
    one-process run whose windows hold both ranks' micro-batches. Lightning's DistributedSampler shuffles
    with seed 0 + epoch and gives rank r the items perm[r::2]; a rank's windows per epoch: 3, then 2."""
    torch.manual_seed(0)
    net = MLP()
    gacc, big = Module(copy.deepcopy(net)), Module(copy.deepcopy(net))
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[GaccCallback()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=2, strategy="ddp_spawn")
    data = micro_batches()
    trainer.fit(gacc, torch.utils.data.DataLoader(data, batch_size=None, shuffle=False))
    big_windows = []
    for epoch in range(2):
        perm = torch.randperm(N_BATCHES, generator=torch.Generator().manual_seed(epoch)).tolist()
        ranks = [perm[r::2] for r in range(2)]
        for part in (slice(0, 3), slice(3, 5)):
            items = [data[i] for rank in ranks for i in rank[part]]
            big_windows.append(tuple(torch.cat(t) for t in zip(*items)))
    fit(big, big_windows, 1, epochs=1)
    for p, q in zip(gacc.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-5)


def test_lightning_fp16_with_a_grad_scaler():
    """16-mixed with Lightning's GradScaler (autocast fp16 on the CPU): gacc gets the scaler, unscales and
    checks for infs in its pass; the steps and the scale match the large-batch run to fp16 rounding."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))

    torch.manual_seed(0)
    net = MLP()
    gacc, big = Module(copy.deepcopy(net)), Module(copy.deepcopy(net))
    fit(gacc, micro_batches(), 3, [GaccCallback()], plugins=[plugin()])
    fit(big, windows(3), 1, plugins=[plugin()])
    assert len(gacc.seen) == len(big.seen) == 8
    for a, b in zip(gacc.seen, big.seen):
        err = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert err <= 1e-2 * max(y.abs().max().item() for y in b)
    for p, q in zip(gacc.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)


def test_lightning_fp16_checkpoint_every_step_survives_a_skipped_step(tmp_path):
    """The first steps of an fp16 run overflow and the scaler skips them; ModelCheckpoint(every_n_train_steps=1)
    saves right after each. That used to die inside trainer.fit ("call optimizer.step() first")."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the first window overflows
    module = Module(MLP())
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[GaccCallback(), saver], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, torch.utils.data.DataLoader(micro_batches(), batch_size=None))
    assert scaler.get_scale() < 2.0**127, "a step must have been skipped"
    assert trainer.global_step == 4 and len(list(tmp_path.glob("*.ckpt"))) == 4


# -- a tiny Llama on variable-length, padded sequences (as in test_integration_transformers.py) ------------

class CausalLM(pl.LightningModule):
    """The model's own loss: the mean over the micro-batch's label tokens, whose count differs from micro-batch
    to micro-batch. With gacc the step weighs the micro-batch by that count (GaccCallback.set_weight), so
    each window's gradient is the mean over the window's tokens, which is the large-batch run's loss."""

    def __init__(self, model: torch.nn.Module, gacc: GaccCallback | None = None):
        super().__init__()
        self.model, self.gacc = model, gacc
        self.seen: list[list[torch.Tensor]] = []  # the grads each step uses (after Lightning's clip)

    def training_step(self, batch, batch_idx):
        if self.gacc is not None:
            self.gacc.set_weight(tokens(batch))
        return self.model(**batch).loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.seen.append([p.grad.detach().double().clone() for g in optimizer.param_groups for p in g["params"]])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def fit_llama(model, k, batch, use_gacc, weigh=True, clip=None):
    gacc = GaccCallback() if use_gacc else None
    module = CausalLM(model, gacc if weigh else None)
    data = torch.utils.data.DataLoader(sequences(), batch_size=batch, shuffle=False)
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=k, callbacks=[gacc] if use_gacc else [],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, gradient_clip_val=clip)
    trainer.fit(module, data)
    return module


@pytest.mark.parametrize("k", [1, 3, 4])
def test_lightning_llama_with_padded_sequences_matches_its_large_batch_run(k):
    """Token counts differ per micro-batch: weighted by them, the windows give the large batch's token mean."""
    model = tiny_llama()
    run = fit_llama(copy.deepcopy(model), k, SEQ_MICRO, True)
    big = fit_llama(copy.deepcopy(model), 1, SEQ_MICRO * k, False)
    assert_same_steps(run.seen, run, big.seen, big, 2 * -(-SEQS // (SEQ_MICRO * k)))


def test_lightning_llama_without_token_weights_is_not_the_large_batch_run():
    """The comparison above can fail: unweighted, the window's grad is the mean of the micro-batch means."""
    model = tiny_llama()
    run = fit_llama(copy.deepcopy(model), 3, SEQ_MICRO, True, weigh=False)
    big = fit_llama(copy.deepcopy(model), 1, SEQ_MICRO * 3, False)
    assert len(run.seen) == len(big.seen) == 4
    with pytest.raises(AssertionError, match="step 0"):  # the grads of the first step differ
        assert_same_steps(run.seen, run, big.seen, big, 4)


def test_lightning_llama_lora_with_gradient_checkpointing():
    def train(model, k, batch, use_gacc, clip):
        run = fit_llama(model, k, batch, use_gacc, clip=clip)
        return run.seen, run.model
    check_lora_with_checkpointing(train)


@pytest.mark.parametrize("scheduler_first", [True, False], ids=["scheduler-first", "gacc-first"])
def test_gradient_accumulation_scheduler_in_either_order(scheduler_first):
    """K goes from 1 (epoch 0) to 3 (epoch 1). Listed before GaccCallback, the scheduler used to crash the
    second batch ("backward after the last of steps=1"). Against stock Lightning with the same schedule:
    equal at every full window (the short last one is where stock divides by K, see above)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler
    torch.manual_seed(0)
    net = MLP()
    gacc, stock = Module(copy.deepcopy(net)), Module(copy.deepcopy(net))
    gacc_cbs = [GradientAccumulationScheduler({0: 1, 1: 3}), GaccCallback()]
    fit(gacc, micro_batches(), 1, gacc_cbs if scheduler_first else gacc_cbs[::-1])
    fit(stock, micro_batches(), 1, [GradientAccumulationScheduler({0: 1, 1: 3})])
    assert len(gacc.seen) == len(stock.seen) == N_BATCHES + 4
    gacc.seen, stock.seen = gacc.seen[:-1], stock.seen[:-1]  # the epoch's short window comes last
    assert_same_run_grads(gacc, stock, rtol=2e-5)


def assert_same_run_grads(a: Module, b: Module, rtol: float):
    for step, (ga, gb) in enumerate(zip(a.seen, b.seen)):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item(), msg=f"step {step}")


class Recorder(pl.loggers.Logger):
    """A logger that keeps what it is sent."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def test_grad_stats_go_to_the_logger():
    """GaccCallback(grad_stats=True): the noise scale of each window reaches the module's logger."""
    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[GaccCallback(grad_stats=True)],
                         logger=recorder, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Module(MLP()), torch.utils.data.DataLoader(micro_batches(), batch_size=None, shuffle=False))
    logged = [m for m in recorder.metrics if "gacc/b_simple" in m]
    assert len(logged) == 4  # 10 micro-batches: windows of 3, 3, 3 and 1
    assert all(m["gacc/trace"] > 0 for m in logged[:3])


@pytest.mark.parametrize("strategy", ["FSDPStrategy"])
def test_fsdp1_strategy_is_refused_naming_what_to_use(strategy):
    import types

    from lightning.pytorch import strategies
    trainer = types.SimpleNamespace(strategy=object.__new__(getattr(strategies, strategy)),
                                    optimizers=[torch.optim.SGD(MLP().parameters(), lr=0.1)])
    module = types.SimpleNamespace(automatic_optimization=True)
    with pytest.raises(RuntimeError, match=f"Lightning's {strategy}") as info:
        GaccCallback()._attach(trainer, module)
    assert "ModelParallelStrategy" in str(info.value)


class ShardedModule(Module):
    """FSDP2 through ModelParallelStrategy's configure_model; the grads as whole tensors."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def on_before_optimizer_step(self, optimizer):
        self.seen.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).double().clone()
                          for p in self.parameters()])


def _model_parallel(rank, use_gacc, out):
    from lightning.pytorch.strategies import ModelParallelStrategy
    torch.manual_seed(0)
    module = ShardedModule(MLP())
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[GaccCallback()] if use_gacc else [],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=2,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    trainer.fit(module, torch.utils.data.DataLoader(micro_batches(), batch_size=None, shuffle=False))
    torch.save(module.seen, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_model_parallel_strategy_fsdp2_matches_lightnings_own_run(tmp_path):
    """ModelParallelStrategy with fully_shard on two gloo processes (ours: Lightning sees LOCAL_RANK and
    launches nothing), K=3: Lightning's no-sync context turns FSDP's gradient sync off, and gacc's FSDP2
    no-sync mode takes each window. Each rank gets 5 micro-batches: a window of 3, then a short one of 2.
    The full window is Lightning's own FSDP2 result; the short one is it times 3/2, as documented: Lightning
    divides every loss by K, gacc gives the mean over the micro-batches run."""
    from helpers.spawn import spawn
    spawn(_model_parallel, 2, True, str(tmp_path / "gacc"))
    spawn(_model_parallel, 2, False, str(tmp_path / "stock"))
    for rank in range(2):
        gacc, stock = torch.load(f"{tmp_path}/gacc.{rank}"), torch.load(f"{tmp_path}/stock.{rank}")
        assert len(gacc) == len(stock) == 2
        for x, y in zip(gacc[0], stock[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg="the full window")
        for x, y in zip(gacc[1], stock[1]):
            torch.testing.assert_close(x, y * 3 / 2, rtol=1e-5, atol=1e-7, msg="the short window")
