"""Timing, byte counting and the stamp that every benchmark result carries."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def stamp() -> str:
    """Device, versions and date, for the head of a results file."""
    import triton

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        dev = f"CPU ({platform.processor() or platform.machine()})"
    return (f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
            f"CUDA {torch.version.cuda}; date {datetime.date.today().isoformat()}")


def time_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of fn(); CUDA events on a GPU, wall clock otherwise."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup * 5, rep=reps * 5, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def events_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn() timed whole with a sync on each side (host work included)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def write_report(out: str, name: str, md: list[str]) -> None:
    """Writes the markdown lines to out/name and prints them."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
