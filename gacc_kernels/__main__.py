"""python -m gacc_kernels: which implementation each op uses on this machine, and why."""
from .kernels.ops import report

print(report())
