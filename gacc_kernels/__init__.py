"""gacc_kernels: exact fp32 gradient accumulation in one memory pass per micro-step.

    import gacc_kernels
    acc = gacc_kernels.attach(model, optimizer, steps=K)
"""
from .accumulator import GradAccumulator
from .attaching import attach
from .kernels.ops import accumulate_, accumulate_many_, finalize_, report, scale_

__all__ = ["GradAccumulator", "attach", "accumulate_", "accumulate_many_", "finalize_", "scale_", "report"]
__version__ = "0.1.0"
