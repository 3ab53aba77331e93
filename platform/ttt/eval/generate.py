"""Streaming inference: prefill a prompt, then decode token by token with test-time training (spec §10.24).

A `StreamingState` holds, per batch of sequences, what the teacher-forced loop of `ttt.model.ttt` carries
between mini-batches, plus what running one token at a time through every block needs:

    caches[ℓ]      the last ≤ W keys/values of every block ℓ, prefix blocks included (all keys under full
                   attention), so each new token attends to its window as in the full-sequence path
    fast[j]        the current prime-MLP weights F_i of suffix block j (None: no test-time training)
    pending        the tokens of the current mini-batch i and their prefix outputs (the suffix's inputs)
    batch_caches   the suffix blocks' caches as they were when mini-batch i began

Tokens of mini-batch i are predicted with F_i as they arrive. Its inner step needs the targets of all b
positions, and the last target is the first token of mini-batch i+1, so the step is taken when that token
comes in, before it is consumed: `_InnerStep` of the teacher-forced loop reruns the suffix blocks on the
buffered mini-batch from `batch_caches`, which gives F_{i+1} and the caches mini-batch i leaves behind.
Everything runs in the model's dtype (fp32 for checkpoints) and without autograd, except the inner step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ttt.config import JobConfig, ModelConfig, TTTConfig
from ttt.data.tokenizer import ByteTokenizer
from ttt.errors import UserError
from ttt.model.attention import KVCache
from ttt.model.transformer import PrimeWeights, Transformer
from ttt.model.ttt import _InnerStep, inner_lr_at, token_nll

# Tokens per chunk when the prompt runs through blocks that take no inner step: any split gives the same
# result, and this bounds the materialised [chunk, W + chunk] attention of a long prompt.
PREFILL_CHUNK = 1024

TokenIds = torch.Tensor | Sequence[int]


class GenerateError(UserError):
    """A prompt, sampling setting or checkpoint that streaming inference cannot use."""


class PromptTooShortError(GenerateError):
    pass


class CheckpointMismatchError(GenerateError):
    pass


@dataclass
class StreamingState:
    """Where a batch of sequences stands after the tokens consumed so far (see the module docstring)."""

    model: Transformer
    ttt: TTTConfig
    caches: list[KVCache | None]
    """Per block, [B, H, ≤W, d_h] keys and values (post k-norm, pre-RoPE)."""
    fast: list[PrimeWeights] | None
    """Per suffix block, [B, O, I] weights: F_i of the current mini-batch; None without TTT."""
    batch_caches: list[KVCache | None]
    """Per suffix block, its cache when the current mini-batch began (what the inner step attends to)."""
    pending_tokens: torch.Tensor
    """[B, k], k ≤ b: the tokens of the current mini-batch consumed so far (TTT only)."""
    pending_hidden: torch.Tensor
    """[B, k, D]: their prefix-block outputs."""
    position: int = 0
    """Tokens consumed."""
    updates: int = 0
    """Inner steps taken."""

    @property
    def num_prefix(self) -> int:
        return self.model.config.num_layers - self.model.config.suffix_len


def start(model: Transformer, ttt: TTTConfig, batch_size: int = 1) -> StreamingState:
    """The state before any token: empty caches and, with TTT, the meta-learned fast weights F_0."""
    cfg = model.config
    param = model.embed.weight
    fast = None
    if ttt.enabled and cfg.suffix_len > 0:
        fast = [
            PrimeWeights(*(w.detach().unsqueeze(0).expand(batch_size, *w.shape) for w in weights))
            for weights in model.prime_weights()
        ]
    return StreamingState(
        model=model,
        ttt=ttt,
        caches=[None] * cfg.num_layers,
        fast=fast,
        batch_caches=[None] * cfg.suffix_len,
        pending_tokens=torch.empty(batch_size, 0, dtype=torch.long, device=param.device),
        pending_hidden=torch.empty(batch_size, 0, cfg.hidden_size, dtype=param.dtype, device=param.device),
    )


@torch.no_grad()
def prefill(model: Transformer, ttt: TTTConfig, tokens: TokenIds) -> tuple[StreamingState, torch.Tensor]:
    """Consume a prompt [n] or [B, n]: the state after it, and the logits [B, V] for the next token.

    Every full mini-batch whose targets lie in the prompt takes its inner step exactly as in training and
    evaluation; the rest (1..b tokens) is consumed with the current fast weights and no update yet.
    """
    state, logits, _ = _prefill(model, ttt, _token_rows(model, tokens), score=False)
    return state, logits


@torch.no_grad()
def step(state: StreamingState, token: int | torch.Tensor) -> torch.Tensor:
    """Consume one token per sequence (an int, or [B]) and return the logits [B, V] for the next one.

    When it completes the targets of a pending full mini-batch, that mini-batch's inner step comes first,
    so the token itself is processed with the updated fast weights, as in the teacher-forced loop.
    """
    model = state.model
    column = _token_column(state, token)
    if state.fast is not None and state.pending_tokens.shape[1] == state.ttt.mini_batch_size:
        targets = torch.cat((state.pending_tokens[:, 1:], column), dim=1)
        _inner_update(state, state.pending_hidden, targets)
        state.pending_tokens = state.pending_tokens[:, :0]
        state.pending_hidden = state.pending_hidden[:, :0]
    hidden = _prefix_forward(state, model.embed_tokens(column))
    if state.fast is not None:
        state.pending_tokens = torch.cat((state.pending_tokens, column), dim=1)
        state.pending_hidden = torch.cat((state.pending_hidden, hidden), dim=1)
    state.position += 1
    return _suffix_forward(state, hidden)[:, -1]


@torch.no_grad()
def streaming_nll(model: Transformer, ttt: TTTConfig, tokens: TokenIds, prefill_len: int = 0) -> torch.Tensor:
    """−log p(tokens[t+1] | tokens[..t]) for every t < n−1, from `prefill` of the first `prefill_len`
    tokens (0: none) and then `step` token by token: [B, n−1], or [n−1] for a 1-D sequence."""
    rows = _token_rows(model, tokens)
    batch, length = rows.shape
    if not 0 <= prefill_len <= length:
        raise GenerateError(f"prefill_len {prefill_len} is outside the sequence of {length} tokens")
    nlls: list[torch.Tensor] = []
    if prefill_len:
        state, logits, prompt_nll = _prefill(model, ttt, rows[:, :prefill_len], score=True)
        nlls.append(prompt_nll)
    else:
        state, logits = start(model, ttt, batch), None
    for t in range(prefill_len, length):
        if logits is not None:
            nlls.append(token_nll(logits[:, None], rows[:, t : t + 1]))
        if t + 1 < length:  # the last token is only scored
            logits = step(state, rows[:, t])
    nll = torch.cat(nlls, dim=1) if nlls else rows.new_zeros(batch, 0, dtype=torch.float32)
    return nll[0] if torch.as_tensor(tokens).dim() == 1 else nll


@torch.no_grad()
def generate(
    model: Transformer,
    ttt: TTTConfig,
    prompt: TokenIds,
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Continue one prompt by `max_new_tokens` tokens (returned without the prompt): the most likely
    token each time (`greedy`), or a sample at `temperature` from the `top_k` most likely, reproducible
    by `seed`."""
    if max_new_tokens < 0:
        raise GenerateError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise GenerateError(
            f"temperature must be above 0, got {temperature} (greedy decoding takes the argmax)"
        )
    if top_k is not None and top_k < 1:
        raise GenerateError(f"top_k must be at least 1, got {top_k}")
    rows = _token_rows(model, prompt)
    if rows.shape[0] != 1:
        raise GenerateError(f"generate continues one prompt, got a batch of {rows.shape[0]}")
    state, logits = prefill(model, ttt, rows)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    out: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        token = _choose(logits, greedy, temperature, top_k, generator)
        out.append(token)
        if i + 1 < max_new_tokens:  # the last token's logits are never needed
            logits = step(state, token)
    return torch.cat(out).tolist() if out else []  # one copy to the host, not one per token


def _choose(
    logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None, generator: torch.Generator
) -> torch.Tensor:
    """[B, V] → [B] token ids."""
    if greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# -- the pieces prefill and step share -------------------------------------------------------------


def _prefill(
    model: Transformer, ttt: TTTConfig, tokens: torch.Tensor, score: bool
) -> tuple[StreamingState, torch.Tensor, torch.Tensor | None]:
    """State and next-token logits after `tokens` [B, n]; with `score`, also the NLL [B, n−1] of each
    prompt token given those before it."""
    batch, length = tokens.shape
    state = start(model, ttt, batch)
    size = ttt.mini_batch_size
    if length == 0:
        raise GenerateError("the prompt is empty: give at least one token")
    if state.fast is not None and length < size:
        raise PromptTooShortError(
            f"the prompt has {length} tokens, shorter than one mini-batch: this model takes an inner step "
            f"every {size} tokens (ttt.mini_batch_size), so give a prompt of at least {size} tokens"
        )
    chunk = min(size, PREFILL_CHUNK)
    hidden = torch.cat(
        [
            _prefix_forward(state, model.embed_tokens(tokens[:, s : s + chunk]))
            for s in range(0, length, chunk)
        ],
        dim=1,
    )
    nlls = []
    # Mini-batches whose b targets are all in the prompt: the inner loop of training, one step each.
    full = (length - 1) // size if state.fast is not None else 0
    for i in range(full):
        part = slice(i * size, (i + 1) * size)
        nlls.append(_inner_update(state, hidden[:, part], tokens[:, i * size + 1 : (i + 1) * size + 1]))
    rest = full * size
    if state.fast is not None:
        state.pending_tokens, state.pending_hidden = tokens[:, rest:], hidden[:, rest:]
    logits = None
    for s in range(rest, length, chunk):  # at least one token is left: rest ≤ n − 1
        logits = _suffix_forward(state, hidden[:, s : s + chunk])
        if score:
            targets = tokens[:, s + 1 : s + chunk + 1]  # one short at the prompt's end
            nlls.append(token_nll(logits[:, : targets.shape[1]], targets))
    assert logits is not None
    state.position = length
    return state, logits[:, -1], torch.cat(nlls, dim=1) if score else None


def _prefix_forward(state: StreamingState, x: torch.Tensor) -> torch.Tensor:
    """Embedded tokens [B, c, D] through the prefix blocks, appending to their caches."""
    model = state.model
    for i, block in enumerate(model.prefix_layers):
        x, state.caches[i] = block.forward_chunk(x, state.caches[i], model.rope, model.window)
    return x


def _suffix_forward(state: StreamingState, hidden: torch.Tensor) -> torch.Tensor:
    """Prefix outputs [B, c, D] through the suffix blocks with the current fast weights: logits [B, c, V]."""
    first = state.num_prefix
    logits, state.caches[first:] = state.model.run_suffix_chunk(hidden, state.caches[first:], state.fast)
    return logits


def _inner_update(state: StreamingState, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The inner step on one mini-batch (prefix outputs [B, b, D], targets [B, b]) from the caches at its
    start: F_i → F_{i+1}, and the suffix caches it leaves. Returns its pre-update NLL [B, b]."""
    model, ttt = state.model, state.ttt
    assert state.fast is not None
    inner_step = _InnerStep(model, inner_lr_at(ttt, None), ttt.inner_clip, outer=False, second_order=False)
    mask = targets != model.config.bos_token_id  # the same loss mask as training and evaluation
    fast = [PrimeWeights(*(w.detach().requires_grad_() for w in weights)) for weights in state.fast]
    with torch.enable_grad():
        new_fast, new_caches, _, nll, _ = inner_step(hidden, targets, mask, fast, state.batch_caches)
    state.fast = [PrimeWeights(*(w.detach() for w in weights)) for weights in new_fast]
    caches = [KVCache(c.keys.detach(), c.values.detach()) for c in new_caches]
    state.caches[state.num_prefix :] = caches
    state.batch_caches = list(caches)
    state.updates += 1
    return nll


def _token_rows(model: Transformer, tokens: TokenIds) -> torch.Tensor:
    rows = torch.as_tensor(tokens, dtype=torch.long, device=model.embed.weight.device)
    if rows.dim() == 1:
        rows = rows[None]
    if rows.dim() != 2:
        raise GenerateError(f"token ids must be [n] or [batch, n], got shape {tuple(rows.shape)}")
    _check_vocabulary(model.config, rows)
    return rows


def _token_column(state: StreamingState, token: int | torch.Tensor) -> torch.Tensor:
    batch = state.pending_tokens.shape[0]
    device = state.pending_tokens.device
    column = torch.as_tensor(token, dtype=torch.long, device=device).reshape(-1, 1)
    if column.shape[0] == 1 and batch > 1:
        column = column.expand(batch, 1)
    if column.shape[0] != batch:
        raise GenerateError(f"step takes one token per sequence ({batch}), got {column.shape[0]}")
    _check_vocabulary(state.model.config, column)
    return column


def _check_vocabulary(cfg: ModelConfig, ids: torch.Tensor) -> None:
    if not ids.numel():
        return
    low, high = torch.stack(ids.aminmax()).tolist()  # one device sync per call: this runs for every token
    if low < 0 or high >= cfg.vocab_size:
        bad = high if high >= cfg.vocab_size else low
        raise GenerateError(f"token id {bad} is outside the model's vocabulary of {cfg.vocab_size}")


# -- checkpoints and text ---------------------------------------------------------------------------


def load_model(checkpoint: str, device: str = "auto") -> tuple[Transformer, JobConfig]:
    """The fp32 model of a checkpoint (file or run directory, local or s3://) and its job config."""
    model, job, _ = load_checkpoint_model(checkpoint, device)
    return model, job


def load_checkpoint_model(
    checkpoint: str, device: str = "auto", overrides: Sequence[str] = ()
) -> tuple[Transformer, JobConfig, int]:
    """The fp32 model of a checkpoint on `device`, its job config (with `overrides`) and its step; weights
    that do not fit the config are one clear error."""
    from ttt.train.checkpoint import checkpoint_job, load_checkpoint
    from ttt.train.device import resolve_device

    payload = load_checkpoint(checkpoint)
    job = checkpoint_job(payload, overrides)
    model = Transformer(job.model)
    check_weights_fit(model, payload["model"], checkpoint)
    model.load_state_dict(payload["model"])
    return model.float().to(resolve_device(device)).eval(), job, payload["state"]["step"]


def check_weights_fit(model: Transformer, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """One line naming the architecture the weights have and the one their config describes, instead of
    load_state_dict's list of every mismatched tensor."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected == found:
        return
    cfg = model.config
    config = (
        f"num_layers={cfg.num_layers} suffix_len={cfg.suffix_len} vocab_size={cfg.vocab_size} "
        f"hidden_size={cfg.hidden_size} intermediate_size={cfg.intermediate_size}"
    )
    raise CheckpointMismatchError(
        f"checkpoint {where}: its weights ({_describe_weights(found)}) do not fit the model its config "
        f"describes ({config}); use a checkpoint whose config matches its weights"
    )


def _describe_weights(shapes: Mapping[str, tuple[int, ...]]) -> str:
    layers = {int(n.split(".")[1]) for n in shapes if n.startswith("layers.") and n.split(".")[1].isdigit()}
    prime = sum(1 for n in shapes if n.endswith(".prime_gate"))
    vocab, hidden = shapes.get("embed.weight", ("?", "?"))[:2]
    mlp = shapes.get("layers.0.mlp.gate_proj.weight", ("?",))[0]
    return (
        f"num_layers={len(layers)} suffix_len={prime} vocab_size={vocab} "
        f"hidden_size={hidden} intermediate_size={mlp}"
    )


def byte_tokenizer_for(job: JobConfig) -> ByteTokenizer:
    """The byte tokenizer, if the checkpoint's model was trained on byte-level data (the bundled corpus or
    `ttt data prepare --tokenizer byte`): its vocabulary and BOS id must be the tokenizer's."""
    tokenizer = ByteTokenizer()
    cfg = job.model
    if (cfg.vocab_size, cfg.bos_token_id) != (tokenizer.vocab_size, tokenizer.bos_token_id):
        raise GenerateError(
            f"this model's vocabulary ({cfg.vocab_size} tokens, BOS {cfg.bos_token_id}) is not the byte "
            f"tokenizer's ({tokenizer.vocab_size}, BOS {tokenizer.bos_token_id}); `ttt generate` reads and "
            "writes text for byte-level models only (data bundled:stdlib or prepared with --tokenizer byte)"
        )
    return tokenizer
