"""Real DDP loops, unchanged but for the attach line: two gloo processes on the CPU, each loop run with
stock DDP and with gacc in the same processes, step by step.

The loops steer DDP themselves: nanoGPT's train.py sets `model.require_backward_grad_sync` at each
micro-step (sync on the last one), others wrap the non-final micro-steps in `model.no_sync()`, and a loop
may sync early (a short window at the end of an epoch). gacc keeps DDP's reducer off and reads the flag
as the window's end, so the optimizer must see what stock DDP gives (the sum over micro-steps of
`grad(loss / K)`, averaged over the ranks), BatchNorm's buffers must go out from rank 0 where stock DDP
sends them, and DDP's reducer must never run (it would all-reduce the grads gacc took away: zeros). A
comm hook on the DDP model records every bucket DDP's reducer sends.
"""
import contextlib
import datetime
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import gacc_kernels
from helpers.spawn import spawn

WORLD = 2
K = 4                # gradient_accumulation_steps
ITERS = 3            # optimizer steps
GRAD_CLIP = 0.45     # != 0: the GPT loops clip some steps, not others (checked against float64)
LR = 5e-2
BN_CLIP = 1.0        # the BatchNorm loop's: clips steps 0 and 2 (norms about 1.25, 0.94, 1.07)
VOCAB, BLOCK, N_EMBD, N_HEAD, BATCH = 48, 12, 32, 4, 3
DATA = torch.randint(VOCAB, (1000,), generator=torch.Generator().manual_seed(7))


# -- a tiny GPT, written as nanoGPT's model.py is (embedding + one block + tied head), with train.py's
# default bias=False (a key bias would have a grad that is 0 but for rounding, which AdamW turns into
# steps of +-lr: the weights would then compare rounding noise) --------------------------------------

class CausalSelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = torch.nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = torch.nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(N_EMBD, bias=False)
        self.attn = CausalSelfAttention()
        self.ln_2 = torch.nn.LayerNorm(N_EMBD, bias=False)
        self.c_fc = torch.nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.c_proj = torch.nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, N_EMBD)
        self.wpe = torch.nn.Embedding(BLOCK, N_EMBD)
        self.h = Block()
        self.ln_f = torch.nn.LayerNorm(N_EMBD, bias=False)
        self.lm_head = torch.nn.Linear(N_EMBD, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.ln_f(self.h(self.wte(idx) + self.wpe(pos)))
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def batch_maker(rank):
    """nanoGPT's get_batch: random windows of the token stream, a different stream of offsets per rank
    (train.py seeds each rank with 1337 + seed_offset)."""
    gen = torch.Generator().manual_seed(1337 + rank)

    def get_batch(split):
        ix = torch.randint(len(DATA) - BLOCK, (BATCH,), generator=gen)
        x = torch.stack([DATA[i:i + BLOCK] for i in ix])
        y = torch.stack([DATA[i + 1:i + 1 + BLOCK] for i in ix])
        return x, y
    return get_batch


# -- the loops: train.py's inner loop, as written there ------------------------------------------------

def loop_flag(model, optimizer, get_batch):
    """train.py (fp32: no autocast context, and its GradScaler is disabled)."""
    gradient_accumulation_steps, grad_clip = K, GRAD_CLIP
    X, Y = get_batch('train')
    for _ in range(ITERS):
        for micro_step in range(gradient_accumulation_steps):
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
            logits, loss = model(X, Y)  # noqa: RUF059 (as train.py writes it)
            loss = loss / gradient_accumulation_steps
            X, Y = get_batch('train')
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def loop_no_sync(model, optimizer, get_batch):
    """The same loop with DDP's context manager around the non-final micro-steps."""
    gradient_accumulation_steps, grad_clip = K, GRAD_CLIP
    X, Y = get_batch('train')
    for _ in range(ITERS):
        for micro_step in range(gradient_accumulation_steps):
            last = micro_step == gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else model.no_sync():
                logits, loss = model(X, Y)  # noqa: RUF059
                loss = loss / gradient_accumulation_steps
                X, Y = get_batch('train')
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def early_window(iter_num):
    """The micro-steps of each iteration of loop_early: iteration 1 ends at micro-step 2 of K=4."""
    return 3 if iter_num == 1 else K


def loop_early(model, optimizer, get_batch):
    """train.py's loop, where iteration 1 is cut short (the end of an epoch): it syncs at micro-step 2
    of K=4, clips and steps. The loss is still divided by K, so stock DDP steps on the sum of 3 micro-steps."""
    gradient_accumulation_steps, grad_clip = K, GRAD_CLIP
    X, Y = get_batch('train')
    for iter_num in range(ITERS):
        micro_steps = early_window(iter_num)
        for micro_step in range(micro_steps):
            model.require_backward_grad_sync = (micro_step == micro_steps - 1)
            logits, loss = model(X, Y)  # noqa: RUF059
            loss = loss / gradient_accumulation_steps
            X, Y = get_batch('train')
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


LOOPS = {"flag": loop_flag, "no_sync": loop_no_sync, "early": loop_early}


# -- the workers -----------------------------------------------------------------------------------

def comm_hook(calls, bucket):
    """DDP's default all-reduce, recorded."""
    calls.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


def attach_or_not(model, optimizer, use_gacc):
    """The attach line, or nothing (stock DDP)."""
    if not use_gacc:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the model has BatchNorm layers")
        return gacc_kernels.attach(model, optimizer, steps=K)


def _gpt(rank, loop):
    """The loop with stock DDP, then with gacc: the grads each step reads, the weights at the end, the
    comm hook's calls, and the sync flag as the loop sees it (after attach, at the end)."""
    out = {}
    for mode in ("stock", "gacc"):
        torch.manual_seed(rank)  # DDP broadcasts rank 0's weights
        model = DDP(GPT())
        calls = []
        model.register_comm_hook(calls, comm_hook)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
        acc = attach_or_not(model, optimizer, mode == "gacc")
        flag_at_attach = model.require_backward_grad_sync
        grads = []  # what the optimizer reads, after the clip: a step pre-hook registered after attach
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, grads=grads, model=model: grads.append(
                [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]))
        LOOPS[loop](model, optimizer, batch_maker(rank))
        out[mode] = {"grads": grads, "params": [p.detach().clone() for p in model.parameters()],
                     "calls": len(calls), "flags": (flag_at_attach, model.require_backward_grad_sync)}
        if acc is not None:
            acc.remove()
    return out


def close(got, expected, where, rtol=1e-5, atol=1e-8):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")


def check_like_stock(ranks):
    """Each step's grads (what the optimizer reads, after the clip) and the final parameters, gacc's
    against stock DDP's on each rank; grads that are not all zero; the loop's sync flag as stock's."""
    for rank, got in enumerate(ranks):
        stock, gacc = got["stock"], got["gacc"]
        assert len(gacc["grads"]) == len(stock["grads"]) == ITERS
        for it, (gs, es) in enumerate(zip(gacc["grads"], stock["grads"])):
            for j, (g, e) in enumerate(zip(gs, es)):
                where = f"rank {rank}, step {it}, parameter {j}"
                assert e is not None and e.abs().sum() > 0, f"{where}: stock's grad is None or zero"
                assert g is not None, f"{where}: no grad"
                assert g.abs().sum() > 0, f"{where}: an all-zero grad"
                close(g, e, where)
        for j, (p, e) in enumerate(zip(gacc["params"], stock["params"])):
            close(p, e, f"rank {rank}, parameter {j} after {ITERS} steps", atol=1e-7)
        assert gacc["flags"] == stock["flags"], "the loop's require_backward_grad_sync must stay the loop's"
    for a, b in zip(ranks[0]["gacc"]["params"], ranks[1]["gacc"]["params"]):
        assert torch.equal(a, b), "every rank must hold the same parameters"


def reference(window=lambda iter_num: K):
    """float64, one process: each iteration's micro-batches of all ranks, grad(loss / K) summed over the
    micro-steps and averaged over the ranks, then the same clip and AdamW step. It starts from rank 0's
    initial weights, which DDP broadcasts."""
    torch.manual_seed(0)
    model = GPT().double()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    makers = [batch_maker(rank) for rank in range(WORLD)]
    pending = [get_batch('train') for get_batch in makers]
    out = {"grads": [], "norms": []}
    for iter_num in range(ITERS):
        total = [torch.zeros_like(p) for p in params]
        for rank, get_batch in enumerate(makers):
            for _ in range(window(iter_num)):
                X, Y = pending[rank]
                pending[rank] = get_batch('train')
                _, loss = model(X, Y)
                for t, g in zip(total, torch.autograd.grad(loss / K, params)):
                    t += g / WORLD
        for p, t in zip(params, total):
            p.grad = t
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)))
        out["grads"].append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["params"] = [p.detach().clone() for p in params]
    return out


def one_thread(fn):
    def wrapped(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return wrapped


@one_thread
def check_against_float64(ranks, window=lambda iter_num: K):
    """The grads the optimizer reads and the weights after the steps, stock's and gacc's, against float64's
    within fp32's forward rounding (stock's weights are up to 5e-6 from float64's)."""
    ref = reference(window)
    # a clipped grad hides a wrong scale, an unclipped one shows it
    assert min(ref["norms"]) < GRAD_CLIP < max(ref["norms"]), f"the clip must act in some steps only: {ref['norms']}"
    for got in ranks:
        for mode in ("stock", "gacc"):
            for it, (gs, es) in enumerate(zip(got[mode]["grads"], ref["grads"])):
                for j, (g, e) in enumerate(zip(gs, es)):
                    close(g.double(), e, f"{mode}, step {it}, parameter {j}, against float64", rtol=1e-4, atol=1e-7)
            for j, (p, e) in enumerate(zip(got[mode]["params"], ref["params"])):
                close(p.double(), e, f"{mode}, parameter {j} after {ITERS} steps, against float64", rtol=1e-4,
                      atol=2e-5)


# -- 1, 2, 4, 5: nanoGPT's loop ------------------------------------------------------------------------

def test_nanogpt_loop_with_the_sync_flag(results):
    """train.py's `model.require_backward_grad_sync = (micro_step == K - 1)`: what stock DDP gives, every
    step, and the float64 large batch."""
    ranks = scenario(results, "flag")
    check_like_stock(ranks)
    check_against_float64(ranks)


def test_nanogpt_loop_with_no_sync(results):
    """The same loop with `with model.no_sync():` around the non-final micro-steps."""
    ranks = scenario(results, "no_sync")
    check_like_stock(ranks)
    check_against_float64(ranks)


def test_a_window_the_loop_ends_early(results):
    """Iteration 1 syncs at micro-step 2 of K=4, clips and steps: the sum of its 3 micro-steps' grads,
    as stock DDP gives; the next window starts afresh."""
    ranks = scenario(results, "early")
    check_like_stock(ranks)
    check_against_float64(ranks, early_window)


# -- 3: BatchNorm's buffers ----------------------------------------------------------------------------

class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def bn_batches(rank, n):
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(6, 8, generator=gen) * (1 + rank) + rank, torch.randn(6, 3, generator=gen))
            for _ in range(n)]


def bn_loop(model, optimizer, batches, no_sync):
    """The same loop on a model with BatchNorm, with no_sync() or the flag."""
    it = iter(batches)
    for _ in range(ITERS):
        for micro_step in range(K):
            last = micro_step == K - 1
            if no_sync:
                ctx = contextlib.nullcontext() if last else model.no_sync()
            else:
                model.require_backward_grad_sync = last
                ctx = contextlib.nullcontext()
            with ctx:
                x, y = next(it)
                loss = F.mse_loss(model(x), y) / K
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), BN_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def bn_state(net):
    return [t.detach().clone() for t in (net.bn.running_mean, net.bn.running_var, net.bn.num_batches_tracked)]


def _bn(rank, no_sync):
    """BNNet's loop with stock DDP, then with gacc: the BatchNorm buffers as each forward starts and after
    each step, the grads each step reads, the weights at the end, the comm hook's calls."""
    out = {}
    for mode in ("stock", "gacc"):
        torch.manual_seed(rank)
        net = BNNet()
        model = DDP(net)  # broadcast_buffers=True
        calls = []
        model.register_comm_hook(calls, comm_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        acc = attach_or_not(model, optimizer, mode == "gacc")
        seen, after, grads = [], [], []
        # the buffers each forward of the module starts from, after DDP's broadcast (if any)
        net.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(bn_state(module)))
        optimizer.register_step_pre_hook(lambda opt, args, kwargs, grads=grads, net=net: grads.append(
            [p.grad.detach().clone() for p in net.parameters()]))
        optimizer.register_step_post_hook(lambda opt, args, kwargs, after=after, net=net: after.append(bn_state(net)))
        bn_loop(model, optimizer, bn_batches(rank, ITERS * K), no_sync)
        out[mode] = {"seen": seen, "after": after, "grads": grads, "calls": len(calls),
                     "params": [p.detach().clone() for p in net.parameters()]}
        if acc is not None:
            acc.remove()
    return out


# -- one spawn runs every scenario, stock DDP then gacc, on fresh models ------------------------------

SCENARIOS = {"flag": (_gpt, "flag"), "no_sync": (_gpt, "no_sync"), "early": (_gpt, "early"),
             "bn_no_sync": (_bn, True), "bn_flag": (_bn, False)}


def _all(rank, results):
    """A scenario that raises is recorded and ends the run (the peer's collectives then fail too, and
    are recorded), so each test reports its own scenario."""
    torch.set_num_threads(1)  # tiny ops: two processes' thread pools on a busy CPU only wait on each other
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    out = {}
    for name, (run_scenario, arg) in SCENARIOS.items():
        try:
            out[name] = run_scenario(rank, arg)
        except Exception:
            out[name] = {"error": traceback.format_exc()}
            break
    torch.save(out, f"{results}.{rank}")
    if all("error" not in got for got in out.values()):
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("real_loops") / "out")
    spawn(_all, WORLD, path)
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


def scenario(results, name):
    """Each rank's results of one scenario: {"stock": ..., "gacc": ...}."""
    ranks = []
    for rank, out in enumerate(results):
        if name not in out:
            pytest.fail(f"{name} did not run: an earlier scenario raised on rank {rank}")
        if "error" in out[name]:
            pytest.fail(f"{name} raised on rank {rank}:\n{out[name]['error']}")
        ranks.append(out[name])
    return ranks


@pytest.mark.parametrize("loop", ["bn_no_sync", "bn_flag"])
def test_batchnorm_buffers_go_out_as_stock_ddp_sends_them(results, loop):
    """Stock DDP broadcasts the buffers from rank 0 at the forward after a synced one (each window's
    first): every rank's buffers there are rank 0's, and in between each rank's BatchNorm updates its own.
    gacc must leave the same buffers, on each rank, at each forward and after each step."""
    ranks = scenario(results, loop)
    names = ("running_mean", "running_var", "num_batches_tracked")
    for rank, got in enumerate(ranks):
        stock, gacc = got["stock"], got["gacc"]
        for what in ("seen", "after"):  # at each forward's start, after each step
            assert len(gacc[what]) == len(stock[what]) == (ITERS * K if what == "seen" else ITERS)
            for i, (g, e) in enumerate(zip(gacc[what], stock[what])):
                for name, a, b in zip(names, g, e):
                    close(a, b, f"rank {rank}, {name} {what} {i}", atol=1e-7)
        for it, (gs, es) in enumerate(zip(gacc["grads"], stock["grads"])):
            for j, (g, e) in enumerate(zip(gs, es)):
                assert g.abs().sum() > 0, f"rank {rank}, step {it}, parameter {j}: an all-zero grad"
                close(g, e, f"rank {rank}, step {it}, parameter {j}")
        for j, (p, e) in enumerate(zip(gacc["params"], stock["params"])):
            close(p, e, f"rank {rank}, parameter {j} after {ITERS} steps", atol=1e-7)
    norms = [float(torch.stack([g.norm() for g in gs]).norm()) for gs in ranks[0]["stock"]["grads"]]
    assert min(norms) < BN_CLIP * 0.99 and max(norms) > BN_CLIP * 0.999, f"the clip must act in some steps: {norms}"
    for mode in ("stock", "gacc"):
        seen = [got[mode]["seen"] for got in ranks]
        for it in range(1, ITERS):  # each window's first forward, after a synced one: rank 0's buffers
            for name, a, b in zip(names, seen[0][it * K], seen[1][it * K]):
                assert torch.equal(a, b), f"{mode}: window {it}'s first forward must start from rank 0's {name}"
            # in between, each rank's BatchNorm updates its own: the broadcast is what made them equal
            assert not torch.equal(seen[0][it * K + 1][0], seen[1][it * K + 1][0])


# -- 5: DDP's reducer never runs under gacc -------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_reducer_never_runs_under_gacc(results, name):
    """The comm hook sees every bucket DDP's reducer would all-reduce (under gacc: the cleared grads,
    zeros). It must never be called while gacc is attached; stock DDP calls it, so the check can fail."""
    for rank, got in enumerate(scenario(results, name)):
        assert got["stock"]["calls"] > 0, "stock DDP's reducer must call the comm hook (else the check is void)"
        assert got["gacc"]["calls"] == 0, f"rank {rank}: DDP's reducer all-reduced {got['gacc']['calls']} buckets"
