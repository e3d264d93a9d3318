"""Data-parallel setups gacc cannot be exact under are refused at attach (one gloo process)."""

import pytest
import torch
import torch.distributed as dist

import gacc_kernels
from helpers.spawn import free_port


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def net():
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def hooks(model):
    return len(model._forward_hooks), [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]


def refused(model, match):
    before = hooks(model)
    with pytest.raises(ValueError, match=match):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, reduction="mean")
    assert hooks(model) == before, "a refused attach leaves nothing behind"


def test_ddp_static_graph_is_refused(one_process_group):
    refused(torch.nn.parallel.DistributedDataParallel(net(), static_graph=True), "static_graph")


def test_fsdp1_is_refused(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    refused(FullyShardedDataParallel(net(), device_id=torch.device("cpu")), "FSDP1")


def test_fsdp2_with_unsharded_parameters_is_refused(one_process_group):
    from torch.distributed.fsdp import fully_shard
    model = net()
    fully_shard(model[0])  # not the root: the last Linear's grads would never be reduced
    refused(model, "must be sharded")


def test_hsdp_with_tensor_parallelism_is_refused(one_process_group):
    """HSDP over a tensor-parallel model (a 3-D mesh): not supported yet. One process gives a 1x1x1 mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    model = net()
    mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("replicate", "shard", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["replicate", "shard"])
    assert {p.device_mesh.ndim for p in model.parameters()} == {3}
    refused(model, "FSDP2 over tensor parallelism on a \\(dp, tp\\) mesh")


def test_grad_stats_with_fsdp2_over_tensor_parallelism_is_refused(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    model = net()
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    with pytest.raises(ValueError, match="grad_stats under FSDP2 with tensor parallelism"):
        gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, grad_stats=True)
    gacc_kernels.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2).remove()  # nothing left


def test_dtensor_parameters_on_a_2d_mesh_outside_fsdp2_are_refused(one_process_group):
    """Tensor parallelism is supported on one 1-D mesh; a 2-D mesh without FSDP2 (TP x another dimension
    gacc does not reduce over) is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    model = net()
    mesh = init_device_mesh("cpu", (1, 1))
    model[0].weight = torch.nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Replicate()] * 2))
    refused(model, "one 1-D mesh only")


def test_deepspeed_engine_is_refused():
    class DeepSpeedEngine(torch.nn.Module):  # what attach() sees of one: a module of that type name
        def __init__(self):
            super().__init__()
            self.module = net()

    refused(DeepSpeedEngine(), "DeepSpeed engine")
