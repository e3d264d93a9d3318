"""The kernels' optional stat partials (the gradient noise scale's sum(w g^2) per CHUNK), every backend
against float64: odd sizes, store and accumulate mixed, poisoned outputs; and with or without them, every
other output bit for bit the same."""
import pytest
import torch
from test_ops import _grad, _impls, _op, assert_bits_equal

from gacc_kernels.kernels import reference

CHUNK = reference.CHUNK
NAN = float("nan")


def _backends():
    return [pytest.param("reference", "cpu", id="reference"), *_impls()]


def _op_or_ref(backend, name):
    if backend == "reference":
        return getattr(reference, name.rstrip("_") + "_ref")
    return _op(backend, name)


def _case(dtype, device):
    """Grads of odd sizes at CHUNK-aligned offsets (some with a gap), store and accumulate mixed; the
    buffer is NaN where a grad stores, stat partials NaN where a grad stores, random elsewhere."""
    sizes = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 5, 2500]
    grads, offsets, store, off = [], [], [], CHUNK
    for i, n in enumerate(sizes):
        grads.append(_grad(n, dtype, device, offset=i % 3))
        offsets.append(off)
        store.append(i % 3 != 1)
        off += -(-n // CHUNK) * CHUNK + (CHUNK if i % 4 == 0 else 0)
    buf = torch.randn(off + CHUNK, device=device)
    stats = torch.randn(off // CHUNK + 1, device=device).abs()
    for g, o, st in zip(grads, offsets, store):
        if st:
            buf[o: o + g.numel()] = NAN
            stats[o // CHUNK: o // CHUNK + -(-g.numel() // CHUNK)] = NAN
    return grads, offsets, store, buf, stats


def _expected(stats, grads, offsets, store, weight):
    """float64: (store ? 0 : old) + sum(w g^2) per chunk; untouched elsewhere."""
    out = stats.double().clone()
    for g, o, st in zip(grads, offsets, store):
        sq = torch.zeros(-(-g.numel() // CHUNK) * CHUNK, dtype=torch.float64)
        sq[:g.numel()] = weight * g.double().cpu() ** 2
        sums = sq.view(-1, CHUNK).sum(1).to(out.device)
        at = slice(o // CHUNK, o // CHUNK + sums.numel())
        out[at] = sums if st else out[at] + sums
    return out


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_accumulate_many_stat_partials(backend, device, dtype, weight):
    op = _op_or_ref(backend, "accumulate_many_")
    grads, offsets, store, start, stats = _case(dtype, device)
    plain = start.clone()
    op(plain, grads, offsets, store, weight)
    buf, got = start.clone(), stats.clone()
    op(buf, grads, offsets, store, weight, got)
    assert_bits_equal(buf, plain)  # the stats change no result bit
    exp = _expected(stats, grads, offsets, store, weight)
    assert torch.equal(got.isnan(), exp.isnan()), "stores overwrite the poison; untouched chunks stay"
    torch.testing.assert_close(got.double(), exp, rtol=2e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("write_grads", [False, True])
def test_accumulate_finalize_stat_partials(backend, device, dtype, write_grads):
    op = _op_or_ref(backend, "accumulate_finalize_")
    grads, offsets, store, start, stats = _case(dtype, device)
    scale = torch.tensor([0.37], device=device)
    results = []
    for stat in (None, stats.clone()):
        buf, found_inf = start.clone(), torch.zeros(1, device=device)
        partials = torch.full_like(stats, NAN)
        gs = [g.clone() for g in grads]
        op(buf, gs, offsets, store, 0.7, scale, found_inf, partials, write_grads, stat)
        results.append((buf, found_inf, partials, gs, stat))
    (b0, f0, p0, g0, _), (b1, f1, p1, g1, got) = results
    assert_bits_equal(b1, b0)
    assert_bits_equal(f1, f0)
    assert_bits_equal(p1, p0)
    for a, b in zip(g1, g0):
        assert_bits_equal(a, b)
    exp = _expected(stats, grads, offsets, store, 0.7)  # the grads before write_grads overwrote them
    assert torch.equal(got.isnan(), exp.isnan())
    torch.testing.assert_close(got.double(), exp, rtol=2e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend,device", _backends())
def test_stat_partials_misaligned_or_short_are_refused(backend, device):
    many = _op_or_ref(backend, "accumulate_many_")
    buf, g = torch.zeros(4 * CHUNK, device=device), torch.ones(CHUNK + 1, device=device)
    with pytest.raises((RuntimeError, ValueError), match="multiple"):
        many(buf, [g], [3], [True], 1.0, torch.zeros(4, device=device))
    if backend != "reference":  # the reference indexes past the end without a check of its own
        with pytest.raises((RuntimeError, ValueError), match="stat_partials"):
            many(buf, [g], [2 * CHUNK], [True], 1.0, torch.zeros(3, device=device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_with_stat_partials(device):
    _op("extension", "accumulate_many_")
    g = _grad(100, torch.bfloat16, device)
    buf = torch.randn(4 * CHUNK, device=device)
    stats = torch.zeros(4, device=device)
    torch.library.opcheck(torch.ops.gacc.accumulate_many_.default,
                          (buf, [g, g[:10]], [0, 2 * CHUNK], [True, False], 0.5, stats))
    torch.library.opcheck(torch.ops.gacc.accumulate_finalize_.default,
                          (buf, [g.clone(), g[:10].clone()], [CHUNK, 2 * CHUNK], [True, False], 0.5,
                           torch.ones(1, device=device), torch.zeros(1, device=device),
                           torch.zeros(4, device=device), True, stats))
