"""Activation recomputation for the meta step (`ttt.recompute`): none, selective or full.

Two kinds of region are recomputed in the outer backward pass:

* a prefix block (or any block of a model without TTT), differentiated once: PyTorch's non-reentrant
  `torch.utils.checkpoint`, with selective activation checkpointing (SAC) for `selective`;
* an inner mini-batch step, whose forward itself calls `torch.autograd.grad(create_graph=True)` on the
  region's own graph: `checkpoint_inner_step` below.

Why the inner step has its own checkpoint. Under `torch.utils.checkpoint` every tensor the region saves
for backward is packed as a placeholder as soon as it is saved, so the inner gradient, taken inside the
region's forward, already finds placeholders and recomputes the suffix forward once more during the
forward pass (measured: 2 calls of the step per mini-batch in the forward, 3 with the backward). SAC
cannot be used there at all: its cache of saved op outputs is read once per region, and that in-forward
recomputation reads it, so the outer backward fails with "Trying to backward an extra time". Here the
saved tensors stay real while the region's forward runs (the inner gradient uses them as they are) and
are dropped when it returns; the outer backward then runs the region once more, under SAC's replay for
`selective` (matmul and attention outputs come from the cache, the cheap ops are recomputed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

Recompute = Literal["none", "selective", "full"]

_aten = torch.ops.aten
# The ops worth keeping: every matmul (F.linear and torch.matmul reach these) and fused attention.
# Everything else (norms, RoPE, SiLU, softmax, cross-entropy, casts, views) is recomputed.
SAVED_OPS = frozenset(
    op
    for op in (
        _aten.mm,
        _aten.bmm,
        _aten.addmm,
        _aten.baddbmm,
        _aten._scaled_dot_product_flash_attention,
        _aten._scaled_dot_product_flash_attention_for_cpu,
        _aten._scaled_dot_product_efficient_attention,
        getattr(_aten, "_scaled_dot_product_cudnn_attention", None),
        getattr(_aten, "_scaled_dot_product_fused_attention_overrideable", None),
        _aten._flash_attention_forward,
        _aten._efficient_attention_forward,
    )
    if op is not None
)


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """SAC policy: keep the outputs of matmuls and fused attention, recompute the rest."""
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_contexts():
    return create_selective_checkpoint_contexts(save_matmuls)


def checkpoint_block(fn: Callable[..., Any], *args: Any, recompute: Recompute) -> Any:
    """`fn(*args)`, a region differentiated once (a block), with its activations recomputed."""
    if recompute == "none":
        return fn(*args)
    context_fn = _sac_contexts if recompute == "selective" else _no_contexts
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context_fn)


def _no_contexts():
    return contextlib.nullcontext(), contextlib.nullcontext()


def checkpoint_inner_step(
    fn: Callable[..., Any], *args: Any, recompute: Recompute, partitioned: bool = False
) -> Any:
    """`fn(*args)`, whose forward may differentiate its own graph, recomputed once in the outer backward.

    `partitioned`: the parameters are ZeRO-3 partitions (see `is_partitioned`); the region then falls back
    to PyTorch's checkpoint, which recomputes everything (`selective` included) and once more in the
    forward. `fn` must be deterministic (no dropout) and its inputs must not be modified in place
    afterwards: the recomputation reruns it on the same input tensors and takes the tensors saved in the
    same order.
    """
    if recompute == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if partitioned:
        # ZeRO-3 gathers and releases parameters in module hooks and counts each module's pending
        # backward passes; a rerun of the region inside the outer backward, as below, unbalances those
        # counts and a parameter is released before its gradient arrives. PyTorch's checkpoint (which
        # DeepSpeed's hooks are written against) works there, at the cost of a third run of the region.
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    record, replay = _sac_contexts() if recompute == "selective" else _no_contexts()
    frame = _Frame(fn, args, replay, _autocast_state())
    with contextlib.ExitStack() as stack:
        for kwargs in frame.autocast:
            stack.enter_context(torch.autocast(**kwargs))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack))
        stack.enter_context(record)
        try:
            out = fn(*args)
        finally:
            # The forward is done: from here on a saved tensor is recomputed when needed. (Also when it
            # raised: the live list refers to outputs whose nodes refer back to this frame.)
            frame.live = None
    return out


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned the module's parameters (it tags each with a `ds_id`)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


def _autocast_state() -> list[dict[str, Any]]:
    """torch.autocast arguments that restore the current autocast state of CPU and the accelerator.

    Both passes of a region run without autocast's cast cache: with it the forward would reuse casts of
    weights made before the region and the recomputation would redo them, and SAC replays ops by count."""
    devices = ["cpu"]
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None and torch.amp.is_autocast_available(accelerator.type):
        devices.append(accelerator.type)
    return [
        {
            "device_type": device,
            "enabled": torch.is_autocast_enabled(device),
            "dtype": torch.get_autocast_dtype(device),
            "cache_enabled": False,
        }
        for device in devices
    ]


class _Frame:
    """The saved tensors of one region: real while its forward runs, recomputed once afterwards."""

    def __init__(self, fn: Callable[..., Any], args: tuple, replay, autocast: list[dict[str, Any]]):
        self.fn = fn
        self.args = args
        self.replay = replay
        self.autocast = autocast  # the forward's autocast state, which the recomputation runs under
        self.live: list[torch.Tensor] | None = []  # saved during the forward, in order
        self.count = 0
        self.recomputed: list[torch.Tensor] | None = None

    def pack(self, tensor: torch.Tensor) -> tuple[_Frame, int]:
        index = self.count
        self.count += 1
        self.live.append(tensor)
        return self, index

    @staticmethod
    def unpack(packed: tuple[_Frame, int]) -> torch.Tensor:
        frame, index = packed
        if frame.live is not None:
            return frame.live[index]
        if frame.recomputed is None:
            frame._recompute()
        return frame.recomputed[index]

    def _recompute(self) -> None:
        tensors: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor) -> int:
            tensors.append(tensor)
            return len(tensors) - 1

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for kwargs in self.autocast:
                stack.enter_context(torch.autocast(**kwargs))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, tensors.__getitem__))
            stack.enter_context(self.replay)
            self.fn(*self.args)
        if len(tensors) != self.count:
            raise RuntimeError(
                f"recomputing an inner step saved {len(tensors)} tensors, its forward saved {self.count}: "
                "the step must run the same ops both times (no data-dependent control flow or randomness)"
            )
        # Only the values are needed: detached, they do not keep the recomputed graph alive, and clearing
        # the list breaks the cycle list → tensor → its node's saved tensor → unpack hook → list.
        self.recomputed = [t.detach() for t in tensors]
        tensors.clear()
        self.fn = self.args = None  # what the recomputation needed is no longer needed


__all__ = [
    "SAVED_OPS",
    "Recompute",
    "checkpoint_block",
    "checkpoint_inner_step",
    "is_partitioned",
    "save_matmuls",
]
