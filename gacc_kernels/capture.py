"""Capture: the only code that touches autograd.

It hands the accumulator three events of each backward (graph task) through the model:
    start  a grad hook on each of the model's outputs, the first of which fires before any parameter's
           grad is accumulated (or the first parameter grad, for a backward that bypasses the outputs)
    grad   each parameter's post-accumulate-grad hook; the grad is taken out of p.grad (or, for a
           weight that fused_linear or its own layer writes into the buffer, `fused_grad`)
    end    a callback queued on the engine, after every grad of the backward
Under FSDP2, the hooks of FSDP's unsharded parameters also offer each whole grad before FSDP reduces it
(`unsharded_grad`: taken with gradient sync off).
At the start, the fused_linear layers are armed where the accumulator can say in advance where their
grads go; their grads then reach the buffer with no call back, and are counted at the end.
A micro-step by hand (by_hand: grads written into p.grad outside autograd's accumulation, a pipeline's
split weight backward) has the same three events, from the block's start, its grads and its end.
A backward that raised never reaches its end: the next forward, step or zero_grad sees that and
reports it as aborted, so the state is reset cleanly.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from typing import Protocol

import torch
from torch.utils._pytree import tree_leaves

from . import fused_linear
from .layout import Slot, local_placed
from .patch import plain_copies


class Sink(Protocol):
    def backward_starting(self, will_accumulate, accumulated: bool) -> None: ...
    def armed_writes(self, slots: list[Slot]) -> tuple[float, list[float]] | None: ...
    def grad_ready(self, slot: Slot, grad: torch.Tensor, stream) -> None: ...
    def unsharded_grad(self, slot: Slot, grad: torch.Tensor) -> bool: ...
    def write_fused(self, slot: Slot, write) -> None: ...
    def armed_written(self, slots: list[Slot]) -> None: ...
    def backward_done(self, delivered: bool) -> None: ...
    def backward_aborted(self, delivered: bool) -> None: ...


def compiled_autograd_active() -> bool:
    """This backward runs under compiled autograd (torch._dynamo.compiled_autograd)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(getattr(ca, "in_compiled_autograd_region", False))


COMPILED_AUTOGRAD = (
    "gacc cannot run under compiled autograd: its hooks keep Python state across micro-steps that "
    "Dynamo cannot trace. Turn it off for the backward of a model with gacc attached "
    "(torch._dynamo.config.compiled_autograd = False); torch.compile of the model's forward works.")


BY_HAND = -2  # Capture.task during a micro-step by hand (graph task ids are >= 0, -1 outside any)


def _stream(slot: Slot):
    index = slot.buffer.cuda_index
    # private: the raw handle of the current stream, which is what Triton launches on
    return None if index is None else torch._C._cuda_getCurrentRawStream(index)


class Capture:
    def __init__(self, model: torch.nn.Module, slots: list[Slot], sink: Sink):
        self.model, self.slots, self.sink = model, slots, sink
        self.task: int | None = None  # the graph task of the backward in progress
        self.delivered = False        # it gave a parameter a grad
        self._lock = threading.Lock()  # parameters on several devices get hooks on several threads
        self._nodes: list | None = None
        self.routes: dict[Slot, int] = {}  # fused_linear's layers that can be armed: slot -> route
        self._armed: dict[int, Slot] | None = None  # those armed for the backward in progress
        self._find_unsharded = None  # FSDP2: reports its unsharded parameters not hooked yet
        self._unsharded_hooks: list = []

    def install(self, undo: contextlib.ExitStack) -> None:
        for slot in self.slots:
            undo.callback(slot.param.register_post_accumulate_grad_hook(self._hook_for(slot)).remove)
        handle = self.model.register_forward_hook(self._on_forward)
        undo.callback(handle.remove)
        plain_copies(self.model, undo, forward_hook=handle.id)

    def watch_unsharded(self, find, undo: contextlib.ExitStack) -> None:
        """FSDP2: hook the unsharded parameters that `find()` reports as (slot, unsharded parameter), at
        each forward (FSDP makes them at its first all-gather)."""
        self._find_unsharded = find
        undo.callback(lambda: [h.remove() for h in self._unsharded_hooks])

    def _hook_unsharded(self) -> None:
        for slot, param in self._find_unsharded():
            hook = functools.partial(self._on_unsharded_grad, slot)
            self._unsharded_hooks.append(param.register_post_accumulate_grad_hook(hook))

    def add_route(self, slot: Slot, route: int, undo: contextlib.ExitStack) -> None:
        """A fused_linear layer that can be armed, until remove()."""
        self.routes[slot] = route
        undo.callback(self.routes.pop, slot)
        undo.callback(fused_linear.disarm, [route])

    def check_idle(self) -> None:
        """Outside any backward: report a backward of ours that raised before its end."""
        # private: the engine's graph task on this thread, -1 outside any backward
        if self.task not in (None, BY_HAND) and torch._C._current_graph_task_id() == -1:
            self._disarm()
            delivered, self.task, self.delivered = self.delivered, None, False
            self.sink.backward_aborted(delivered)

    def _hook_for(self, slot: Slot):
        def hook(p: torch.Tensor) -> None:
            self._on_grad(slot, p)
        return hook

    def _on_forward(self, module, args, output) -> None:
        self.check_idle()
        if self._find_unsharded is not None:
            self._hook_unsharded()
        if torch.is_grad_enabled():
            for t in tree_leaves(output):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:  # a leaf would keep the hook
                    t.register_hook(self._on_backward_start)

    def _on_backward_start(self, grad) -> None:
        # Plain tensor hooks, not register_multi_grad_hook: Dynamo cannot trace that one, and under
        # compiled autograd with fullgraph=True the user would see its error instead of ours.
        if compiled_autograd_active():
            raise RuntimeError(COMPILED_AUTOGRAD)
        self._begin(accumulated=False)

    def _begin(self, accumulated: bool) -> None:
        """Start our backward once: hooks on several devices' threads may get here together."""
        with self._lock:
            if self.task is not None:  # this backward has begun, or one is nested in ours (checkpointing)
                return
            if compiled_autograd_active():
                raise RuntimeError(COMPILED_AUTOGRAD)
            # may refuse: nothing recorded yet
            self.sink.backward_starting(self._will_accumulate, accumulated)
            # private: the id of the engine's graph task on this thread
            self.task, self.delivered = torch._C._current_graph_task_id(), False
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
            self._arm()

    def _arm(self) -> None:
        """Arm the fused layers where the accumulator can say in advance where their grads go."""
        if not self.routes:
            return
        slots = list(self.routes)
        where = self.sink.armed_writes(slots)
        if where is None:
            return
        alpha, betas = where
        routes = list(self.routes.values())
        fused_linear.arm(routes, [s.main for s in slots], betas, alpha, self.task)
        self._armed = dict(zip(routes, slots))

    def _disarm(self, slot: Slot | None = None) -> None:
        """Count the armed grads (of one slot, or all) and disarm: before a grad of that slot comes through
        Python (a second one in this backward), and at the backward's end."""
        if self._armed is None:
            return
        if slot is None:
            armed, self._armed = self._armed, None
        else:
            route = self.routes[slot]
            if route not in self._armed:
                return
            armed = {route: self._armed.pop(route)}
        fired = fused_linear.disarm(list(armed))
        if fired:
            self.sink.armed_written([armed[r] for r in fired])
            self.delivered = True

    def _on_grad(self, slot: Slot, p: torch.Tensor) -> None:
        if p.__dict__.get("grad_added_to_main_grad"):  # its layer added its grad into p.main_grad (TE)
            p.grad_added_to_main_grad = False
            if not p.__dict__.get("zero_out_wgrad"):
                p.grad = None  # a placeholder
            self.fused_grad(slot, None)
        g = p.grad
        if g is None:
            return
        if slot.sharded:  # a DTensor: FSDP2's shard after its reduce-scatter, or a tensor-parallel grad
            g = slot.local_grad(g)
        if self.task is None:  # a backward that did not pass through the model's outputs
            self._begin(accumulated=True)
        if self._armed is not None and slot in self.routes:  # a fused layer's weight, grad through autograd
            self._disarm(slot)
        self.sink.grad_ready(slot, g, _stream(slot))
        self.delivered = True
        p.grad = None

    def _on_unsharded_grad(self, slot: Slot, p: torch.Tensor) -> None:
        """FSDP2's unsharded parameter got its grad, before FSDP reduces it: gacc's where it takes it."""
        g = p.grad
        if g is None:
            return
        if self.task is None:
            self._begin(accumulated=True)
        if self.sink.unsharded_grad(slot, local_placed(g, p)):  # a tp DTensor under FSDP2 x TP
            self.delivered = True
            p.grad = None  # FSDP finds no grad: it reduces nothing

    @contextlib.contextmanager
    def by_hand(self):
        """One micro-step whose grads code outside autograd's accumulation writes into p.grad (a pipeline's
        split weight backward: weight.grad = dw): the start first (which refuses a finished window before
        anything is written), the grads found in p.grad at the end. Hooks that fire inside (a full backward)
        deliver into the same micro-step."""
        self.check_idle()
        if self.task is not None:
            raise RuntimeError("a micro-step by hand cannot run inside a backward")
        self.sink.backward_starting(lambda: True, accumulated=False)
        self.task, self.delivered = BY_HAND, False
        try:
            yield
            for slot in self.slots:
                g = slot.param.grad
                if g is not None:
                    self.sink.grad_ready(slot, slot.local_grad(g) if slot.sharded else g, _stream(slot))
                    self.delivered = True
                    slot.param.grad = None
        except BaseException:
            for slot in self.slots:  # not taken: the window breaks if any grad was written
                if slot.param.grad is not None:
                    slot.param.grad, self.delivered = None, True
            delivered, self.task, self.delivered = self.delivered, None, False
            self.sink.backward_aborted(delivered)
            raise
        delivered, self.task, self.delivered = self.delivered, None, False
        self.sink.backward_done(delivered)

    def fused_grad(self, slot: Slot, write) -> None:
        """A grad that goes straight into the slot, not through p.grad: Events.write_fused."""
        if self.task is None:
            self._begin(accumulated=write is None)
        if self._armed is not None and slot in self.routes:
            self._disarm(slot)
        self.delivered = True
        self.sink.write_fused(slot, write)

    def _on_backward_end(self) -> None:
        self._disarm()
        delivered, self.task, self.delivered = self.delivered, None, False
        self.sink.backward_done(delivered)

    def _will_accumulate(self) -> bool:
        """This backward adds into some parameter's .grad (torch.autograd.grad does not)."""
        if self._nodes is None:
            self._nodes = [torch.autograd.graph.get_gradient_edge(s.param).node for s in self.slots]
        try:  # private: whether the engine's current graph task runs this node
            return any(torch._C._will_engine_execute_node(n) for n in self._nodes)
        except RuntimeError:  # torch.autograd.grad() refuses leaf nodes here, and accumulates into none
            return False
