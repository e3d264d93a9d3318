"""Every implementation of every op against the reference: random data, bit-exact where the math is."""
import os

import pytest
import torch

from gacc_kernels.kernels import ops, reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [1, 2, 7, 127, 129, 4095, 4097, 65537]
NAN = float("nan")
INF = float("inf")


def _impls():
    """(implementation, device) pairs; GPU pairs are marked and skip without a GPU."""
    gpu = pytest.mark.gpu
    return [
        pytest.param("extension", "cpu", id="ext-cpu"),
        pytest.param("triton", "cpu", id="triton-interpreter", marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs compiled on this machine")),
        pytest.param("extension", "cuda", id="ext-cuda", marks=gpu),
        pytest.param("triton", "cuda", id="triton-cuda", marks=gpu),
    ]


def _op(backend, name):
    if backend == "extension":
        if ops.EXTENSION_ERROR is not None:
            pytest.fail(f"extension not loaded: {ops.EXTENSION_ERROR}")  # CI builds it: a failure, not a skip
        return getattr(torch.ops.gacc, name)
    from gacc_kernels.kernels import triton_ops
    return getattr(triton_ops, name)


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def assert_bits_equal(a, b):
    """Bit-for-bit equality (NaN == NaN, -0.0 != 0.0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    mismatch = (_bits(a) != _bits(b)) & ~(a.isnan() & b.isnan())
    assert not mismatch.any(), f"{int(mismatch.sum())} elements differ, first at {mismatch.nonzero()[0].tolist()}"


def _grad(n, dtype, device, offset=0):
    """Random grad of n elements; offset > 0 makes it start off a 16-byte boundary."""
    return (torch.randn(n + offset) * 3).to(dtype).to(device)[offset:]


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_accumulate_matches_reference(backend, device, dtype, n, weight):
    op = _op(backend, "accumulate_")
    for store in (True, False):
        for misalign in (0, 1):
            g = _grad(n, dtype, device, misalign)
            start = torch.randn(n + misalign, device=device)[misalign:]
            expect = start.clone()
            reference.accumulate_ref(expect, g, weight, store)
            got = torch.full_like(start, NAN) if store else start.clone()  # a store must write everything
            op(got, g, weight, store)
            assert_bits_equal(got, expect)


@pytest.mark.parametrize("backend,device", _impls())
def test_accumulate_bf16_into_fp32_with_weight_one_is_exact(backend, device):
    op = _op(backend, "accumulate_")
    g = _grad(10001, torch.bfloat16, device)
    acc = torch.randn(10001, device=device, dtype=torch.float64).float()
    expect = (acc.double() + g.double()).float()  # one rounding of the exact sum
    op(acc, g, 1.0, False)
    assert_bits_equal(acc, expect)


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_many_matches_reference(backend, device, dtype):
    op = _op(backend, "accumulate_many_")
    sizes = [1, 0, 4097, 3, 64, 129] + [int(s) for s in torch.randint(1, 300, (70,))]  # > 64 tensors
    grads, offsets, store, off = [], [], [], 5
    for i, n in enumerate(sizes):
        grads.append(_grad(n, dtype, device, offset=i % 3))
        offsets.append(off)
        store.append(i % 2 == 0)
        off += n + (i % 4)  # gaps, odd offsets
    start = torch.randn(off + 7, device=device)
    for i, (o, g) in enumerate(zip(offsets, grads)):
        if store[i]:
            start[o: o + g.numel()] = NAN  # stored slots must be fully overwritten
    expect = start.clone()
    reference.accumulate_many_ref(expect, grads, offsets, store, 0.7)
    got = start.clone()
    op(got, grads, offsets, store, 0.7)
    assert_bits_equal(got, expect)


@pytest.mark.parametrize("backend,device", _impls())
def test_accumulate_many_empty_list_is_a_no_op(backend, device):
    buf = torch.randn(10, device=device)
    before = buf.clone()
    _op(backend, "accumulate_many_")(buf, [], [], [], 1.0)
    assert_bits_equal(buf, before)


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 129, 4097, 65537])
def test_finalize_matches_reference_on_finite_data(backend, device, out_dtype, n):
    op = _op(backend, "finalize_")
    buf = torch.randn(n, device=device) * 100
    scale = torch.tensor([0.125 / 3], device=device)
    p = reference.norm_partials_size(n) + 2
    expect, got = buf.clone(), buf.clone()
    f_exp, f_got = torch.zeros(1, device=device), torch.zeros(1, device=device)
    p_exp, p_got = torch.zeros(p, device=device), torch.full((p,), NAN, device=device)
    o_exp = None if out_dtype is None else torch.empty(n, dtype=out_dtype, device=device)
    o_got = None if out_dtype is None else torch.full((n,), NAN, device=device).to(out_dtype)
    reference.finalize_ref(expect, scale, f_exp, p_exp, o_exp)
    op(got, scale, f_got, p_got, o_got)
    assert_bits_equal(got, expect)
    if out_dtype is not None:
        assert_bits_equal(o_got, o_exp)
    assert f_got.item() == 0.0, "found_inf set on finite data"
    torch.testing.assert_close(p_got.double().sum(), expect.double().square().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("bad", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_finalize_flags_non_finite(backend, device, bad, where):
    op = _op(backend, "finalize_")
    n = 9999
    buf = torch.randn(n, device=device)
    buf[{"first": 0, "middle": n // 2, "last": n - 1}[where]] = bad
    found_inf = torch.zeros(1, device=device)
    partials = torch.zeros(reference.norm_partials_size(n), device=device)
    out = torch.full((n,), NAN, device=device).bfloat16()
    expect, expect_out = buf.clone(), torch.empty_like(out)
    reference.finalize_ref(expect, torch.ones(1, device=device), torch.zeros(1, device=device),
                           torch.zeros(1, device=device), expect_out)
    op(buf, torch.tensor([1.0], device=device), found_inf, partials, out)
    assert found_inf.item() == 1.0
    assert not torch.isfinite(partials.sum())
    assert_bits_equal(buf, expect)
    assert_bits_equal(out, expect_out)


@pytest.mark.parametrize("backend,device", _impls())
def test_finalize_scale_overflow_to_inf_is_flagged(backend, device):
    buf = torch.randn(100, device=device)
    buf[37] = 3e38
    found_inf = torch.zeros(1, device=device)
    _op(backend, "finalize_")(buf, torch.tensor([4.0], device=device), found_inf,
                              torch.zeros(1, device=device), None)
    assert found_inf.item() == 1.0 and buf[37].item() == INF


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16], ids=str)
def test_scale_matches_reference(backend, device, out_dtype):
    n = 4099
    buf = torch.randn(n, device=device) * 1000
    buf[5] = NAN
    s = torch.tensor([0.37], device=device)
    expect, got = buf.clone(), buf.clone()
    o_exp = None if out_dtype is None else torch.empty(n, dtype=out_dtype, device=device)
    o_got = None if out_dtype is None else torch.full((n,), NAN, device=device).to(out_dtype)
    reference.scale_ref(expect, s, o_exp)
    _op(backend, "scale_")(got, s, o_got)
    assert_bits_equal(got, expect)
    if out_dtype is not None:
        assert_bits_equal(o_got, o_exp)


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("write_grads", [False, True])
def test_accumulate_finalize_matches_reference(backend, device, dtype, write_grads):
    op = _op(backend, "accumulate_finalize_")
    chunk = reference.CHUNK
    sizes = [1, chunk - 1, chunk, chunk + 1, 5000, 3] + [int(s) for s in torch.randint(1, 3000, (66,))]
    grads, offsets, store, off = [], [], [], 2 * chunk
    for i, n in enumerate(sizes):
        grads.append(_grad(n, dtype, device, offset=i % 3))
        offsets.append(off)
        store.append(i % 2 == 0)
        off += -(-n // chunk) * chunk + (chunk if i % 5 == 0 else 0)
    start = torch.randn(off + chunk, device=device)
    for i, (o, g) in enumerate(zip(offsets, grads)):
        if store[i]:
            start[o: o + g.numel()] = NAN
    scale = torch.tensor([0.37], device=device)
    results = []
    for fn in (reference.accumulate_finalize_ref, op):
        buf, found_inf = start.clone(), torch.zeros(1, device=device)
        partials = torch.full((off // chunk + 1,), NAN, device=device)
        gs = [g.clone() for g in grads]
        fn(buf, gs, offsets, store, 0.7, scale, found_inf, partials, write_grads)
        results.append((buf, found_inf, partials, gs))
    (b_exp, f_exp, p_exp, g_exp), (b_got, f_got, p_got, g_got) = results
    assert_bits_equal(b_got, b_exp)
    for a, b, g in zip(g_got, g_exp, grads):
        assert_bits_equal(a, b)
        if not write_grads:
            assert_bits_equal(a, g)  # grads untouched
    assert f_got.item() == f_exp.item() == 0.0
    written = ~p_exp.isnan()
    assert torch.equal(written, ~p_got.isnan()), "partials written where the reference writes them, only"
    torch.testing.assert_close(p_got[written], p_exp[written], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", _impls())
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_accumulate_finalize_flags_non_finite(backend, device, where):
    chunk = reference.CHUNK
    n = 3 * chunk - 72  # at offset chunk: partials 1, 2 and 3, the last chunk partly filled
    g = _grad(n, torch.bfloat16, device)
    g[{"first": 0, "middle": n // 2, "last": n - 1}[where]] = INF
    buf, found_inf = torch.randn(4 * chunk, device=device), torch.zeros(1, device=device)
    partials = torch.zeros(4, device=device)
    _op(backend, "accumulate_finalize_")(buf, [g], [chunk], [False], 1.0, torch.ones(1, device=device),
                                         found_inf, partials, True)
    assert found_inf.item() == 1.0 and not torch.isfinite(partials[1:4].sum())


@pytest.mark.parametrize("backend,device", _impls())
def test_bad_inputs_are_refused(backend, device):
    acc, fin = _op(backend, "accumulate_"), _op(backend, "finalize_")
    buf = torch.zeros(8, device=device)
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        acc(torch.zeros(8, device=device, dtype=torch.float16), torch.zeros(8, device=device), 1.0, True)
    with pytest.raises((RuntimeError, ValueError)):
        acc(buf, torch.zeros(7, device=device), 1.0, True)
    with pytest.raises((RuntimeError, ValueError)):
        acc(buf, torch.zeros(4, 2, device=device).t(), 1.0, True)
    with pytest.raises((RuntimeError, IndexError)):
        _op(backend, "accumulate_many_")(buf, [torch.zeros(4, device=device)], [6], [True], 1.0)
    with pytest.raises((RuntimeError, ValueError)):
        fin(buf, torch.ones(2, device=device), torch.zeros(1, device=device), torch.zeros(1, device=device), None)
    big = torch.zeros(4096, device=device)
    last = _op(backend, "accumulate_finalize_")
    args = (torch.ones(1, device=device), torch.zeros(1, device=device), torch.zeros(4, device=device))
    with pytest.raises((RuntimeError, ValueError), match="multiple"):
        last(big, [torch.zeros(4, device=device)], [100], [True], 1.0, *args, False)
    with pytest.raises((RuntimeError, ValueError), match="norm_partials"):
        last(torch.zeros(8192, device=device), [torch.zeros(2000, device=device)], [3072], [True], 1.0, *args, False)


@pytest.mark.gpu
def test_offsets_past_2_to_the_31():
    """int64 indexing: a grad and a buffer of more than 2^31 elements, checked near the top."""
    n = 2**31 + 5
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-3:] = torch.tensor([2.0, 3.0, 4.0])
    for backend in ("extension", "triton"):
        buf = torch.full((n,), NAN, device="cuda")
        _op(backend, "accumulate_")(buf, g, 0.5, True)
        assert buf[-4:].tolist() == [0.5, 1.0, 1.5, 2.0]
        assert not buf.isnan().any()
        found_inf = torch.zeros(1, device="cuda")
        partials = torch.zeros(reference.norm_partials_size(n), device="cuda")
        _op(backend, "finalize_")(buf, torch.tensor([2.0], device="cuda"), found_inf, partials, None)
        assert buf[-1].item() == 4.0 and found_inf.item() == 0.0
        del buf
    big = torch.zeros(2**31 + 4096, device="cuda")
    small = _grad(3000, torch.bfloat16, "cuda")
    for backend in ("extension", "triton"):
        _op(backend, "accumulate_many_")(big, [small], [2**31 - 1000], [True], 1.0)
        assert_bits_equal(big[2**31 - 1000: 2**31 + 2000], small.float())


def _opcheck_cases(device):
    g = _grad(100, torch.bfloat16, device)
    buf = torch.randn(300, device=device)
    return [
        ("accumulate_", (buf[:100], g, 0.5, False)),
        ("accumulate_many_", (buf, [g, g[:10]], [0, 200], [True, False], 0.5)),
        ("finalize_", (buf, torch.ones(1, device=device), torch.zeros(1, device=device),
                       torch.zeros(3, device=device), torch.empty(300, dtype=torch.bfloat16, device=device))),
        ("scale_", (buf, torch.ones(1, device=device), None)),
        ("accumulate_finalize_", (torch.randn(4 * reference.CHUNK, device=device), [g.clone(), g[:10].clone()],
                                  [reference.CHUNK, 2 * reference.CHUNK],
                                  [True, False], 0.5, torch.ones(1, device=device), torch.zeros(1, device=device),
                                  torch.zeros(4, device=device), True)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    _op("extension", "accumulate_")
    for name, args in _opcheck_cases(device):
        torch.library.opcheck(getattr(torch.ops.gacc, name).default, args)


def test_backend_choice_is_explained():
    text = ops.report()
    for name in ops.OPS:
        assert name in text
    assert ops.choose("accumulate_", "cpu").backend in ("extension", "reference")
    assert ops.choose("accumulate_", "mps").backend == "reference"
