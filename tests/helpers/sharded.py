"""The float64 reference and the check shared by the sharded-training tests (HSDP, FSDP2 over TP)."""
import torch
import torch.nn.functional as F


def weighted_mean(model: torch.nn.Module, batches) -> list[torch.Tensor]:
    """float64: the sum over (x, y, w) of w times the grads of the MSE loss, over the total weight."""
    model = model.double()
    params = list(model.parameters())
    total, wsum = [torch.zeros_like(p) for p in params], 0.0
    for x, y, w in batches:
        for t, g in zip(total, torch.autograd.grad(F.mse_loss(model(x.double()), y.double()), params)):
            t += w * g
        wsum += w
    return [t / wsum for t in total]


def assert_grads_and_norm(got: dict, expected: list[torch.Tensor], what: str) -> None:
    """got["grads"] (whole tensors) and got["norm"] against the reference grads and their global norm."""
    for j, (g, e) in enumerate(zip(got["grads"], expected)):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, w=f"{what}, parameter {j}": f"{w}: {m}")
    norm = torch.stack([g.norm() for g in expected]).norm()
    torch.testing.assert_close(got["norm"].double(), norm, rtol=1e-5, atol=0, msg=f"{what}: the norm")
