"""The official JAX implementation's parameter layout and config names (spec §2.7, §8), both directions.

Official trees stack all L blocks on a leading axis (`h.blocks.*`), keep the S prime MLPs and their norms
in `h.prime_storage.*` (index j belongs to block L−S+j), and store linears as [in, out]. Keys may use "."
or "/" as separators (golden npz files use ".", Orbax trees "/"), and may carry a `param/`-style prefix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ttt.config import ConfigError, JobConfig, ModelConfig, OptimConfig, TrainConfig, TTTConfig
from ttt.model.transformer import Transformer

ROOT = "language_model.model."

# official stacked name (under ROOT + "h.blocks.") → our name under layers.{l}, and whether it is a linear.
_BLOCK = {
    "seq_norm.weight": ("attn_pre_norm.weight", False),
    "seq_post_norm.weight": ("attn_post_norm.weight", False),
    "ffn_norm.weight": ("mlp_pre_norm.weight", False),
    "ffn_post_norm.weight": ("mlp_post_norm.weight", False),
    "seq_modeling_block.wq.weight": ("attn.q_proj.weight", True),
    "seq_modeling_block.wk.weight": ("attn.k_proj.weight", True),
    "seq_modeling_block.wv.weight": ("attn.v_proj.weight", True),
    "seq_modeling_block.wo.weight": ("attn.o_proj.weight", True),
    "seq_modeling_block.q_norm.weight": ("attn.q_norm.weight", False),
    "seq_modeling_block.k_norm.weight": ("attn.k_norm.weight", False),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", True),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", True),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", True),
}
# official stacked name (under ROOT + "h.prime_storage.") → our name under layers.{L−S+j}.
_PRIME = {
    "ffn_prime_norm.weight": ("prime_pre_norm.weight", False),
    "ffn_prime_post_norm.weight": ("prime_post_norm.weight", False),
    "feed_forward_prime.w1.weight": ("prime_gate", True),
    "feed_forward_prime.w3.weight": ("prime_up", True),
    "feed_forward_prime.w2.weight": ("prime_down", True),
}
_TOP = {"wte.weight": "embed.weight", "ln_f.weight": "final_norm.weight"}


def _stacked(cfg: ModelConfig):
    """(official stacked name, our per-layer name pattern, is linear, stack size) for every stacked tensor."""
    first_suffix = cfg.num_layers - cfg.suffix_len
    for groups, base, count, offset in (
        (_BLOCK, "h.blocks.", cfg.num_layers, 0),
        (_PRIME, "h.prime_storage.", cfg.suffix_len, first_suffix),
    ):
        if count:
            for theirs, (ours, linear) in groups.items():
                yield ROOT + base + theirs, [f"layers.{offset + i}.{ours}" for i in range(count)], linear


def normalize_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flat {official dotted name: array} from keys with "/" or "." and an optional prefix to strip."""
    out = {}
    prefix = prefix.replace("/", ".")
    for key, value in tree.items():
        name = key.replace("/", ".")
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix) :]
        if value is not None:
            out[name] = np.asarray(value)
    return out


def official_names(cfg: ModelConfig) -> list[str]:
    return [ROOT + k for k in _TOP] + [theirs for theirs, _, _ in _stacked(cfg)]


def to_state_dict(tree: Mapping[str, Any], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Official parameters → a state dict for `Transformer(cfg)` (fp32, linears transposed to [out, in])."""
    tree = normalize_keys(tree)
    expected = set(official_names(cfg))
    missing, unexpected = sorted(expected - tree.keys()), sorted(tree.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"official parameters do not fit the config: missing {missing}, unexpected {unexpected}"
        )
    first_suffix = cfg.num_layers - cfg.suffix_len
    state: dict[str, torch.Tensor] = {ours: _tensor(tree[ROOT + theirs]) for theirs, ours in _TOP.items()}
    for groups, base, count, offset in (
        (_BLOCK, "h.blocks.", cfg.num_layers, 0),
        (_PRIME, "h.prime_storage.", cfg.suffix_len, first_suffix),
    ):
        for theirs, (ours, linear) in groups.items():
            stacked = tree[ROOT + base + theirs]
            if stacked.shape[0] != count:
                raise ValueError(
                    f"{base}{theirs}: {stacked.shape[0]} stacked entries, the config has {count}"
                )
            for index in range(count):
                value = stacked[index].T if linear else stacked[index]
                state[f"layers.{offset + index}.{ours}"] = _tensor(value)
    return state


def from_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our state dict (or a dict of per-parameter gradients) → official stacked, [in, out] arrays."""

    def array(name: str, linear: bool) -> np.ndarray:
        value = state[name].detach().to(torch.float32).cpu().numpy()
        return value.T if linear else value

    out = {ROOT + theirs: array(ours, False) for theirs, ours in _TOP.items()}
    for theirs, ours, linear in _stacked(cfg):
        out[theirs] = np.stack([array(name, linear) for name in ours])
    return out


def load_into(model: Transformer, tree: Mapping[str, Any]) -> None:
    """Copy official parameters into `model` (all of them: strict)."""
    model.load_state_dict(to_state_dict(tree, model.config), strict=True)


def official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official dotted name → shape, for every tensor of a model of `cfg` (spec §8's table), from the config
    alone: building even a meta-device model costs seconds, and checking a checkpoint should not."""
    d, i, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_block = {  # per block, official layout (linears [in, out]); anything else is [D, D] or [D]
        "seq_modeling_block.q_norm.weight": (h,),
        "seq_modeling_block.k_norm.weight": (h,),
        **{
            f"{mlp}.{w}.weight": (d, i)
            for mlp in ("feed_forward", "feed_forward_prime")
            for w in ("w1", "w3")
        },
        **{f"{mlp}.w2.weight": (i, d) for mlp in ("feed_forward", "feed_forward_prime")},
    }
    shapes = {ROOT + "wte.weight": (cfg.vocab_size, d), ROOT + "ln_f.weight": (d,)}
    for theirs, names, linear in _stacked(cfg):
        leaf = theirs.removeprefix(ROOT + "h.").split(".", 1)[1]
        shapes[theirs] = (len(names), *per_block.get(leaf, (d, d) if linear else (d,)))
    return shapes


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The ModelConfig sizes that an official tree's shapes (official dotted names) imply, those it shows."""

    def dim(name: str, axis: int) -> int | None:
        shape = shapes.get(ROOT + name)
        return int(shape[axis]) if shape is not None and len(shape) > axis else None

    found = {
        "num_layers": dim("h.blocks.seq_norm.weight", 0),
        # A full-attention baseline stores no prime_storage at all.
        "suffix_len": dim("h.prime_storage.ffn_prime_norm.weight", 0) or 0,
        "vocab_size": dim("wte.weight", 0),
        "hidden_size": dim("wte.weight", 1),
        "intermediate_size": dim("h.blocks.feed_forward.w1.weight", 2),
    }
    head_dim = dim("h.blocks.seq_modeling_block.q_norm.weight", 1)
    if head_dim and found["hidden_size"]:
        found["num_heads"] = found["hidden_size"] // head_dim  # QK-norm gains are per head dimension
    return {key: value for key, value in found.items() if value is not None}


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


_ATTENTION = {"SWA": "swa", "SWAFull": "swa", "self_attention": "full"}


def config_from_official(official: Mapping[str, Any] | str) -> tuple[JobConfig, int | None]:
    """Our JobConfig from the official config (its `model` and `training` sections, official field names),
    and the outer step index if the dump records one (it sets the inner learning rate)."""
    if isinstance(official, str):
        official = json.loads(official)
    model, training = official.get("model", {}), official.get("training", {})
    try:
        mode = training.get("train_mode", "meta")
        kind = model.get("seq_modeling_block", "self_attention")
        if kind not in _ATTENTION:
            raise ConfigError("model.seq_modeling_block", f"'{kind}' is not one of {sorted(_ATTENTION)}")
        attention = _ATTENTION[kind]
        suffix_len = int(model.get("suffix_len", 0)) if model.get("prime", False) else 0
        inner = training.get("optimizer_inner", {})
        seq_len = int(training.get("seq_length", model["seq_len"]))
        job = JobConfig(
            model=ModelConfig(
                vocab_size=int(model["vocab_size"]),
                hidden_size=int(model["hidden_size"]),
                intermediate_size=int(model["intermediate_size"]),
                num_layers=int(model["num_hidden_layers"]),
                num_heads=int(model["num_attention_heads"]),
                suffix_len=suffix_len,
                attention=attention,
                window_size=int(model.get("sliding_window_size", seq_len)),
                rope_theta=float(model["rope_theta"]),
                rms_norm_eps=float(model["rms_norm_eps"]),
                init_std=float(model.get("initializer_range", 0.02)),
                bos_token_id=int(model["bos_token_id"]),
            ),
            ttt=TTTConfig(
                enabled=mode == "meta" and suffix_len > 0,
                mini_batch_size=int(model["mini_batch_size"]),
                inner_lr=float(inner.get("lr", 1.0)),
                inner_lr_init=float(training.get("ilr_init", 1.0)),
                inner_lr_warmup_steps=int(training.get("ilr_warmup_steps", 0)),
                inner_clip=float(inner.get("clip_gradient", 0.0)),
            ),
            optim=OptimConfig(warmup_steps=0),
            train=TrainConfig(seq_len=seq_len, global_batch_size=1, total_steps=1),
        )
    except KeyError as exc:
        raise ConfigError(f"model.{exc.args[0]}", "missing from the official config") from None
    step = official.get("outer_step_index")
    return job, None if step is None else int(step)
