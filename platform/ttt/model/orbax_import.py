"""Import a checkpoint the official JAX code wrote (Orbax, spec §8) as a checkpoint of this project.

The official `CheckpointManager` writes `<root>/<step>/model_weights/` (a PyTree checkpoint, OCDBT) next to
`opt_state/`. Any of the three levels can be given. The tree's metadata is checked against the model config
before any array is read, so a wrong config fails in a second with the tensor and both shapes, even for a
multi-gigabyte checkpoint. The conversion itself is `ttt.model.official`. orbax-checkpoint is an optional
dependency (`pip install 'ttt-platform[official]'`), imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttt.config import JobConfig, ModelConfig
from ttt.errors import UserError
from ttt.model import official

WEIGHTS = "model_weights"
INSTALL_HINT = "pip install 'ttt-platform[official]'"
# Files a PyTree checkpoint folder has (`_METADATA`: the tree; `manifest.ocdbt`: the OCDBT store).
_MARKERS = ("_METADATA", "manifest.ocdbt")


class OfficialImportError(UserError):
    """An official checkpoint that cannot be found, read, or loaded into the given config."""


@dataclass(frozen=True)
class OfficialWeights:
    state: dict[str, torch.Tensor]
    """State dict for `Transformer(cfg)`, fp32."""
    step: int | None
    """The official step folder's number (None when the weights folder has no numeric parent)."""
    source: Path
    """The `model_weights` folder read."""


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as exc:
        raise OfficialImportError(
            f"reading official Orbax checkpoints needs orbax-checkpoint ({exc}): {INSTALL_HINT}"
        ) from None
    return ocp


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax warns (through absl) that an item folder has no `_CHECKPOINT_METADATA`, which is normal for a
    manager's `model_weights/` (the step folder holds it), and on other harmless fallbacks: errors only."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def find_weights(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """The `model_weights` folder under a manager root (the newest numeric step, or `step`), a step
    folder, or that folder itself; and its step number."""
    path = Path(path)
    if not path.is_dir():
        raise OfficialImportError(f"{path} is not a folder (expected an official Orbax checkpoint)")
    if _is_pytree(path / WEIGHTS):  # a step folder
        found = _step_of(path)
        if step is not None and found is not None and step != found:
            raise OfficialImportError(f"{path} is step {found}, not --step {step}")
        return path / WEIGHTS, found
    steps = sorted(
        int(child.name)
        for child in path.iterdir()
        if child.name.isdigit() and _is_pytree(child / WEIGHTS)  # skips Orbax's unfinished `N.orbax-...-tmp`
    )
    if steps:  # a manager root
        if step is None:
            return path / str(steps[-1]) / WEIGHTS, steps[-1]
        if step not in steps:
            raise OfficialImportError(f"{path} has no step {step}; its steps are {steps}")
        return path / str(step) / WEIGHTS, step
    if _is_pytree(path):  # the weights folder itself
        if step is not None:
            raise OfficialImportError(
                f"--step applies to a checkpoint root with step folders, {path} is one step"
            )
        return path, _step_of(path.parent)
    raise OfficialImportError(
        f"{path} is not an official Orbax checkpoint: expected a folder with step folders <step>/{WEIGHTS}/, "
        f"a step folder with {WEIGHTS}/, or a {WEIGHTS} folder (holding {' and '.join(_MARKERS)})"
    )


def _is_pytree(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _MARKERS)


def _step_of(folder: Path) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None


def _metadata(weights: Path) -> Mapping[str, Any]:
    """The saved tree with an ArrayMetadata (shape, dtype) at every array."""
    ocp = _orbax()
    try:
        with _quiet_orbax():
            metadata = ocp.PyTreeCheckpointer().metadata(weights).item_metadata
    except Exception as exc:  # orbax and tensorstore raise many types; any of them means "unreadable"
        raise OfficialImportError(
            f"cannot read {weights} as an Orbax checkpoint: {_first_line(exc)}"
        ) from None
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, Mapping):
        # Orbax logs, and returns None, when `_METADATA` is unreadable.
        raise OfficialImportError(f"cannot read {weights} as an Orbax checkpoint: no readable tree metadata")
    return tree


def _shapes(tree: Mapping[str, Any], weights: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, meta in _flatten(tree).items():
        if not hasattr(meta, "shape"):
            raise OfficialImportError(f"{weights}: {_slash(name)} is not an array ({type(meta).__name__})")
        shapes[name] = tuple(int(n) for n in meta.shape)
    return shapes


def check_fits(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
    """Raise a one-line error unless the official tensors `shapes` are exactly those of a model of `cfg`."""
    found = official.infer_architecture(shapes)
    sizes = ", ".join(f"{key}={value}" for key, value in found.items())
    hint = f"the checkpoint's sizes are {sizes}; pick a preset or --set model.* to match"
    layers, suffix = found.get("num_layers"), found.get("suffix_len", 0)
    if layers is not None and (layers, suffix) != (cfg.num_layers, cfg.suffix_len):
        raise OfficialImportError(
            f"{where} has {layers} blocks, {suffix} of them with a prime MLP; the config has "
            f"num_layers={cfg.num_layers}, suffix_len={cfg.suffix_len} ({hint})"
        )
    expected = official.official_shapes(cfg)
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise OfficialImportError(
            f"{where} does not hold the tensors of this architecture: "
            f"missing {[_slash(n) for n in missing]}, unexpected {[_slash(n) for n in unexpected]}"
        )
    wrong = [name for name in expected if shapes[name] != expected[name]]
    if wrong:
        name = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise OfficialImportError(
            f"{where}: tensor {_slash(name)} has shape {shapes[name]}, the config expects "
            f"{expected[name]}{more}; {hint}"
        )


def load_official(path: str | Path, cfg: ModelConfig, step: int | None = None) -> OfficialWeights:
    """The weights of an official Orbax checkpoint (root, step folder or model_weights folder), checked
    against `cfg` and converted to a state dict of `Transformer(cfg)`."""
    weights, found_step = find_weights(path, step)
    tree = _metadata(weights)
    check_fits(_shapes(tree, weights), cfg, str(weights))
    ocp = _orbax()
    try:
        import jax

        # Host numpy arrays, whatever devices and sharding the arrays were saved from (TPU pods).
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        with _quiet_orbax():
            restored = ocp.PyTreeCheckpointer().restore(
                weights, args=ocp.args.PyTreeRestore(restore_args=restore_args)
            )
    except Exception as exc:
        raise OfficialImportError(f"cannot read the arrays of {weights}: {_first_line(exc)}") from None
    try:
        state = official.to_state_dict(_flatten(restored), cfg)
    except ValueError as exc:  # check_fits passed, so only a tree that changed underneath us lands here
        raise OfficialImportError(f"{weights}: {exc}") from None
    return OfficialWeights(state, found_step, weights)


def import_official(
    path: str | Path, job: JobConfig, output: str, step: int | None = None
) -> tuple[str, OfficialWeights]:
    """Write the official checkpoint as this project's checkpoint (a `.pt` file, or a new run directory's
    `checkpoints/step-N.pt`) that ttt eval / generate / train.init_from read; returns where, and weights."""
    from ttt.storage import open_storage
    from ttt.train.checkpoint import Checkpointer, encode

    loaded = load_official(path, job.model, step)
    number = loaded.step or 0
    # Weights-only, like a DeepSpeed checkpoint's ttt.pt: fine for eval, generate and init_from.
    payload = {
        "model": loaded.state,
        "config": job.to_dict(),
        "state": {"step": number, "data_position": 0, "tokens_seen": 0, "mlflow_run_id": None},
        "imported_from": str(loaded.source),
    }
    if output.endswith(".pt"):
        parent, _, name = output.rpartition("/")
        storage = open_storage(parent or ".")
        if storage.exists(name):
            raise OfficialImportError(f"{output} already exists; remove it or choose another name")
        storage.write_bytes(name, encode(payload))
        where = output
    else:
        checkpointer = Checkpointer(open_storage(output), keep=1)
        if checkpointer.newest() is not None:  # resuming or pruning someone's run is never intended here
            raise OfficialImportError(f"{output} already holds checkpoints; choose a new folder")
        where = checkpointer.save(payload, number)
    return where, loaded


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {official dotted name: leaf}; None leaves (biases, lm_head, indices) are dropped."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif value is not None:
            out[name] = value
    return out


def _slash(name: str) -> str:
    return name.replace(".", "/")  # the Orbax tree's own spelling, as in the spec's table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
