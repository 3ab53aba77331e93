"""Numerical parity against a reference dump from the official implementation (golden-file format).

The dump holds the official parameters (`param/…`), the tokens, the official config (`config_json`) and
reference outputs. We load the parameters, run this implementation in fp32 on the same tokens, and report
the worst error per quantity. Losses, token NLL, inner-gradient norms and the fast-weight trajectory are
compared in absolute terms; gradients relative to the size of each tensor (max|ours − ref| / max|ref|,
worst over tensors), so that near-zero entries do not dominate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttt.model import official
from ttt.model.transformer import Transformer
from ttt.model.ttt import SequenceLoss, inner_lr_at, sequence_loss

ABS_TOLERANCE = 1e-5
GRAD_REL_TOLERANCE = 1e-4
# reference key → (which of our runs, how to read our value). `meta/*` and `trace_seq0/*` come from the
# TTT run, `nottt/*` from the same weights with the prime MLPs static.
_PRIME_ORDER = {"w1": 0, "w3": 1, "w2": 2}  # official w1/w3/w2 → PrimeWeights gate/up/down


def _trajectory(name: str) -> Callable[[SequenceLoss], np.ndarray]:
    index = _PRIME_ORDER[name]

    def read(out: SequenceLoss) -> np.ndarray:
        # [chunks, S, in, out] for sequence 0, like the reference (official linears are [in, out])
        return np.stack(
            [np.stack([blocks[index][0].T.cpu().numpy() for blocks in step]) for step in out.trajectory]
        )

    return read


_ABS_CHECKS: dict[str, tuple[str, Callable[[SequenceLoss], np.ndarray]]] = {
    "nottt/loss_per_chunk": ("nottt", lambda o: _np(o.chunk_losses)),
    "nottt/token_nll": ("nottt", lambda o: _np(o.token_nll)),
    "meta/loss_batch_mean": ("meta", lambda o: _np(o.loss)),
    "meta/loss_per_seq": ("meta", lambda o: _np(o.chunk_losses.mean(1))),
    "meta/loss_per_chunk": ("meta", lambda o: _np(o.chunk_losses)),
    "meta/token_nll": ("meta", lambda o: _np(o.token_nll)),
    "trace_seq0/chunk_loss": ("meta", lambda o: _np(o.chunk_losses[0])),
    "trace_seq0/inner_grad_norm_preclip": ("meta", lambda o: _np(o.inner_grad_norms[0])),
    **{f"trace_seq0/prime_{w}_after_chunk": ("meta", _trajectory(w)) for w in _PRIME_ORDER},
}


def _abs_check(ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} does not match the reference {ref.shape}")
    diff = np.abs(ours.astype(np.float64) - ref)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    worst = float(diff.max())
    return {
        "max_abs": worst,
        "max_rel": float(rel.max()),
        "on": "abs",
        "tolerance": ABS_TOLERANCE,
        "ok": bool(worst <= ABS_TOLERANCE),
    }


def _grad_check(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    worst_rel, worst_abs, worst_name = 0.0, 0.0, ""
    for name, expected in ref.items():
        diff = np.abs(ours[name].astype(np.float64) - expected)
        rel = float(diff.max() / max(np.abs(expected).max(), 1e-30))
        worst_abs = max(worst_abs, float(diff.max()))
        if rel >= worst_rel:
            worst_rel, worst_name = rel, name
    return {
        "max_abs": worst_abs,
        "max_rel": worst_rel,
        "worst_tensor": worst_name,
        "on": "rel",
        "tolerance": GRAD_REL_TOLERANCE,
        "ok": bool(worst_rel <= GRAD_REL_TOLERANCE),
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def run_parity(path: str | Path, *, device: str = "cpu", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compare this implementation with a reference dump; `report["ok"]` says whether all checks pass.
    `device` and `overrides` (e.g. model.chunk_kernel=triton) check other kernels against the same
    reference; the computation stays fp32 (no autocast)."""
    path = Path(path)
    try:
        dump = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as an .npz reference dump: {exc}") from None
    for key in ("config_json", "tokens"):
        if key not in dump.files:
            raise ValueError(
                f"{path} has no '{key}' entry; is it a reference dump in the golden-file format?"
            )
    entries = {k: dump[k] for k in dump.files}  # each access decompresses: read every entry once
    job, step = official.config_from_official(str(entries["config_json"]))
    job = job.with_overrides(overrides)
    torch.manual_seed(0)
    model = Transformer(job.model)
    official.load_into(model, official.normalize_keys(entries, "param/"))
    model.to(device)
    tokens = torch.from_numpy(entries["tokens"].astype(np.int64)).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if inputs.shape[1] != job.train.seq_len:
        raise ValueError(
            f"tokens hold {inputs.shape[1]} positions, the config says seq_length {job.train.seq_len}"
        )

    runs: dict[str, SequenceLoss] = {}
    with torch.no_grad():
        runs["nottt"] = sequence_loss(model, inputs, targets, dataclasses.replace(job.ttt, enabled=False))
    meta = sequence_loss(model, inputs, targets, job.ttt, step=step, record_trajectory=True)
    model.zero_grad(set_to_none=True)
    meta.loss.backward()
    runs["meta"] = meta
    grads = official.from_state_dict({n: p.grad.cpu() for n, p in model.named_parameters()}, job.model)

    checks: dict[str, Any] = {}
    for key, (run, read) in _ABS_CHECKS.items():
        if key in entries and (run != "meta" or job.ttt.enabled):
            checks[key] = _abs_check(read(runs[run]), entries[key])
    reference_grads = official.normalize_keys(entries, "grad/")
    if reference_grads:
        checks["grad"] = _grad_check(grads, reference_grads)
    diagnostics = {}
    first_order = official.normalize_keys(entries, "grad_first_order/")
    if first_order:
        # Close to this and far from `grad` would mean the second-order terms are missing.
        diagnostics["grad_rel_distance_to_first_order_reference"] = _grad_check(grads, first_order)["max_rel"]
    return {
        "file": str(path),
        "device": device,
        "overrides": list(overrides),
        "inner_lr": inner_lr_at(job.ttt, step),
        "checks": checks,
        "diagnostics": diagnostics,
        "ok": bool(checks) and all(c["ok"] for c in checks.values()),
    }
