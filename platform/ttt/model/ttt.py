"""The TTT-E2E inner loop and meta loss (spec §3–§4), to be read next to the spec.

For a batch of sequences (each with its own fast weights):

    hP   = prefix(embed(x))                      once over all T tokens, outer weights
    F_0  = prime weights of the S suffix blocks  (Parameters, expanded per sequence: graph-connected)
    for i in 0 .. T/b − 1:                       mini-batch i = tokens [i·b, (i+1)·b)
        logits_i, caches = suffix(hP_i, caches; F_i) → head
        ℓ_i  = masked mean next-token CE of mini-batch i      ← recorded BEFORE the update (no leak)
        g_i  = ∂ℓ_i/∂F_i  with create_graph=True               ← second order: g_i stays in the graph
        F_{i+1} = F_i − η_in · min(1, c/‖g_i‖) · g_i          ← one global norm per sequence over S blocks
    loss = mean over sequences of mean_i ℓ_i                   ← its gradient flows through every F_i

With `ttt.recompute` = full or selective each mini-batch iteration is recomputed in the outer backward pass
(ttt.model.recompute), double backward included, so that the backward keeps only the carry (fast weights,
KV caches) per mini-batch; `selective` also keeps the outputs of matmuls and attention. Prefix blocks are
recomputed one by one, as in the reference.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttt.config import TTTConfig
from ttt.model.attention import KVCache
from ttt.model.recompute import checkpoint_inner_step, is_partitioned
from ttt.model.transformer import PrimeWeights, Transformer


@dataclass
class SequenceLoss:
    """What one pass over a batch of sequences returns."""

    loss: torch.Tensor
    """Scalar: mean over sequences of the mean over mini-batches of the pre-update losses."""
    chunk_losses: torch.Tensor
    """[B, T/b] masked mean CE of each mini-batch, before that mini-batch's update."""
    token_nll: torch.Tensor
    """[B, T] −log p(target) per position, unmasked, in fp32 (detached)."""
    inner_grad_norms: torch.Tensor | None = None
    """[B, T/b] global norm of each inner gradient before clipping (TTT only, detached)."""
    trajectory: list[list[PrimeWeights]] | None = None
    """Fast weights after each mini-batch's update, per suffix block (detached; only when asked)."""


class MetaLearner(torch.nn.Module):
    """The model and its loss as one module, so that `forward` is the whole meta step's forward.

    DeepSpeed wraps this module. Under ZeRO-3 a parameter is gathered only while a module that owns (or
    has registered) it is in its forward; running the whole inner loop inside this forward, with the tied
    embedding and the prime weights registered here, keeps them gathered wherever the loop uses them.
    """

    def __init__(self, model: Transformer, ttt: TTTConfig):
        super().__init__()
        self.model = model
        self.ttt = ttt

    def external_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters used outside their owner's forward: the tied head and the initial fast weights."""
        return [self.model.embed.weight, *(w for p in self.model.prime_weights() for w in p)]

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        step: int | None = None,
        ttt: TTTConfig | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, SequenceLoss]:
        """`ttt` replaces the module's inner-loop config for this call (e.g. TTT switched off at eval).
        The loss tensor comes first and bare: ZeRO-3 hooks the tensors a forward returns (it does not look
        inside dataclasses) to gather the parameters again before their backward."""
        out = sequence_loss(self.model, inputs, targets, ttt or self.ttt, step=step, **kwargs)
        return out.loss, out


def inner_lr_at(cfg: TTTConfig, step: int | None) -> float:
    """η_in at outer step `step` (0-based): linear from inner_lr_init to inner_lr over the warm-up, using
    (step + 1) / warmup as the reference does. `None` (evaluation) means fully warmed up."""
    if step is None or cfg.inner_lr_warmup_steps == 0:
        return cfg.inner_lr
    frac = min(1.0, (step + 1) / cfg.inner_lr_warmup_steps)
    return cfg.inner_lr_init + (cfg.inner_lr - cfg.inner_lr_init) * frac


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax(fp32 logits)[target], per position: [B, n, V], [B, n] → [B, n]."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.to(acc).flatten(0, 1)
    return F.cross_entropy(flat, targets.flatten(), reduction="none").view(targets.shape)


def masked_mean(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of nll over the unmasked positions of the last axis (a fully masked chunk gives 0)."""
    mask = mask.to(nll.dtype)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1e-10)


def sequence_loss(
    model: Transformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ttt: TTTConfig,
    *,
    step: int | None = None,
    loss_mask: torch.Tensor | None = None,
    first_order: bool = False,
    record_trajectory: bool = False,
) -> SequenceLoss:
    """Loss of `model` on token ids `inputs`/`targets` [B, T], with or without test-time training.

    TTT runs when `ttt.enabled` and the model has suffix blocks; otherwise every block runs once over the
    whole sequence with the prime MLPs static (the no-TTT ablation and the SWA / full-attention baselines).
    Outer gradients flow when autograd is enabled at the call; under `torch.no_grad()` the inner loop still
    takes its gradient steps (evaluation includes TTT) but nothing is kept for an outer backward.

    `step` is the outer step for the inner-lr warm-up (None: warmed up). The default loss mask leaves out
    BOS targets. `first_order=True` stops gradients through the inner gradients: a diagnostic that is NOT
    TTT-E2E (its meta-gradient differs by ~100% on the golden model).
    """
    if inputs.shape != targets.shape or inputs.dim() != 2:
        raise ValueError(
            f"inputs and targets must both be [batch, seq_len], got {inputs.shape} and {targets.shape}"
        )
    chunk = ttt.mini_batch_size
    if inputs.shape[1] % chunk:
        raise ValueError(f"sequence length {inputs.shape[1]} is not divisible by mini_batch_size {chunk}")
    if loss_mask is None:
        loss_mask = targets != model.config.bos_token_id
    recompute = ttt.recompute if torch.is_grad_enabled() else "none"
    if ttt.enabled and model.config.suffix_len > 0:
        return _meta_loss(
            model, inputs, targets, loss_mask, ttt, inner_lr_at(ttt, step), first_order, record_trajectory
        )
    nll = token_nll(model(inputs, recompute=recompute), targets)
    chunk_losses = masked_mean(_chunks(nll, chunk), _chunks(loss_mask, chunk))
    return SequenceLoss(chunk_losses.mean(1).mean(0), chunk_losses, nll.detach())


def _chunks(x: torch.Tensor, size: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1] // size, size, *x.shape[2:])


def _meta_loss(
    model: Transformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    ttt: TTTConfig,
    inner_lr: float,
    first_order: bool,
    record_trajectory: bool,
) -> SequenceLoss:
    outer = torch.is_grad_enabled()
    batch, length = inputs.shape
    size = ttt.mini_batch_size
    recompute = ttt.recompute if outer else "none"
    # Compiled only for training (evaluation and the first-order diagnostic stay eager).
    compiled = ttt.compile and outer and not first_order
    if compiled:
        if is_partitioned(model):
            raise ValueError("ttt.compile is not supported with ZeRO-3 partitioned parameters")
        # Grow the RoPE table here, eagerly: filled inside a trace, its cache would fail the graph's guards
        # on the next step and recompile (the suffix asks for at most W + b positions).
        model.rope(max(length, model.config.window_size + size), inputs.device, model.embed.weight.dtype)
        budget = _BUDGETS[recompute]
        h = _compiled_call(_compiled_prefix, ttt.compile_backend, budget, model, inputs)
    else:
        h = model.run_prefix(inputs, recompute)  # prefix: once, fused attention, first-order only

    # Per-sequence fast weights F_0 = the meta-learned Parameters, expanded (not copied) so that the outer
    # gradient of every later F_i reaches them. Without an outer pass they are fresh leaves instead.
    fast = [
        PrimeWeights(*(w.unsqueeze(0).expand(batch, *w.shape) for w in weights))
        for weights in model.prime_weights()
    ]
    if not outer:
        fast = _detached(fast)
    caches: list[KVCache | None] = [None] * model.config.suffix_len
    if compiled:
        lr = torch.tensor(inner_lr, dtype=fast[0].gate.dtype, device=inputs.device)  # a tensor: no recompile

        def run_step(h, targets, mask, fast, caches):
            # Contiguous caches: a window trimmed from [cache, chunk] is a strided view whose strides change
            # once the window is full, and each new stride would be one more compile.
            caches = [c if c is None else KVCache(c.keys.contiguous(), c.values.contiguous()) for c in caches]
            return _compiled_call(
                _compiled_inner_step,
                ttt.compile_backend,
                budget,
                model,
                lr,
                ttt.inner_clip,
                h,
                targets,
                mask,
                fast,
                caches,
            )
    else:
        step_fn = _InnerStep(
            model, inner_lr, ttt.inner_clip, outer=outer, second_order=outer and not first_order
        )
        partitioned = recompute != "none" and is_partitioned(model)

        def run_step(*args):
            return checkpoint_inner_step(step_fn, *args, recompute=recompute, partitioned=partitioned)

    losses, nlls, norms, trajectory = [], [], [], []
    with torch.enable_grad():  # the inner gradient needs autograd even when evaluating
        for i in range(length // size):
            part = slice(i * size, (i + 1) * size)
            args = (h[:, part], targets[:, part], loss_mask[:, part], fast, caches)
            fast, caches, loss_i, nll_i, norm_i = run_step(*args)
            if not outer:  # cut the graph after each mini-batch: memory stays constant in T
                fast, caches = _detached(fast), [KVCache(c.keys.detach(), c.values.detach()) for c in caches]
                loss_i = loss_i.detach()
            losses.append(loss_i)
            nlls.append(nll_i)
            norms.append(norm_i)
            if record_trajectory:
                trajectory.append([PrimeWeights(*(w.detach().clone() for w in p)) for p in fast])
    chunk_losses = torch.stack(losses, dim=1)
    return SequenceLoss(
        loss=chunk_losses.mean(1).mean(0),
        chunk_losses=chunk_losses,
        token_nll=torch.cat(nlls, dim=1),
        inner_grad_norms=torch.stack(norms, dim=1),
        trajectory=trajectory if record_trajectory else None,
    )


def _detached(fast: list[PrimeWeights]) -> list[PrimeWeights]:
    return [PrimeWeights(*(w.detach().requires_grad_() for w in p)) for p in fast]


class _InnerStep:
    """One mini-batch: suffix forward with F_i, loss before update, clipped SGD step to F_{i+1}.

    A callable object rather than a closure so that it can be recomputed in the backward pass.
    `functional`: take the inner gradient with torch.func.grad instead of torch.autograd.grad (the same
    values); that form can be traced by torch.compile, which then writes the inner backward out as ordinary
    ops that the outer backward differentiates once.
    """

    def __init__(
        self,
        model: Transformer,
        lr: float | torch.Tensor,
        clip: float,
        outer: bool,
        second_order: bool,
        functional: bool = False,
    ):
        self.model = model
        self.lr = lr
        self.clip = clip
        self.outer = outer  # an outer backward follows: keep this chunk's graph
        self.second_order = second_order  # and differentiate through the inner gradient itself
        self.functional = functional

    def __call__(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        fast: list[PrimeWeights],
        caches: list[KVCache | None],
    ):
        flat = [w for weights in fast for w in weights]
        if self.functional:
            grads, (loss, nll, new_caches) = torch.func.grad(self._loss, has_aux=True)(
                flat, h, targets, mask, caches
            )
        else:
            total, (loss, nll, new_caches) = self._loss(flat, h, targets, mask, caches)
            grads = torch.autograd.grad(total, flat, create_graph=self.second_order, retain_graph=self.outer)
            if self.second_order and not all(g.requires_grad for g in grads):
                raise RuntimeError(
                    "inner gradients came back detached, so the meta-gradient would silently be first "
                    "order; is the suffix compiled or run through a kernel without double backward?"
                )
        sq_norm = sum(g.pow(2).sum(dim=tuple(range(1, g.dim()))) for g in grads)  # [B], over all S blocks
        if self.clip > 0:
            # min(1, c/‖g‖) written as c / sqrt(max(‖g‖², c²)): the same value and gradient as the
            # reference's select, and no 0/0 in the backward when a chunk has no unmasked target.
            scale = self.clip * torch.rsqrt(sq_norm.clamp(min=self.clip**2))
            grads = [g * scale.view(-1, *([1] * (g.dim() - 1))) for g in grads]
        updated = [w - self.lr * g for w, g in zip(flat, grads, strict=True)]
        new_fast = [PrimeWeights(*updated[k : k + 3]) for k in range(0, len(updated), 3)]
        return new_fast, new_caches, loss, nll, sq_norm.detach().sqrt()

    def _loss(self, flat, h, targets, mask, caches):
        """Σ over sequences of ℓ_i (what the inner gradient differentiates), and what the step returns."""
        fast = [PrimeWeights(*flat[k : k + 3]) for k in range(0, len(flat), 3)]
        logits, new_caches = self.model.run_suffix_chunk(h, caches, fast)
        nll = token_nll(logits, targets)
        loss = masked_mean(nll, mask)  # [B]: ℓ_i per sequence, with the weights before this update
        # A sum over sequences: each sequence's loss depends only on its own slice of F, so this gives every
        # sequence its own gradient (a batch mean would scale inner gradients by 1/B). Earlier caches and the
        # prefix output are constants here because F_i is the tensor used in this chunk's forward.
        return loss.sum(), (loss, nll.detach(), new_caches)


# -- ttt.compile: the prefix and the inner step under torch.compile ------------------------------------------

_BUDGETS = {"none": 1.0, "selective": 0.0}
"""AOTAutograd's activation memory budget per ttt.recompute: 1 keeps what runs fastest (its min-cut still
recomputes cheap pointwise ops), 0 recomputes everything it can rebuild from the region's inputs."""


def _compiled_prefix(model: Transformer, inputs: torch.Tensor) -> torch.Tensor:
    return model.run_prefix(inputs, "none")  # recomputation is the partitioner's (the budget) here


def _compiled_inner_step(model, lr, clip, h, targets, mask, fast, caches):
    step = _InnerStep(model, lr, clip, outer=True, second_order=True, functional=True)
    return step(h, targets, mask, fast, caches)


def _compiled_call(fn, backend: str, budget: float, *args):
    """`fn(*args)` compiled, with AOTAutograd partitioning its forward and backward under `budget`."""
    import torch._functorch.config as functorch_config  # private but the knob's only home; imported late

    with functorch_config.patch(activation_memory_budget=budget):
        return _compiled(fn, backend, budget)(*args)


@functools.cache
def _compiled(fn, backend: str, budget: float):
    # Dynamo keeps compiled graphs on the function's code object and its guards see neither the backend nor
    # the budget, so each pair gets its own copy of the code (else it would reuse another pair's graphs).
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
    return torch.compile(copy, backend=backend, dynamic=False)
