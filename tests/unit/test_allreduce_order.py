"""distributed.allreduce.AllReduce with a fake process group: the order of the collectives it issues,
the order it learns from a window, and where late grads go. No process group is created: the module's
`dist` is replaced by FakeDist, which plays two ranks that hold the same values (a SUM doubles)."""
import random
from types import SimpleNamespace

import pytest
import torch

from gacc_kernels.distributed import allreduce
from gacc_kernels.distributed.allreduce import AllReduce
from gacc_kernels.layout import DeviceBuffer

CPU = torch.device("cpu")
RANKS = 2


class FakeWork:
    def __init__(self, dist, tensor, name):
        self.dist, self.tensor, self.name, self.waited = dist, tensor, name, False

    def wait(self):
        assert not self.waited, f"{self.name} waited twice"
        self.waited = True
        self.tensor.mul_(RANKS)  # the result is there once waited for
        self.dist.log.append(("wait", self.name))


class FakeDist:
    ReduceOp = SimpleNamespace(SUM="sum", MAX="max")

    def __init__(self, buffer: DeviceBuffer):
        self.buffer, self.log, self.works = buffer, [], []
        self.other_flags = None  # the other rank's flags, for a MAX (None: the same as this rank's)

    def get_world_size(self, group=None):
        return RANKS

    def name(self, t: torch.Tensor) -> str:
        """What a collective carries: a bucket (by its index in buffer.buckets), the weight, flags, a late grad."""
        if t.dtype == torch.float64:
            return "weight"
        if t.dtype == torch.int32:
            return "flags"
        for i, b in enumerate(self.buffer.buckets):
            if t.numel() == b.end - b.begin and (t.dtype != torch.float32 or
                                                 t.data_ptr() == self.buffer.buf[b.begin:].data_ptr()):
                return f"bucket{i}"
        return "late"

    def all_reduce(self, tensor, op="sum", group=None, async_op=False):
        name = self.name(tensor)
        self.log.append(("all_reduce", name))
        if async_op:
            work = FakeWork(self, tensor, name)
            self.works.append(work)
            return work
        if op == "sum":
            tensor.mul_(RANKS)
        elif self.other_flags is not None:
            torch.maximum(tensor, self.other_flags(tensor.clone()), out=tensor)
        return None

    def issued(self):
        return [name for what, name in self.log if what == "all_reduce"]


def setup(monkeypatch, n=4, comm_dtype=torch.float32):
    """n fp32 parameters, one bucket each, random values in the buffer; the AllReduce over the fake group."""
    ps = [torch.nn.Parameter(torch.randn(random.Random(i).randint(1, 50))) for i in range(n)]
    buffer = DeviceBuffer(CPU, ps, bucket_bytes=1)
    assert len(buffer.buckets) == n
    buffer.buf.copy_(torch.randn_like(buffer.buf))
    fake = FakeDist(buffer)
    monkeypatch.setattr(allreduce, "dist", fake)
    return buffer, fake, AllReduce(group=None, buffer=buffer, comm_dtype=comm_dtype)


def window(reducer, buffer, ready, weight_sum=3.0):
    """The last micro-step: buckets become ready in this order (indices into buffer.buckets), then finish."""
    for i in ready:
        reducer.on_bucket_ready(buffer.buckets[i], weight_sum)
    return reducer.finish([buffer], [True] * len(buffer.slots), weight_sum)


def bucket_names(fake, since=0):
    return [name for name in fake.issued()[since:] if name.startswith("bucket")]


def test_the_first_window_sends_in_backward_order_and_only_in_order(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    # one slot per bucket, buckets in backward order: that is the first window's order, all early
    assert reducer.order == buffer.buckets and reducer.early == 4 and reducer.ranks == RANKS
    reducer.on_bucket_ready(buffer.buckets[2], 3.0)
    assert fake.issued() == ["weight"]  # the window's weight goes first; bucket 2 waits for 0 and 1
    reducer.on_bucket_ready(buffer.buckets[0], 3.0)
    assert fake.issued() == ["weight", "bucket0"]
    assert reducer.is_sending(buffer.buckets[0]) and not reducer.is_sending(buffer.buckets[2])
    reducer.on_bucket_ready(buffer.buckets[3], 3.0)
    reducer.on_bucket_ready(buffer.buckets[1], 3.0)
    assert fake.issued() == ["weight", "bucket0", "bucket1", "bucket2", "bucket3"]


def test_the_sum_over_ranks_is_waited_for_and_returned(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    before = buffer.buf.clone()
    written = [random.Random(i).random() < 0.5 for i in range(4)]
    out, total = reducer.finish([buffer], written, 2.5)  # no bucket was ready during backward
    assert fake.issued() == ["weight", "bucket0", "bucket1", "bucket2", "bucket3", "flags"]
    assert all(w.waited for w in fake.works)
    assert out == written
    assert total.dtype == torch.float64 and total.item() == 2.5 * RANKS
    for b in buffer.buckets:
        assert torch.equal(buffer.buf[b.begin: b.end], before[b.begin: b.end] * RANKS)


def test_the_order_is_learned_from_when_buckets_became_ready(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    ready = [2, 0, 3, 1]
    window(reducer, buffer, ready)
    assert reducer.order == [buffer.buckets[i] for i in ready] and reducer.early == 4
    # the next window sends each bucket as soon as it is ready, in the learned order
    start = len(fake.log)
    reducer.on_bucket_ready(buffer.buckets[2], 3.0)
    assert bucket_names(fake, len(fake.issued()) - 1) == ["bucket2"]
    reducer.on_bucket_ready(buffer.buckets[3], 3.0)  # before bucket 0 in this window: waits for it
    assert [n for _, n in fake.log[start:] if n.startswith("bucket")] == ["bucket2"]
    reducer.on_bucket_ready(buffer.buckets[0], 3.0)
    assert [n for w, n in fake.log[start:] if w == "all_reduce"] == ["weight", "bucket2", "bucket0", "bucket3"]


def test_an_early_step_keeps_the_order(monkeypatch):
    buffer, _, reducer = setup(monkeypatch)
    window(reducer, buffer, [3, 1, 2, 0])
    learned = list(reducer.order)
    window(reducer, buffer, [])  # no bucket ready before the end: nothing to learn from
    assert reducer.order == learned and reducer.early == 4


def test_a_bucket_with_repeats_waits_for_the_end(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    buffer.buckets[1].mark_repeats()  # a tied weight: a second grad in one micro-step
    window(reducer, buffer, [1, 0, 2, 3])  # ready first, but not counted
    b = buffer.buckets
    assert reducer.order == [b[0], b[2], b[3], b[1]] and reducer.early == 3
    start = len(fake.issued())
    for i in (0, 2, 3, 1):
        reducer.on_bucket_ready(b[i], 3.0)
    assert bucket_names(fake, start) == ["bucket0", "bucket2", "bucket3"]  # bucket 1 not during backward
    assert not reducer.is_sending(b[1])
    reducer.finish([buffer], [True] * 4, 3.0)
    assert bucket_names(fake, start) == ["bucket0", "bucket2", "bucket3", "bucket1"]


def test_a_bucket_never_ready_goes_after_backward(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    b = buffer.buckets
    window(reducer, buffer, [3, 0, 2])  # bucket 1 holds an unused parameter: never complete
    assert reducer.order == [b[3], b[0], b[2], b[1]] and reducer.early == 3
    start = len(fake.issued())
    for i in (3, 0, 2):
        reducer.on_bucket_ready(b[i], 3.0)
    assert bucket_names(fake, start) == ["bucket3", "bucket0", "bucket2"]
    reducer.finish([buffer], [True] * 4, 3.0)
    assert bucket_names(fake, start) == ["bucket3", "bucket0", "bucket2", "bucket1"]


def test_a_bucket_ready_on_one_rank_only_goes_after_backward(monkeypatch):
    """The other rank never completed bucket 2 (a parameter it does not use): the ranks take the latest
    arrival (MAX), so every rank learns to send bucket 2 after backward."""
    buffer, fake, reducer = setup(monkeypatch)
    n, slots = len(buffer.buckets), len(buffer.slots)

    def other_rank(flags):
        flags[2 * slots + 2] = n + 2  # arrival of bucket 2 (its place in the first window's order): not before the end
        return flags
    fake.other_flags = other_rank
    window(reducer, buffer, [0, 1, 2, 3])
    b = buffer.buckets
    assert reducer.order == [b[0], b[1], b[3], b[2]] and reducer.early == 3


def test_repeats_learned_after_the_bucket_was_ready_still_send_it_last(monkeypatch):
    buffer, _, reducer = setup(monkeypatch)
    b = buffer.buckets
    reducer.on_bucket_ready(b[3], 3.0)
    b[3].mark_repeats()  # its second grad came after it was ready (and on the wire)
    for i in (0, 1, 2):
        reducer.on_bucket_ready(b[i], 3.0)
    reducer.finish([buffer], [True] * 4, 3.0)
    assert reducer.order[-1] is b[3] and reducer.early == 3


def test_late_grads_are_kept_aside_and_reduced_after(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    b = buffer.buckets
    before = buffer.buf.clone()
    slot = b[0].slots[0]
    g, weight = torch.randn(slot.numel), 0.3
    assert not reducer.take_late(slot, g.clone(), weight)  # its bucket is not on the wire: it goes into the bucket
    reducer.on_bucket_ready(b[0], 3.0)
    # clones: take_late may scale the grad it is given in place (capture hands it p.grad, which it then drops)
    assert reducer.take_late(slot, g.clone(), weight)
    assert reducer.take_late(slot, g.clone(), weight)  # two late grads of one slot add up
    assert torch.equal(buffer.buf, before)  # kept aside, not written over what is being sent
    for i in (1, 2, 3):
        reducer.on_bucket_ready(b[i], 3.0)
    out, _ = reducer.finish([buffer], [True] * 4, 3.0)
    issued = fake.issued()
    assert issued[-2:] == ["flags", "late"]  # after every bucket and the flags that tell ranks of late grads
    assert out == [True] * 4
    t = (g * torch.tensor(weight, dtype=torch.float32)).double()
    late = ((t + t).float() * RANKS).double()
    expected = (before[slot.start: slot.start + slot.numel].double() * RANKS + late).float()
    assert torch.equal(slot.flat(buffer.buf), expected)
    for other in b[1:]:
        assert torch.equal(buffer.buf[other.begin: other.end], before[other.begin: other.end] * RANKS)
    assert not reducer.late and not reducer.sending  # reset for the next window


def test_bf16_on_the_wire_is_copied_back(monkeypatch):
    buffer, _, reducer = setup(monkeypatch, comm_dtype=torch.bfloat16)
    before = buffer.buf.clone()
    window(reducer, buffer, [0, 1, 2, 3])
    for b in buffer.buckets:
        assert torch.equal(buffer.buf[b.begin: b.end], (before[b.begin: b.end].to(torch.bfloat16) * RANKS).float())


def test_comm_dtype_must_be_fp32_or_bf16(monkeypatch):
    buffer, _, _ = setup(monkeypatch)
    with pytest.raises(ValueError, match="comm_dtype must be"):
        AllReduce(group=None, buffer=buffer, comm_dtype=torch.float16)


def test_abort_waits_for_what_is_on_the_wire(monkeypatch):
    buffer, fake, reducer = setup(monkeypatch)
    reducer.on_bucket_ready(buffer.buckets[0], 3.0)
    reducer.on_bucket_ready(buffer.buckets[1], 3.0)
    reducer.abort()
    assert len(fake.works) == 3 and all(w.waited for w in fake.works)  # the weight and two buckets
    assert not reducer.sending and reducer.weight is None and reducer.next == 0
