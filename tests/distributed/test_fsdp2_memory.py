"""Memory of FSDP2 accumulation with gradient sync off, on two gloo processes: the gradient bytes gacc holds
against those of FSDP2's own no-sync with reduce_dtype=fp32, after the window's last no-sync micro-step
(where both hold every parameter's unsharded sum). The allocator's peak, transients included, is measured
on the GPU by bench/bench_dist.py: on the CPU, when gloo's threads free their tensors varies by more than
the difference."""
import pytest
import torch
import torch.distributed as dist

import gacc_kernels
from helpers.spawn import spawn

K, WORLD, D = 3, 2, 256
PARAMS = 4 * D * D


def _measure(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    held = {}
    for gacc in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(D, D, bias=False) for _ in range(4)])
        for layer in model:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = gacc_kernels.attach(model, opt, steps=K) if gacc else None
        x = torch.randn(8, D)
        for _ in range(K - 1):
            model.set_requires_gradient_sync(False)
            model(x).float().pow(2).mean().backward()
        if gacc:  # private: the unsharded sums, and the sharded buffer that p.grad will view
            reducer = acc._parts.events.reducer
            held[gacc] = (sum(t.nbytes for pair in reducer.unsharded.values() for t in pair if t is not None)
                          + reducer.buffer.buf.nbytes)
        else:  # private: FSDP's unsharded sums; its sharded fp32 grads come at the reduce-scatter
            from gacc_kernels.distributed.fsdp2 import _fsdp_params, _param_groups, fsdp2_modules
            groups = [g for m in fsdp2_modules(model) for g in _param_groups(m)]
            held[gacc] = (sum(p.unsharded_accumulated_grad.nbytes for p in _fsdp_params(groups))
                          + 4 * PARAMS // WORLD)
        model.set_requires_gradient_sync(True)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if acc is not None:
            acc.remove()
    torch.save(held, f"{results}.{rank}")
    dist.destroy_process_group()


def test_no_sync_holds_no_more_than_fsdp2_fp32_no_sync(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    results = str(tmp_path / "held")
    spawn(_measure, WORLD, results)
    for rank in range(WORLD):
        held = torch.load(f"{results}.{rank}")
        assert held[False] == 4 * PARAMS + 4 * PARAMS // WORLD  # 4 + 4/N bytes per parameter
        assert held[True] <= held[False], f"rank {rank}: gacc holds {held[True]} bytes, FSDP2 {held[False]}"
