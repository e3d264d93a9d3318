"""Data parallel over a process group (a DDP wrapper's, or attach(process_group=)): the ranks' fp32 sums
are added once per window, bucket by bucket, overlapped with the last backward."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import Bucket, DeviceBuffer
from .reducer import LocalReducer

COMM_DTYPES = (torch.float32, torch.bfloat16)


class AllReduce(LocalReducer):
    """Data parallel over a process group (a DDP wrapper's, or attach(process_group=)): the ranks' fp32
    sums are added once per window, bucket by bucket, each as soon as the last micro-step has written
    it, while the rest of backward runs.

    Every rank issues the same collectives in the same order, whatever its graph did: the window's
    weight, the buckets in `order`, then one int per slot and per bucket (slots written or with late
    grads on any rank; when each bucket became ready), then the late grads. Only the first `early`
    buckets of `order` may go during backward, and only in order; the rest go when it has ended. Both
    are learned from the previous window, as agreed by all ranks: buckets ready before the end of
    backward on every rank come first, in the order they became ready. A bucket with an unused
    parameter, or one that receives a second grad in a micro-step (tied weights, reentrant
    checkpointing), waits for the end. A grad that reaches a bucket already on the wire is kept
    aside and reduced after the others ("late"), so it is never lost or added twice.

    comm_dtype=torch.bfloat16 sends each bucket rounded to bf16 (half the bytes); the sum is then
    exact to the bf16 rounding of each rank's value plus the collective's bf16 additions.
    """
    fuses_last_pass = False

    def __init__(self, group, buffer: DeviceBuffer, comm_dtype: torch.dtype):
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype must be torch.float32 or torch.bfloat16, got {comm_dtype} (fp16 "
                             "would overflow on loss-scaled sums)")
        self.group, self.buffer, self.comm_dtype = group, buffer, comm_dtype
        self.ranks = dist.get_world_size(group)
        self.index = {id(s): i for i, s in enumerate(buffer.slots)}
        self._set_order(sorted(buffer.buckets, key=lambda b: max(s.order for s in b.slots)),
                        len(buffer.buckets))
        self._reset()

    def _set_order(self, order: list[Bucket], early: int) -> None:
        self.order, self.early = order, early
        self.place = {id(b): i for i, b in enumerate(order)}

    def _reset(self) -> None:
        n = len(self.order)
        self.ready = [False] * n
        # when each bucket became ready; n + place: not before the end
        self.arrival = [n + i for i in range(n)]
        self.arrived = 0
        self.next = 0  # the first bucket of `order` not yet issued
        self.works: list[tuple[Bucket, object, torch.Tensor | None]] = []
        self.sending: set[int] = set()  # ids of the buckets whose collective is in flight
        self.weight: tuple[torch.Tensor, object] | None = None
        self.late: dict[int, torch.Tensor] = {}  # slot index -> its late grads, weighted, fp32

    def _send_weight(self, weight_sum: float) -> None:
        t = torch.tensor([weight_sum], dtype=torch.float64, device=self.buffer.device)
        self.weight = (t, dist.all_reduce(t, group=self.group, async_op=True))

    def on_bucket_ready(self, bucket, weight_sum):
        if self.weight is None:
            self._send_weight(weight_sum)
        place = self.place[id(bucket)]
        self.ready[place] = True
        if not bucket.repeats:
            self.arrival[place], self.arrived = self.arrived, self.arrived + 1
        while self.next < self.early and self.ready[self.next]:
            self._issue(self.order[self.next])

    def _issue(self, bucket: Bucket) -> None:
        view = self.buffer.buf[bucket.begin: bucket.end]
        wire = None if self.comm_dtype == torch.float32 else view.to(self.comm_dtype)
        work = dist.all_reduce(view if wire is None else wire, group=self.group, async_op=True)
        self.works.append((bucket, work, wire))
        self.sending.add(id(bucket))
        self.next += 1

    def is_sending(self, bucket):
        return id(bucket) in self.sending

    def take_late(self, slot, grad, weight):
        if not self.is_sending(slot.bucket):
            return False
        g = slot.flat_view(grad).float().mul_(weight)
        i = self.index[id(slot)]
        self.late[i] = g if i not in self.late else self.late[i].add_(g)
        return True

    def finish(self, buffers, written, weight_sum):
        if self.weight is None:  # no bucket was ready before the end of backward, or the window ended early
            self._send_weight(weight_sum)
        while self.next < len(self.order):
            self._issue(self.order[self.next])
        slots, n = self.buffer.slots, len(self.order)
        for b in self.order:
            if b.repeats:  # learned this window: it waits for the end from now on
                self.arrival[self.place[id(b)]] = n + self.place[id(b)]
        flags = torch.tensor(written + [i in self.late for i in range(len(slots))] + self.arrival,
                             dtype=torch.int32, device=self.buffer.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        for bucket, work, wire in self.works:
            work.wait()
            if wire is not None:
                self.buffer.buf[bucket.begin: bucket.end].copy_(wire)
        flags = flags.tolist()
        late, arrival = flags[len(slots): 2 * len(slots)], flags[2 * len(slots):]
        for i, slot in enumerate(slots):
            if late[i]:  # some rank got a late grad here: every rank sends its own (or zeros)
                g = self.late.get(i)
                g = torch.zeros(slot.numel, device=self.buffer.device) if g is None else g
                dist.all_reduce(g, group=self.group)
                slot.flat(self.buffer.buf).add_(g)
        total, work = self.weight
        work.wait()
        early = sum(a < n for a in arrival)
        if early:  # else no window's last micro-step ran (an early step): keep the order
            places = sorted(range(n), key=lambda p: (arrival[p], p))
            self._set_order([self.order[p] for p in places], early)
        self._reset()
        return [bool(f) for f in flags[:len(slots)]], total

    def stats_totals(self, local):
        """Each rank's micro-batches are its own: q, the weights and the micro-steps are summed; S_big is
        the norm of the reduced result, the same on every rank."""
        summed = local[[0, 2, 3]]
        dist.all_reduce(summed, group=self.group)
        q, weights, n = summed.unbind()
        return torch.stack([q, local[1], weights, n, weights])

    def abort(self):
        """A backward raised: wait for what is on the wire (the window is dropped)."""
        for _, work, _ in self.works:
            work.wait()
        if self.weight is not None:
            self.weight[1].wait()
        self._reset()
