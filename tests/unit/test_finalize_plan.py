"""finalize.Finalizer on CPU buffers, no autograd: the scale of a window, the armed last-pass plan, the
whole pass per segment and clipping, against float64 computed by hand (one fp32 rounding per step)."""
import random

import pytest
import torch

from gacc_kernels.distributed.reducer import LocalReducer, RanksDisagree
from gacc_kernels.finalize import Finalizer
from gacc_kernels.kernels.reference import CHUNK
from gacc_kernels.layout import DeviceBuffer
from gacc_kernels.window import State, Window

CPU = torch.device("cpu")


class FakeScaler:
    """What Finalizer reads of amp.ScalerBridge: enabled, and 1 / the loss scale on a device."""

    def __init__(self, scale: float, enabled: bool = True):
        self.scale, self.enabled = scale, enabled

    def inv_scale(self, device):
        return torch.tensor([1 / self.scale], dtype=torch.float64).float().to(device)


def f32(x: float) -> torch.Tensor:
    """x (a float64 value) rounded once to fp32, as a 1-element tensor."""
    return torch.tensor([x], dtype=torch.float64).float()


def mixed_buffer(seed=0, bucket_bytes=1 << 30):
    """A buffer with a bf16 and an fp32 segment, random values in every slot (padding stays 0)."""
    rng = random.Random(seed)
    specs = [((rng.randint(1, 1500),), dtype) for dtype in (torch.float32, torch.bfloat16, torch.float32,
                                                            torch.bfloat16, torch.float32)]
    ps = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape, dtype in specs]
    buffer = DeviceBuffer(CPU, ps, bucket_bytes)
    for s in buffer.slots:
        s.main.copy_(torch.randn(s.shape))
    return buffer


def scaled(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values.double() * scale.double()).float()


@pytest.mark.parametrize("seed", range(3))
def test_scales_for_mean_and_sum(seed):
    rng = random.Random(seed)
    buffers = [mixed_buffer(seed), mixed_buffer(seed + 10)]
    w, loss_scale, ranks = rng.uniform(0.5, 40.0), rng.choice([1.0, 0.37, 1024.0]), rng.randint(1, 8)
    mean = Finalizer(buffers, mean=True, loss_scale=loss_scale, scaler=None, ranks=ranks).scales(w)
    total = Finalizer(buffers, mean=False, loss_scale=loss_scale, scaler=None, ranks=ranks).scales(w)
    assert len(mean) == len(total) == 2
    for m, t in zip(mean, total):
        assert m.dtype == t.dtype == torch.float32 and m.shape == t.shape == (1,)
        assert torch.equal(m, f32(1 / (w * loss_scale)))  # reduction="mean": 1 / sum(w)
        assert torch.equal(t, f32(1 / (ranks * loss_scale)))  # "sum": the ranks' average, whatever sum(w) is


def test_scales_from_a_weight_summed_over_the_ranks_on_the_device():
    buffers = [mixed_buffer()]
    w = torch.tensor([7.3], dtype=torch.float64)  # as allreduce.AllReduce.finish returns it
    (m,) = Finalizer(buffers, mean=True, loss_scale=0.5, scaler=None, ranks=4).scales(w)
    (t,) = Finalizer(buffers, mean=False, loss_scale=0.5, scaler=None, ranks=4).scales(w)
    assert torch.equal(m, f32(1 / (7.3 * 0.5))) and torch.equal(t, f32(1 / (4 * 0.5)))
    assert m.dtype == t.dtype == torch.float32 and m.shape == t.shape == (1,)
    # 2**24 + 1 tokens: not an fp32 number, so the sum must stay float64 until the reciprocal is rounded
    w = torch.tensor([2.0**24 + 1], dtype=torch.float64)
    (m,) = Finalizer(buffers, mean=True, loss_scale=1.0, scaler=None, ranks=4).scales(w)
    assert torch.equal(m, f32(1 / (2.0**24 + 1))) and not torch.equal(m, f32(2.0**-24))


def test_scales_divide_by_the_grad_scalers_scale():
    buffers = [mixed_buffer()]
    scaler = FakeScaler(65536.0 * 3)
    (s,) = Finalizer(buffers, mean=True, loss_scale=1.0, scaler=scaler, ranks=1).scales(2.5)
    assert torch.equal(s, scaled(f32(1 / 2.5), scaler.inv_scale(CPU)))
    (off,) = Finalizer(buffers, mean=True, loss_scale=1.0, scaler=FakeScaler(8.0, enabled=False),
                       ranks=1).scales(2.5)
    assert torch.equal(off, f32(1 / 2.5))
    finalizer = Finalizer(buffers, mean=False, loss_scale=1.0, scaler=scaler, ranks=2)
    assert torch.equal(finalizer.scales(0.0)[0], scaled(f32(1 / 2), scaler.inv_scale(CPU)))


def test_a_zero_weight_window_has_no_mean():
    buffers = [mixed_buffer()]
    with pytest.raises(ValueError, match="weight 0"):
        Finalizer(buffers, mean=True, loss_scale=1.0, scaler=None, ranks=1).scales(0.0)
    with pytest.raises(ValueError, match="weight 0"):
        Finalizer(buffers, mean=True, loss_scale=1.0, scaler=None, ranks=2).scales(torch.zeros(1, dtype=torch.float64))
    Finalizer(buffers, mean=False, loss_scale=1.0, scaler=None, ranks=1).scales(0.0)  # "sum" does not divide by it


def test_arm_armed_and_reset():
    buffers = [mixed_buffer(1), mixed_buffer(2)]
    finalizer = Finalizer(buffers, mean=True, loss_scale=1.0, scaler=None, ranks=1)
    assert finalizer.armed(buffers[0]) is None and finalizer.armed(buffers[1]) is None
    for b in buffers:
        b.found_inf.fill_(1.0)
    scales = finalizer.scales(3.0)
    finalizer.arm(scales)
    assert finalizer.armed(buffers[0]) is scales[0] and finalizer.armed(buffers[1]) is scales[1]
    assert all(b.found_inf.item() == 0.0 for b in buffers)  # the last pass flags this window's infs only
    for b in buffers:
        b.found_inf.fill_(1.0)
    finalizer.arm(None)
    assert finalizer.armed(buffers[0]) is None and finalizer.armed(buffers[1]) is None
    assert all(b.found_inf.item() == 1.0 for b in buffers)  # disarming keeps the finished window's flag
    finalizer.whole_pass(scales)
    assert finalizer.outs[0][0] is not None  # the bf16 segment's cast
    finalizer.arm(scales)
    finalizer.reset()
    assert finalizer.armed(buffers[0]) is None
    assert finalizer.outs == [[None, None], [None, None]]


def check_finalized(buffer, before, scale, outs):
    """The buffer holds before * scale per fp32 rounding, bf16 segments are cast into outs, and each
    segment's partials sum to its squared norm."""
    assert torch.equal(buffer.buf, scaled(before, scale))
    for (dtype, b, e), out in zip(buffer.segments, outs):
        if dtype == torch.float32:
            assert out is None
        else:
            assert out.dtype == dtype and out.shape == (e - b,)
            assert torch.equal(out, buffer.buf[b:e].to(dtype))
        part = buffer.partials[b // CHUNK: e // CHUNK]
        expected = buffer.buf[b:e].double().square().sum()
        torch.testing.assert_close(part.double().sum(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_whole_pass_scales_flags_casts_and_writes_the_norm(seed):
    buffer = mixed_buffer(seed)
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=1)
    before = buffer.buf.clone()
    buffer.partials.fill_(float("nan"))  # every partial of every segment is written
    buffer.found_inf.fill_(1.0)  # an older window's flag: the pass starts again
    (scale,) = finalizer.scales(random.Random(seed).uniform(0.5, 9.0))
    finalizer.whole_pass([scale])
    check_finalized(buffer, before, scale, finalizer.outs[0])
    assert buffer.found_inf.item() == 0.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("segment", [0, 1])
def test_whole_pass_flags_a_non_finite_value_in_any_segment(bad, segment):
    buffer = mixed_buffer()
    s = next(s for s in buffer.slots if s.segment == segment)
    s.main.view(-1)[random.Random(0).randrange(s.numel)] = bad
    finalizer = Finalizer([buffer], mean=False, loss_scale=1.0, scaler=None, ranks=1)
    finalizer.whole_pass(finalizer.scales(1.0))
    assert buffer.found_inf.item() == 1.0


def test_clip_scales_the_buffer_the_casts_and_the_norm():
    buffer = mixed_buffer(3)
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=1)
    finalizer.whole_pass(finalizer.scales(3.0))
    before, partials = buffer.buf.clone(), buffer.partials.clone()
    coef = f32(0.123456789)
    finalizer.clip_(coef)
    assert torch.equal(buffer.buf, scaled(before, coef))
    (dtype, b, e), out = buffer.segments[0], finalizer.outs[0][0]
    assert dtype == torch.bfloat16 and torch.equal(out, buffer.buf[b:e].to(torch.bfloat16))
    assert torch.equal(buffer.partials, scaled(partials, coef.square()))


def test_clip_after_the_fused_last_pass_scales_each_grad():
    """After a fused last pass p.grad of a bf16 parameter is its own tensor (slot.out), not a view of one cast."""
    buffer = mixed_buffer(4)
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=1)
    bf16 = [s for s in buffer.slots if s.segment == 0]
    for s in bf16:
        s.set_out(torch.full(s.shape, float("nan"), dtype=torch.bfloat16))  # poison: clip_ must write them
    before = buffer.buf.clone()
    coef = f32(0.7)
    finalizer.clip_(coef)
    assert torch.equal(buffer.buf, scaled(before, coef))
    for s in bf16:
        assert torch.equal(s.out, s.main.to(torch.bfloat16))


def test_slot_finalizes_one_parameter_and_gives_a_bf16_one_its_grad():
    buffer = mixed_buffer(5)
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=1)
    before = buffer.buf.clone()
    s = next(s for s in buffer.slots if s.segment == 0 and s.numel > 1)
    others = [o for o in buffer.slots if o is not s]
    s.partials().fill_(float("nan"))
    scale = f32(1 / 3)
    finalizer.slot(s, scale)
    assert torch.equal(s.main, scaled(before[s.start: s.start + s.numel], scale).view(s.shape))
    assert s.out is not None and s.out.dtype == torch.bfloat16 and torch.equal(s.out, s.main.to(torch.bfloat16))
    torch.testing.assert_close(s.partials().double().sum(), s.main.double().square().sum(), rtol=1e-5, atol=0)
    for o in others:  # nothing else moved
        assert torch.equal(o.main, before[o.start: o.start + o.numel].view(o.shape))


def window_with(slots, written, k=2, weights=(0.5, 1.5)):
    """A window of k micro-steps with these weights, whose slots flagged in `written` hold a grad."""
    w = Window(k)
    for weight in weights:
        w.set_weight(weight)
        w.begin_backward(False, False)
        for s, wrote in zip(slots, written):
            if wrote:
                s.take(w.id, w.micro)
        w.end_micro_step()
    return w


def test_run_zeroes_slots_of_older_windows_and_finalizes_the_rest():
    buffer = mixed_buffer(6)
    slots = buffer.slots
    written = [i % 2 == 0 for i in range(len(slots))]
    window = window_with(slots, written)
    before = buffer.buf.clone()
    buffer.partials.fill_(float("nan"))
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=1)
    assert finalizer.run(window, slots, LocalReducer(), fused=False) == written
    scale = f32(1 / 2.0)  # 1 / (0.5 + 1.5)
    for s, wrote in zip(slots, written):
        region = s.flat(buffer.buf)
        if wrote:
            assert torch.equal(region, scaled(s.flat(before), scale))
        else:  # stale values from an earlier window: not part of this one
            assert torch.equal(region, torch.zeros_like(region))
            assert torch.equal(s.partials(), torch.zeros_like(s.partials()))
    assert finalizer.armed(buffer) is None


def test_run_after_a_fused_last_pass_finishes_only_the_slots_it_did_not_reach():
    buffer = mixed_buffer(7)
    slots = buffer.slots
    window = window_with(slots, [True] * len(slots))
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=1)
    scale = f32(0.25)
    finalizer.arm([scale])
    reached = slots[::2]  # as if the last micro-step's fused launches had finalized these
    for s in reached:
        s.finalized_in = window.finalizing = 41
    before = buffer.buf.clone()
    assert finalizer.run(window, slots, LocalReducer(), fused=True) == [True] * len(slots)
    for s in slots:
        expected = s.flat(before) if s in reached else scaled(s.flat(before), scale)
        assert torch.equal(s.flat(buffer.buf), expected)
    assert finalizer.armed(buffer) is None


def test_run_breaks_the_window_where_the_ranks_disagree():
    class Disagree(LocalReducer):
        fuses_last_pass = False

        def finish(self, buffers, written, weight_sum):
            raise RanksDisagree("rank 1 ran 3 micro-steps, rank 0 ran 2.")

    buffer = mixed_buffer(8)
    window = window_with(buffer.slots, [True] * len(buffer.slots))
    before = buffer.buf.clone()
    finalizer = Finalizer([buffer], mean=True, loss_scale=1.0, scaler=None, ranks=2)
    assert finalizer.run(window, buffer.slots, Disagree(), fused=False) is None
    assert window.state is State.BROKEN
    message = window.broken_message()
    assert "rank 1 ran 3 micro-steps, rank 0 ran 2." in message and "zero_grad()" in message
    assert torch.equal(buffer.buf, before)  # nothing finalized
