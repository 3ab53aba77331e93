"""A sweep: which config fields vary and over what, how trials are drawn, and what is optimized.

One description serves `ttt sweep SWEEP.yaml` (Ray Tune on this machine) and the TTTSweep resource (one
TTTJob per trial): both call `expand`, which turns it into the trials' overrides and checks every trial's
config before anything starts. Field names are dotted config fields (`model.window_size`), values are
what `--set` would take.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass as plain_dataclass
from dataclasses import field
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from ttt import config as cfgmod
from ttt.config import ConfigError, JobConfig

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN or infinite bound is no range
MAX_TRIALS = 10_000
"""More trials than this is a typo (a step of 1e-9), not a sweep: refused before any is built."""

# What a trial can be judged by: the metrics the trainer logs after its final evaluation.
OBJECTIVE_METRICS = {
    "val/loss": "validation loss",
    "val/loss_past_window": "validation loss on positions past the attention window",
    "val/loss_no_ttt": "validation loss with test-time training switched off",
    "val/loss_past_window_no_ttt": "loss past the window with test-time training switched off",
    "train/loss": "training loss of the last step",
}


@dataclass(config=_STRICT, frozen=True)
class Parameter:
    """One swept field: a list of `values`, or a range `min`..`max` (grid: `step` or `num` points)."""

    name: str = Field(min_length=3, description="Dotted config field, e.g. model.window_size.")
    values: list[Any] | None = Field(None, description="The values to try.")
    min: float | None = None
    max: float | None = None
    step: float | None = Field(None, gt=0, description="Grid spacing of a linear range.")
    num: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="Grid points of a range (log ranges: geometric)."
    )
    scale: Literal["linear", "log"] = Field("linear", description="How a range is spaced or sampled.")


@dataclass(config=_STRICT, frozen=True)
class Objective:
    metric: str = Field("val/loss", description=f"One of: {', '.join(OBJECTIVE_METRICS)}.")
    goal: Literal["minimize", "maximize"] = "minimize"


@dataclass(config=_STRICT, frozen=True)
class EarlyStopping:
    """Stop unpromising trials at evaluations (needs train.eval_every > 0 for validation metrics)."""

    method: Literal["asha", "median"] = "asha"
    grace_period: int = Field(1, ge=1, description="Evaluations every trial gets before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1 in this many trials at each rung.")


@dataclass(config=_STRICT, frozen=True)
class SweepSpec:
    parameters: list[Parameter] = Field(min_length=1)
    name: str = Field("sweep", min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9-]*$")
    base: str | None = Field(
        None, description="Recipe, preset or YAML file of `ttt sweep` (not in TTTSweep)."
    )
    overrides: list[str] = Field(
        default_factory=list, description="Applied to every trial before its values."
    )
    algorithm: Literal["grid", "random"] = "grid"
    max_trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="grid: a cap (error if exceeded); random: trials."
    )
    parallelism: int = Field(1, ge=1, description="Trials running at once.")
    objective: Objective = field(default_factory=Objective)
    early_stopping: EarlyStopping | None = None
    skip_invalid: bool = Field(
        False, description="Drop combinations whose config is invalid instead of failing."
    )
    seed: int = Field(0, ge=0, description="Seed of random search.")


@plain_dataclass(frozen=True)
class Trial:
    index: int
    params: dict[str, Any]
    config: JobConfig

    @property
    def overrides(self) -> list[str]:
        return [f"{name}={json.dumps(value)}" for name, value in self.params.items()]

    def label(self) -> str:
        return ", ".join(f"{name.rsplit('.', 1)[-1]}={_short(v)}" for name, v in self.params.items())


@plain_dataclass(frozen=True)
class Expansion:
    trials: list[Trial]
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    """Combinations left out by skip_invalid, with why."""


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def from_dict(data: Mapping[str, Any], source: str = "sweep") -> SweepSpec:
    """Build and check a spec; errors name the field (`parameters[1].min`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, "a sweep must be a mapping")
    try:
        spec = SweepSpec(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        if err["type"] == "unexpected_keyword_argument" or err["type"] == "extra_forbidden":
            raise ConfigError(where or source, "unknown key") from None
        raise ConfigError(where or source, f"{err['msg']} (got {err.get('input')!r})") from None
    except TypeError as exc:  # an unknown top-level key
        raise ConfigError(source, str(exc).split("__init__() ")[-1]) from None
    check(spec)
    return spec


def check(spec: SweepSpec) -> None:
    """Rules of the spec itself (the config of each trial is checked by `expand`)."""
    seen: set[str] = set()
    for i, p in enumerate(spec.parameters):
        where = f"parameters[{i}]"
        if p.name in seen:
            raise ConfigError(f"{where}.name", f"'{p.name}' is swept twice")
        seen.add(p.name)
        ranged = p.min is not None or p.max is not None
        if p.values is not None and ranged:
            raise ConfigError(where, "give either values or a min/max range, not both")
        if p.values is not None:
            if not p.values:
                raise ConfigError(f"{where}.values", "is empty: list at least one value")
            continue
        if p.min is None or p.max is None:
            raise ConfigError(where, "needs values, or both min and max")
        if p.min > p.max:
            raise ConfigError(f"{where}.min", f"{p.min:g} is greater than max {p.max:g}")
        if p.scale == "log" and p.min <= 0:
            raise ConfigError(f"{where}.min", f"a log range must be positive, got {p.min:g}")
        if spec.algorithm == "grid" and p.step is None and p.num is None:
            raise ConfigError(where, "a grid over a range needs step or num")
        if p.step is not None and p.scale == "log":
            raise ConfigError(f"{where}.step", "a log range is gridded by num, not step")
        if p.step is not None and (p.max - p.min) / p.step >= MAX_TRIALS:
            raise ConfigError(f"{where}.step", f"{p.step:g} makes more than {MAX_TRIALS} points in the range")
    if spec.objective.metric not in OBJECTIVE_METRICS:
        known = ", ".join(OBJECTIVE_METRICS)
        raise ConfigError(
            "objective.metric", f"'{spec.objective.metric}' is not logged by the trainer; use one of {known}"
        )


# -- expansion --------------------------------------------------------------------------------------


def _field_kind(base: JobConfig, name: str, where: str) -> type:
    """int, float, bool or str: the type of the field's value in the base config (unknown → error)."""
    node: Any = base.to_dict()
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            try:  # the config module's own message, with its suggestion
                cfgmod.apply_overrides(base, [f"{name}=0"])
            except ConfigError as exc:
                raise ConfigError(f"{where}.name", f"{exc.field}: {exc.message}") from None
            raise ConfigError(f"{where}.name", f"'{name}' is not a config field")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"{where}.name", f"'{name}' is a config section; sweep one of its fields")
    return type(node) if node is not None else float


def _grid_values(p: Parameter, kind: type) -> list[Any]:
    if p.values is not None:
        return list(p.values)
    assert p.min is not None and p.max is not None
    if p.num is not None:
        if p.num == 1:
            points = [p.min]
        elif p.scale == "log":
            ratio = (p.max / p.min) ** (1 / (p.num - 1))
            points = [p.min * ratio**i for i in range(p.num)]
        else:
            points = [p.min + (p.max - p.min) * i / (p.num - 1) for i in range(p.num)]
    else:
        assert p.step is not None
        count = math.floor((p.max - p.min) / p.step + 1e-9) + 1
        points = [p.min + i * p.step for i in range(count)]
    return _typed(points, kind)


def _typed(points: list[float], kind: type) -> list[Any]:
    if kind is int:
        return list(dict.fromkeys(round(x) for x in points))  # rounding may merge neighbours
    return [float(f"{x:.6g}") for x in points]


def _sample(p: Parameter, kind: type, rng: random.Random) -> Any:
    if p.values is not None:
        return rng.choice(p.values)
    assert p.min is not None and p.max is not None
    if p.scale == "log":
        x = math.exp(rng.uniform(math.log(p.min), math.log(p.max)))
    else:
        x = rng.uniform(p.min, p.max)
    return _typed([x], kind)[0]


def combinations(spec: SweepSpec, base: JobConfig) -> list[dict[str, Any]]:
    kinds = [_field_kind(base, p.name, f"parameters[{i}]") for i, p in enumerate(spec.parameters)]
    names = [p.name for p in spec.parameters]
    if spec.algorithm == "grid":
        axes = [_grid_values(p, kind) for p, kind in zip(spec.parameters, kinds, strict=True)]
        size = math.prod(len(axis) for axis in axes)  # counted before the product is built
        if spec.max_trials is None and size > MAX_TRIALS:
            raise ConfigError("parameters", f"the grid has {size} combinations, more than {MAX_TRIALS}")
        if spec.max_trials is not None and size > spec.max_trials:
            raise ConfigError(
                "max_trials",
                f"the grid has {size} combinations, more than max_trials {spec.max_trials}: "
                "raise max_trials or list fewer values",
            )
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes)]
    rng = random.Random(spec.seed)
    count = spec.max_trials or 10
    return [
        {p.name: _sample(p, kind, rng) for p, kind in zip(spec.parameters, kinds, strict=True)}
        for _ in range(count)
    ]


def expand(spec: SweepSpec, base: JobConfig) -> Expansion:
    """Every trial with its checked config; invalid combinations fail the sweep (all listed at once)
    unless `skip_invalid`, which leaves them out."""
    base = base.with_overrides(spec.overrides)
    trials: list[Trial] = []
    skipped: list[tuple[dict[str, Any], str]] = []
    for params in combinations(spec, base):
        try:
            cfg = base.with_overrides([f"{k}={json.dumps(v)}" for k, v in params.items()])
        except ConfigError as exc:
            skipped.append((params, str(exc)))
            continue
        trials.append(Trial(len(trials), params, cfg))
    if skipped and not spec.skip_invalid:
        lines = "; ".join(f"{_label(params)}: {why}" for params, why in skipped)
        raise ConfigError(
            "parameters",
            f"{len(skipped)} combination(s) are invalid ({lines}); fix them or set skip_invalid: true",
        )
    if not trials:
        raise ConfigError("parameters", "no valid combination is left to run")
    return Expansion(trials, skipped)


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


# -- the TTTSweep resource's form -------------------------------------------------------------------

_CAMEL = {
    "maxTrials": "max_trials",
    "earlyStopping": "early_stopping",
    "skipInvalid": "skip_invalid",
    "gracePeriod": "grace_period",
    "reductionFactor": "reduction_factor",
}
_SNAKE = {snake: camel for camel, snake in _CAMEL.items()}


def _snake_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_CAMEL.get(k, k): _snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake_keys(v) for v in value]
    return value


def from_resource(sweep: Mapping[str, Any]) -> tuple[SweepSpec, Mapping[str, Any]]:
    """A TTTSweep manifest → (its spec, its TTTJob template); errors name the resource's fields."""
    spec = dict(sweep.get("spec") or {})
    template = spec.pop("template", None)
    if not isinstance(template, Mapping):
        raise ConfigError("spec.template", "a TTTSweep needs a template (a TTTJob spec)")
    data = {"name": (sweep.get("metadata") or {}).get("name", "sweep"), **_snake_keys(spec)}
    try:
        return from_dict(data, source="spec"), template
    except ConfigError as exc:
        raise ConfigError(resource_field(exc.field), exc.message) from None


def resource_field(field: str) -> str:
    """A sweep field as the TTTSweep names it: max_trials → spec.maxTrials."""
    return "spec." + ".".join(_SNAKE.get(p, p) for p in field.split("."))


def load_any(path: str) -> tuple[SweepSpec, JobConfig]:
    """`ttt sweep`'s input: a sweep file (with `base`), or a TTTSweep manifest run on this machine."""
    import yaml

    from ttt.jobspec import job_config

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(path, f"cannot read sweep file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {cfgmod.yaml_problem(exc)}") from None
    if isinstance(data, Mapping) and data.get("kind") == "TTTSweep":
        spec, template = from_resource(data)
        return spec, job_config(template)
    spec = from_dict(data, source=path)
    if spec.base is None:
        raise ConfigError("base", "name the recipe, preset or YAML file the trials start from")
    return spec, cfgmod.resolve(spec.base)
