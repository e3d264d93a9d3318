"""layout on CPU tensors, no autograd: where slots lie in the flat buffer, when a bucket launches, and
what a launch writes (checked bit for bit against float64 rounded once per step, as kernels/reference.py
specifies)."""
import random

import pytest
import torch

from gacc_kernels.kernels.reference import CHUNK
from gacc_kernels.layout import DeviceBuffer, Slot, contiguous_strides, dense_strides

CPU = torch.device("cpu")


def params(*specs):
    """Parameters of these (shape, dtype), with random values."""
    return [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape, dtype in specs]


def padded(numel):
    return -(-numel // CHUNK) * CHUNK


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def accumulated(before: torch.Tensor, grad: torch.Tensor, weight: float, store: bool) -> torch.Tensor:
    """The spec in float64: t = fp32(w) * g rounded once to fp32; then t, or before + t rounded once."""
    t = (grad.double().reshape(-1) * f32(weight).double()).float()
    return t if store else (before.double() + t.double()).float()


def slot_of(buffer: DeviceBuffer, p: torch.nn.Parameter) -> Slot:
    return next(s for s in buffer.slots if s.param is p)


def test_slots_by_dtype_then_backward_order_each_on_a_chunk_boundary():
    a, b, c, d = params(((3, 5), torch.float32), ((7,), torch.bfloat16), ((40, 40), torch.float32),
                        ((2, 3), torch.bfloat16))
    buffer = DeviceBuffer(CPU, [a, b, c, d], bucket_bytes=1 << 30)
    # segments sorted by dtype name (bfloat16 < float32); within one, reverse registration order
    assert [s.param for s in buffer.slots] == [d, b, c, a]
    assert [s.order for s in buffer.slots] == [0, 2, 1, 3]  # the place in backward order over all dtypes
    starts = [0, CHUNK, 2 * CHUNK, 2 * CHUNK + padded(1600)]
    assert [s.start for s in buffer.slots] == starts
    assert buffer.segments == [(torch.bfloat16, 0, 2 * CHUNK), (torch.float32, 2 * CHUNK, starts[-1] + CHUNK)]
    assert buffer.buf.dtype == torch.float32 and buffer.buf.numel() == starts[-1] + CHUNK
    assert torch.equal(buffer.buf, torch.zeros_like(buffer.buf))
    assert buffer.partials.numel() == buffer.buf.numel() // CHUNK
    for s in buffer.slots:
        assert s.start % CHUNK == 0 and s.numel == s.param.numel() and s.shape == s.param.shape
        assert s.main.shape == s.param.shape and s.main.dtype == torch.float32
        assert s.main.data_ptr() == buffer.buf.data_ptr() + 4 * s.start  # a view of the buffer, not a copy
        assert s.partials().numel() == -(-s.numel // CHUNK)
        assert s.partials().data_ptr() == buffer.partials.data_ptr() + 4 * (s.start // CHUNK)
    # one bucket per segment when bucket_bytes is large
    assert [(bk.segment, [s.param for s in bk.slots]) for bk in buffer.buckets] == [(0, [d, b]), (1, [c, a])]
    assert [(bk.begin, bk.end) for bk in buffer.buckets] == [(0, 2 * CHUNK), (2 * CHUNK, starts[-1] + CHUNK)]
    assert all(s.bucket is bk for bk in buffer.buckets for s in bk.slots)


@pytest.mark.parametrize("bucket_bytes", [1, 100, 4000, 7000])
def test_buckets_cover_each_segment_in_order(bucket_bytes):
    rng = random.Random(bucket_bytes)
    specs = [((rng.randint(1, 900),), rng.choice([torch.float32, torch.bfloat16])) for _ in range(12)]
    ps = params(*specs)
    buffer = DeviceBuffer(CPU, ps, bucket_bytes=bucket_bytes)
    seen = []
    for bk in buffer.buckets:
        assert {s.segment for s in bk.slots} == {bk.segment}  # a bucket never spans two dtypes
        assert bk.dtype == buffer.segments[bk.segment][0]
        assert bk.begin == bk.slots[0].start and bk.end == bk.slots[-1].start + padded(bk.slots[-1].numel)
        size = sum(s.numel * s.param.element_size() for s in bk.slots)
        without_last = size - bk.slots[-1].numel * bk.slots[-1].param.element_size()
        assert without_last < bucket_bytes  # it closes as soon as it holds bucket_bytes
        seen += bk.slots
    assert seen == buffer.slots  # every slot in one bucket, buckets in buffer order


def test_dense_strides_keep_the_parameters_layout_else_contiguous():
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert dense_strides(cl) == cl.stride() != contiguous_strides(cl.shape)
    t = torch.randn(6, 4).t()
    assert dense_strides(t) == t.stride() == (1, 4)
    sliced = torch.randn(4, 6)[:, ::2]  # not dense: its slot is contiguous
    assert dense_strides(sliced) == contiguous_strides(sliced.shape) == (3, 1)
    p = torch.nn.Parameter(cl.clone(memory_format=torch.channels_last))
    buffer = DeviceBuffer(CPU, [p], bucket_bytes=1)
    s = buffer.slots[0]
    assert s.main.stride() == p.stride() and not s.contiguous


def test_slot_take_holds_is_repeat_and_load():
    (p,) = params(((4,), torch.float32))
    s = DeviceBuffer(CPU, [p], bucket_bytes=1).slots[0]
    assert not s.holds(0) and not s.is_repeat(0)
    assert s.take(window=0, micro=0)  # the window's first grad stores
    assert s.holds(0) and s.is_repeat(0) and not s.is_repeat(1)
    assert not s.take(window=0, micro=0)  # a second grad in the same micro-step adds
    assert not s.take(window=0, micro=1) and s.is_repeat(1) and not s.is_repeat(0)
    assert s.take(window=1, micro=2) and s.holds(1) and not s.holds(0)
    s.load(None)
    assert not s.holds(1) and s.take(window=1, micro=3)
    s.load(5)
    assert s.holds(5) and not s.take(window=5, micro=4)


def test_a_bucket_launches_when_every_slot_has_arrived():
    ps = params(((5, 7), torch.float32), ((1030,), torch.float32), ((3,), torch.float32))
    buffer = DeviceBuffer(CPU, ps, bucket_bytes=1 << 30)
    (bucket,) = buffer.buckets
    buffer.buf.copy_(torch.randn_like(buffer.buf))  # random "older" values: a launch must leave others alone
    before = buffer.buf.clone()
    weight = random.Random(1).uniform(0.1, 2.0)
    grads = {id(p): torch.randn(p.shape) for p in ps}
    store = {id(ps[0]): True, id(ps[1]): False, id(ps[2]): False}
    order = list(ps)
    random.Random(2).shuffle(order)
    for i, p in enumerate(order):
        launched = bucket.add(slot_of(buffer, p), grads[id(p)], store[id(p)], weight, None, None)
        assert launched is (i == len(order) - 1)
        if not launched:
            assert torch.equal(buffer.buf, before)  # queued, not written
    expected = before.clone()
    for p in ps:
        s = slot_of(buffer, p)
        expected[s.start: s.start + s.numel] = accumulated(before[s.start: s.start + s.numel], grads[id(p)], weight,
                                                           store[id(p)])
    assert torch.equal(buffer.buf, expected)  # padding included: untouched
    assert not bucket.grads and not bucket.arrived
    assert not bucket.flush(weight, None)  # nothing pending


def test_bf16_grads_and_a_transposed_grad_land_in_memory_order():
    a, b = params(((6, 4), torch.bfloat16), ((300,), torch.bfloat16))
    buffer = DeviceBuffer(CPU, [a, b], bucket_bytes=1 << 30)
    buffer.buf.copy_(torch.randn_like(buffer.buf))
    before = buffer.buf.clone()
    ga = torch.randn(4, 6).to(torch.bfloat16).t()  # a's shape, column-major: not the slot's memory order
    gb = torch.randn(300).to(torch.bfloat16)
    sa, sb = slot_of(buffer, a), slot_of(buffer, b)
    assert not buffer.buckets[0].add(sa, ga, False, 0.75, None, None)
    assert buffer.buckets[0].add(sb, gb, True, 0.75, None, None)
    assert torch.equal(sa.main, accumulated(before[sa.start: sa.start + 24], ga.contiguous(), 0.75, False).view(6, 4))
    assert torch.equal(sb.main, accumulated(None, gb, 0.75, True))


def test_a_grad_of_another_dtype_flushes_what_is_queued():
    ps = params(((10,), torch.float32), ((20,), torch.float32), ((30,), torch.float32))
    buffer = DeviceBuffer(CPU, ps, bucket_bytes=1 << 30)
    (bucket,) = buffer.buckets
    s0, s1, s2 = buffer.slots  # backward order: ps[2], ps[1], ps[0]
    g0, g1 = torch.randn(30), torch.randn(20).to(torch.bfloat16)
    buffer.buf.fill_(float("nan"))  # every slot stores: a slot left unwritten stays NaN
    assert not bucket.add(s0, g0, True, 0.5, None, None)
    assert torch.isnan(s0.main).all()
    assert not bucket.add(s1, g1, True, 0.5, None, None)  # one launch takes one dtype: s0's grad goes first
    assert torch.equal(s0.main, accumulated(None, g0, 0.5, True))
    assert torch.isnan(s1.main).all()
    assert bucket.grads == [g1] and bucket.arrived == {s1}  # the count of arrived slots starts again
    assert bucket.flush(0.5, None)  # the end of backward launches what is left
    assert torch.equal(s1.main, accumulated(None, g1, 0.5, True))
    assert torch.isnan(s2.main).all()


def test_drop_forgets_the_pending_grads():
    ps = params(((8,), torch.float32), ((9,), torch.float32))
    buffer = DeviceBuffer(CPU, ps, bucket_bytes=1 << 30)
    (bucket,) = buffer.buckets
    buffer.buf.copy_(torch.randn_like(buffer.buf))
    before = buffer.buf.clone()
    assert not bucket.add(buffer.slots[0], torch.randn(9), True, 1.0, None, None)
    bucket.drop()
    assert not bucket.grads and not bucket.arrived and not bucket.pending
    assert not bucket.flush(1.0, None)
    assert torch.equal(buffer.buf, before)
    # after a drop the bucket needs every slot again
    assert not bucket.add(buffer.slots[1], torch.randn(8), True, 1.0, None, None)
    assert torch.equal(buffer.buf, before)


def test_arrive_counts_a_grad_written_into_the_slot_directly():
    ps = params(((8,), torch.float32), ((9,), torch.float32))
    buffer = DeviceBuffer(CPU, ps, bucket_bytes=1 << 30)
    (bucket,) = buffer.buckets
    s0, s1 = buffer.slots
    g = torch.randn(9)
    assert not bucket.add(s0, g, True, 2.0, None, None)
    assert bucket.arrive(s1, 2.0, None)  # fused_linear wrote s1 itself: the bucket is complete
    assert torch.equal(s0.main, accumulated(None, g, 2.0, True))


def test_the_armed_last_pass_finalizes_in_the_launch_and_casts_over_the_grads():
    big, small = params(((1500,), torch.bfloat16), ((7,), torch.bfloat16))
    buffer = DeviceBuffer(CPU, [big, small], bucket_bytes=1 << 30)
    (bucket,) = buffer.buckets
    buffer.buf.copy_(torch.randn_like(buffer.buf))
    before = buffer.buf.clone()
    buffer.partials.fill_(float("nan"))
    sbig, ssmall = slot_of(buffer, big), slot_of(buffer, small)
    gbig, gsmall = torch.randn(1500).to(torch.bfloat16), torch.randn(7).to(torch.bfloat16)
    gsmall[3] = float("inf")
    originals = {id(gbig): gbig.clone(), id(gsmall): gsmall.clone()}  # the launch writes the result over them
    scale = f32(1 / 3).reshape(1)
    weight = 0.3
    for s in (sbig, ssmall):
        s.take(window=0, micro=4)
    assert not bucket.add(ssmall, gsmall, True, weight, None, scale)
    assert bucket.add(sbig, gbig, False, weight, None, scale)
    for s, g, store in ((sbig, gbig, False), (ssmall, gsmall, True)):
        acc = accumulated(before[s.start: s.start + s.numel], originals[id(g)], weight, store)
        done = (acc.double() * scale.double()).float()
        assert torch.equal(s.main, done)
        assert s.finalized_in == 4 and s.finalized(4)
        assert s.out is g and torch.equal(s.out, done.to(torch.bfloat16))  # p.grad is the grad's own memory
        squares = torch.zeros(padded(s.numel), dtype=torch.float64)
        squares[: s.numel] = done.double().square()
        torch.testing.assert_close(s.partials().double(), squares.view(-1, CHUNK).sum(1), rtol=1e-5, atol=0,
                                   equal_nan=False)
    assert buffer.found_inf.item() == 1.0  # the inf in the small grad


def test_the_armed_last_pass_skips_grads_of_another_dtype():
    (p,) = params(((10,), torch.float32))
    buffer = DeviceBuffer(CPU, [p], bucket_bytes=1 << 30)
    s = buffer.slots[0]
    s.take(window=0, micro=0)
    g = torch.randn(10).to(torch.bfloat16)  # a bf16 grad of an fp32 parameter: accumulate only
    assert buffer.buckets[0].add(s, g, True, 1.0, None, f32(0.5).reshape(1))
    assert torch.equal(s.main, accumulated(None, g, 1.0, True))
    assert s.finalized_in == -1 and s.out is None
