"""The training part of a TTTJob spec (recipe, config, overrides, the TTT knobs) → a JobConfig.

Shared by the operator, which adds what the cluster decides (workers, storage, tracking), and by
`ttt sweep`, which runs a TTTSweep's template on this machine. Errors name the field in the resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ttt import config as cfgmod
from ttt.errors import UserError

# spec.ttt.<knob> → the config field it sets.
KNOBS = {
    "windowSize": "model.window_size",
    "miniBatchSize": "ttt.mini_batch_size",
    "seqLen": "train.seq_len",
}

# Config fields a spec sets through its own typed fields: errors there point at those.
SPEC_FIELDS = {
    **{field: f"spec.ttt.{knob}" for knob, field in KNOBS.items()},
    "scale.workers": "spec.numNodes",
    "scale.zero_stage": "spec.deepspeed.stage",
    "storage.root": "spec.storageUri",
    "tracking.experiment": "spec.mlflow.experiment",
}


class SpecError(UserError):
    """The spec cannot be turned into a runnable job; `field` is its path in the resource."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def spec_field(field: str) -> str:
    return SPEC_FIELDS.get(field, f"spec.config.{field}")


def job_config(spec: Mapping[str, Any]) -> cfgmod.JobConfig:
    """recipe → config laid over it → overrides → the TTT knobs."""
    try:
        cfg = _base_config(spec)
        cfg = cfgmod.apply_overrides(cfg, spec.get("overrides") or [])
    except cfgmod.ConfigError as exc:
        if exc.field.startswith("spec."):  # already named in the resource (spec.config.preset)
            raise SpecError(exc.field, exc.message) from None
        where = "spec.overrides" if _from_overrides(exc, spec) else "spec.config"
        raise SpecError(f"{where}.{exc.field}", exc.message) from None
    data = cfg.to_dict()
    for knob, dotted in KNOBS.items():
        if knob in (spec.get("ttt") or {}):
            section, field = dotted.split(".")
            data[section][field] = spec["ttt"][knob]
    try:
        return cfgmod.JobConfig.from_dict(data)
    except cfgmod.ConfigError as exc:
        raise SpecError(spec_field(exc.field), exc.message) from None


def _base_config(spec: Mapping[str, Any]) -> cfgmod.JobConfig:
    partial = spec.get("config") or {}
    recipe = spec.get("recipe")
    if recipe is None:
        return cfgmod.from_yaml(yaml.safe_dump(dict(partial)), source="spec.config")
    path = cfgmod.find_recipe(recipe)
    if path is None:
        known = ", ".join(cfgmod.recipe_names())
        raise SpecError("spec.recipe", f"no recipe '{recipe}'; known: {known}")
    return cfgmod.merge(cfgmod.load(path), partial, source="spec.config")


def _from_overrides(exc: cfgmod.ConfigError, spec: Mapping[str, Any]) -> bool:
    keys = [item.split("=", 1)[0].strip() for item in spec.get("overrides") or []]
    return exc.field == "override" or any(k == exc.field or k.startswith(exc.field + ".") for k in keys)
