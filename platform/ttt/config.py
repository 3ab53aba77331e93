"""Typed configuration of a TTT-E2E run.

One `JobConfig` describes a run everywhere: the CLI reads it from YAML (or a preset) plus dotted
overrides, the operator will render it from a TTTJob spec, sweeps expand it into trials, and MLflow logs it
flattened. The dataclasses are pydantic dataclasses, so types and ranges are checked on construction and
unknown keys are errors; rules that involve several fields live in `__post_init__`. Every error is a
`ConfigError` that names the dotted field and says what to change.

Field names follow the paper's quantities with readable names: window_size (W), mini_batch_size (b),
suffix_len (S), seq_len (T).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from ttt.errors import UserError

# Unknown keys are errors, and so are NaN and infinity: no field means anything by them.
_SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConfigError(UserError):
    """A configuration value is wrong; `field` is its dotted path (e.g. ``ttt.mini_batch_size``)."""

    def __init__(self, field: str, message: str):
        self.field = one_line(field)
        self.message = one_line(message)
        super().__init__(f"{self.field}: {self.message}")


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped: an error is printed as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


@dataclass(config=_SECTION, frozen=True)
class ModelConfig:
    """Architecture: a Llama-style Transformer whose last `suffix_len` blocks carry a prime MLP."""

    vocab_size: int = Field(128256, ge=2, description="Vocabulary size V (Llama-3: 128256).")
    hidden_size: int = Field(768, ge=1, description="Model width D.")
    intermediate_size: int = Field(1664, ge=1, description="SwiGLU width I of the normal and prime MLPs.")
    num_layers: int = Field(12, ge=1, description="Number of blocks L.")
    num_heads: int = Field(12, ge=1, description="Attention heads H (head dim = D / H, no GQA).")
    suffix_len: int = Field(
        3, ge=0, description="Suffix blocks S: the last S blocks carry a prime MLP (TTT-E2E: L/4; 0 = none)."
    )
    attention: Literal["swa", "full"] = Field(
        "swa", description="'swa': causal sliding window of window_size keys; 'full': full causal attention."
    )
    window_size: int = Field(
        8192, ge=1, description="Sliding window W in keys per query, the query included."
    )
    rope_theta: float = Field(5e5, gt=0, description="RoPE base θ (interleaved pairs).")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of linears and embedding.")
    bos_token_id: int = Field(
        128000, ge=0, description="BOS id; targets equal to it are left out of the loss."
    )
    # Kernels compute the same function; they are chosen per machine, not per architecture.
    prefix_kernel: Literal["auto", "sdpa", "flex", "flash"] = Field(
        "auto",
        description="Full-sequence attention (prefix blocks, no-TTT models): 'sdpa' (PyTorch fused SDPA), "
        "'flex' (flex attention with a sliding-window block mask, compiled on CUDA), 'flash' (flash-attn, "
        "CUDA and bf16/fp16 only); 'auto': flash-attn if installed, else flex, on CUDA; sdpa elsewhere.",
    )
    chunk_kernel: Literal["auto", "materialized", "triton"] = Field(
        "auto",
        description="Suffix chunk attention (differentiated twice): 'materialized' (explicit softmax in "
        "PyTorch ops), 'triton' (fused forward, backward and double backward; CUDA, or CPU with "
        "TRITON_INTERPRET=1); 'auto': triton on CUDA when installed, else materialized.",
    )

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                "model.num_heads",
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
            )
        if self.head_dim % 2:
            raise ConfigError(
                "model.num_heads", f"head dim {self.head_dim} must be even for rotary embeddings"
            )
        if self.suffix_len > self.num_layers:
            raise ConfigError(
                "model.suffix_len",
                f"{self.suffix_len} suffix blocks is more than the model's {self.num_layers} layers",
            )
        if self.bos_token_id >= self.vocab_size:
            raise ConfigError(
                "model.bos_token_id",
                f"{self.bos_token_id} is outside the vocabulary (size {self.vocab_size})",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def effective_window(self) -> int | None:
        """Keys per query, or None for full causal attention."""
        return self.window_size if self.attention == "swa" else None


@dataclass(config=_SECTION, frozen=True)
class TTTConfig:
    """The inner loop: one SGD step on the prime MLPs per mini-batch of tokens."""

    enabled: bool = Field(
        True, description="Test-time training on; false = no-TTT ablation (prime MLPs static)."
    )
    mini_batch_size: int = Field(1024, ge=1, description="Tokens b per inner step (and per loss chunk).")
    inner_lr: float = Field(1.0, ge=0, description="Inner SGD learning rate after warm-up.")
    inner_lr_init: float = Field(0.1, ge=0, description="Inner learning rate at outer step 0.")
    inner_lr_warmup_steps: int = Field(
        480, ge=0, description="Outer steps over which the inner lr rises linearly; 0 = constant inner_lr."
    )
    inner_clip: float = Field(
        1.0, ge=0, description="Per-sequence global-norm clip of the inner gradient; 0 = off."
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "full",
        description="Activation recomputation in the backward pass, per inner mini-batch step and per prefix "
        "block: 'none' keeps every activation (fastest, memory grows with T·layers); 'full' keeps only the "
        "carry (fast weights, KV caches) per mini-batch and one tensor per block, and reruns the rest; "
        "'selective' reruns the same regions but keeps the outputs of matmuls and fused attention, so only "
        "the cheap ops (norms, RoPE, SiLU, softmax, cross-entropy) are redone. The legacy key "
        "ttt.checkpoint is read as true = full, false = none.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the prefix and each inner step (the inner gradient is traced with "
        "torch.func, so the compiled graph is differentiated once). Needs ttt.recompute none or "
        "selective; with selective, AOTAutograd's partitioner recomputes what it can (activation memory "
        "budget 0). The first steps pay the compile (tens of seconds on CPU); evaluation stays eager.",
    )
    compile_backend: Literal["inductor", "aot_eager_decomp_partition"] = Field(
        "inductor",
        description="torch.compile backend for ttt.compile. 'aot_eager_decomp_partition' traces, decomposes "
        "and partitions the same graphs as inductor but runs them eagerly (no code generation): seconds "
        "to compile instead of minutes, for bisecting a suspected miscompile and for the numerics tests.",
    )


LEGACY_KEYS = {"ttt.checkpoint": "ttt.recompute"}
"""Renamed fields still read (old run directories, checkpoints and overrides): old key → new key."""


def _legacy_value(key: str, value: Any) -> Any:
    if key == "ttt.checkpoint":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r} (renamed: use ttt.recompute)")
        return "full" if value else "none"
    return value


def _migrate(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """`data` with legacy keys replaced by their new ones (a conflicting pair is an error)."""
    for old, new in LEGACY_KEYS.items():
        section, old_leaf = old.split(".")
        fields = data.get(section)
        if not isinstance(fields, Mapping) or old_leaf not in fields:
            continue
        fields = dict(fields)
        value = _legacy_value(old, fields.pop(old_leaf))
        new_leaf = new.split(".")[1]
        if new_leaf in fields and fields[new_leaf] != value:
            raise ConfigError(old, f"is the old name of {new}, which is set to {fields[new_leaf]!r}: drop it")
        fields[new_leaf] = value
        data = {**data, section: fields}
    return data


@dataclass(config=_SECTION, frozen=True)
class OptimConfig:
    """Outer AdamW with linear warm-up then cosine decay (the first update uses lr 0)."""

    lr: float = Field(3e-3, ge=0, description="Peak learning rate.")
    end_lr: float = Field(1e-5, ge=0, description="Learning rate at the last step.")
    warmup_steps: int = Field(480, ge=0, description="Linear warm-up steps from 0 to lr.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay, applied to every parameter.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Global-norm clip of the outer gradient; 0 = off.")


@dataclass(config=_SECTION, frozen=True)
class TrainConfig:
    """What one outer step consumes, how many there are, and what happens around them."""

    seq_len: int = Field(8192, ge=1, description="Training context T; a multiple of ttt.mini_batch_size.")
    global_batch_size: int = Field(64, ge=1, description="Sequences per outer step, over all workers.")
    total_steps: int = Field(4800, ge=1, description="Outer steps.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per outer step (same global batch).")
    seed: int = Field(0, ge=0, description="Seed of the weight init and of the data order.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only after the last step).")
    eval_sequences: int = Field(256, ge=1, description="Validation windows per evaluation.")
    eval_batch_size: int = Field(8, ge=1, description="Validation windows per forward pass.")
    checkpoint_every: int = Field(500, ge=1, description="Save a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    init_from: str | None = Field(
        None, description="Checkpoint whose weights start this run (fresh optimizer), e.g. for extension."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast on GPU, fp32 on CPU. Master weights stay fp32."
    )
    fail_at_step: int | None = Field(
        None, ge=0, description="Drills and tests: fail on purpose before update N (off by default)."
    )
    report_every_s: float = Field(
        30.0, ge=0, description="Rewrite <run dir>/progress.json at most this often (and at checkpoints)."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Accelerator peak for MFU; None: looked up from the GPU name."
    )
    stop_grace_s: float = Field(
        25.0,
        gt=0,
        description="What a stop request (SIGTERM, SIGINT, a pod's preStop hook) may take after the step "
        "in flight: the checkpoint, then MLflow delivery; what MLflow has not taken by then stays in the "
        "run's journal. The operator derives it from spec.terminationGracePeriodSeconds.",
    )


@dataclass(config=_SECTION, frozen=True)
class ScaleConfig:
    """How many workers, what each gets, and how the model is sharded (Ray Train + DeepSpeed)."""

    workers: int = Field(1, ge=1, description="Training processes; more than 1 runs under Ray Train.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs Ray reserves per worker (0: CPU training).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources per worker, e.g. {'accelerator_type:H100': 0.01}.",
    )
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage; None: plain PyTorch for 1 worker, ZeRO-2 for more."
    )
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts before the run fails (-1: no limit)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto' inside a RayJob); None: start a local one."
    )
    placement_timeout_s: float = Field(
        120.0, gt=0, description="How long to wait for Ray to place all workers before giving up."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the workers: PACK fills a node first, STRICT_SPREAD puts each "
        "worker on a node of its own.",
    )

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage is not None or self.workers > 1

    @property
    def effective_zero_stage(self) -> int:
        return 2 if self.zero_stage is None else self.zero_stage


@dataclass(config=_SECTION, frozen=True)
class DataConfig:
    """Where the token streams come from."""

    path: str = Field(
        "bundled:stdlib",
        description="A dataset directory or s3:// prefix with train/val token streams (.npy or zarr), or "
        "'bundled:stdlib' (byte-level corpus built offline from the Python standard library).",
    )
    train_split: str = Field("train", description="Name of the training stream.")
    val_split: str = Field("val", description="Name of the validation stream.")


@dataclass(config=_SECTION, frozen=True)
class StorageConfig:
    """Where runs write: <root>/<run name>/ holds the resolved config and the checkpoints."""

    root: str = Field("runs", min_length=1, description="Local directory or s3://bucket/prefix.")
    shared: bool = Field(
        False,
        description="A local root is a file system every Ray node mounts at the same path (a "
        "ReadWriteMany volume, NFS); without it a run on a Ray cluster of several nodes needs s3://.",
    )

    def __post_init__(self) -> None:
        if "://" in self.root and not self.root.startswith("s3://"):
            raise ConfigError("storage.root", f"'{self.root}': use a local path or s3://bucket/prefix")
        if self.root.startswith("s3://") and not self.root[len("s3://") :].split("/")[0]:
            raise ConfigError("storage.root", f"'{self.root}' names no bucket: use s3://bucket/prefix")


@dataclass(config=_SECTION, frozen=True)
class TrackingConfig:
    """MLflow: one run per training run."""

    uri: str | None = Field(
        None, description="Tracking URI; None: sqlite at <storage.root>/mlflow.db (local roots only)."
    )
    experiment: str = Field("ttt-e2e", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(
        None, description="Names the run and its directory; an existing run of this name is resumed."
    )
    baseline_run_id: str | None = Field(
        None, description="MLflow run whose loss-by-position curve the plot shows next to this run's."
    )
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory usage alongside the metrics.")
    parent_run_id: str | None = Field(
        None, description="MLflow run this run is a child of (a sweep's run for each of its trials)."
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="Extra tags on the MLflow run (a sweep's trials: ttt.sweep, ttt.trial).",
    )
    flush_timeout_s: float = Field(
        60.0,
        ge=0,
        description="At the end of a run, how long to wait for an unreachable MLflow server to take the "
        "records still queued; the rest stays in <run dir>/mlflow-journal/ for `ttt sync` or the next "
        "attempt.",
    )


@dataclass(config=_SECTION, frozen=True)
class JobConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    ttt: TTTConfig = dataclasses.field(default_factory=TTTConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len % self.ttt.mini_batch_size:
            raise ConfigError(
                "train.seq_len",
                f"{self.train.seq_len} is not divisible by ttt.mini_batch_size {self.ttt.mini_batch_size}",
            )
        b, window = self.ttt.mini_batch_size, self.model.window_size
        if self.model.attention == "swa" and self.model.suffix_len and b > window:
            raise ConfigError(
                "ttt.mini_batch_size",
                f"{b} is larger than model.window_size {window}: a mini-batch must fit in the attention "
                "window (the suffix blocks' KV cache holds one window)",
            )
        if self.ttt.enabled and self.model.suffix_len == 0:
            raise ConfigError(
                "ttt.enabled",
                "test-time training needs prime MLPs: set model.suffix_len >= 1 or ttt.enabled=false",
            )
        micro = self.train.grad_accum_steps
        if self.train.global_batch_size % micro:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.train.global_batch_size} is not divisible by train.grad_accum_steps {micro}",
            )
        per_worker = self.scale.workers * micro
        if self.train.global_batch_size % per_worker:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.train.global_batch_size} sequences do not split evenly over "
                f"{self.scale.workers} workers x {micro} micro-batches",
            )
        if (
            self.scale.effective_zero_stage == 3
            and self.scale.uses_deepspeed
            and self.ttt.recompute == "none"
        ):
            raise ConfigError(
                "ttt.recompute",
                "ZeRO-3 needs recomputation (selective or full): the recomputed forward gathers the sharded "
                "weights again, where a kept activation graph would hold them freed",
            )
        if self.ttt.compile and self.ttt.recompute == "full":
            raise ConfigError(
                "ttt.compile",
                "needs ttt.recompute none or selective: full recomputation reruns the inner step under "
                "saved-tensor hooks, which torch.func (the compiled inner gradient) refuses",
            )
        if self.ttt.compile and self.scale.uses_deepspeed and self.scale.effective_zero_stage == 3:
            raise ConfigError(
                "ttt.compile",
                "is not supported with ZeRO-3: its parameters are gathered by module hooks that a compiled "
                "inner step would not run",
            )
        if self.optim.warmup_steps >= self.train.total_steps:
            raise ConfigError(
                "optim.warmup_steps",
                f"{self.optim.warmup_steps} warm-up steps leave no decay in {self.train.total_steps} steps",
            )

    # -- conversions -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobConfig:
        """Construct from plain data; every failure is a ConfigError naming the field."""
        data = _migrate(data)
        _check_keys(cls, data, "")
        try:
            return cls(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            raise ConfigError(where, f"{err['msg']} (got {err.get('input')!r})") from None

    def with_overrides(self, overrides: Iterable[str]) -> JobConfig:
        return apply_overrides(self, overrides)


# -- building from dicts with errors that name the field -------------------------------------------


def _section_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_keys(cls: type, data: Mapping[str, Any], prefix: str) -> None:
    """Reject unknown keys with a suggestion, recursing into nested sections."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {type(data).__name__}")
    types = _section_types(cls)
    for key, value in data.items():
        if key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known: {', '.join(types)}"
            raise ConfigError(f"{prefix}{key}", f"unknown key{hint}")
        if dataclasses.is_dataclass(types[key]):
            _check_keys(types[key], value, f"{prefix}{key}.")


# -- YAML and dotted overrides ---------------------------------------------------------------------


def to_yaml(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def from_yaml(text: str, source: str = "<yaml>") -> JobConfig:
    """Parse YAML; a top-level `preset: NAME` starts from that preset and the rest overrides it."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(source, "a config file must hold a mapping")
    base = data.pop("preset", None)
    if base is None:
        return JobConfig.from_dict(data)
    return JobConfig.from_dict(_deep_merge(preset(str(base)).to_dict(), data))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    text = problem or " ".join(str(exc).split())
    return f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark else text


def load(path: str | Path) -> JobConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from None
    return from_yaml(text, source=str(path))


def dump(cfg: JobConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def recipe_dirs() -> list[Path]:
    """Where `ttt train NAME` looks for NAME.yaml: $TTT_RECIPES_DIR, then the source tree's jobs/recipes."""
    dirs = [Path(p) for p in os.environ.get("TTT_RECIPES_DIR", "").split(os.pathsep) if p]
    return [*dirs, Path(__file__).resolve().parents[2] / "jobs" / "recipes"]


def recipe_names() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_recipe(name: str) -> Path | None:
    return next((d / f"{name}.yaml" for d in recipe_dirs() if (d / f"{name}.yaml").is_file()), None)


def resolve(source: str, overrides: Iterable[str] = ()) -> JobConfig:
    """A recipe name, a preset name or a YAML path, then `key=value` overrides."""
    if source.endswith((".yaml", ".yml")) or "/" in source:
        cfg = load(source)
    elif (recipe := find_recipe(source)) is not None:
        cfg = load(recipe)
    elif source in preset_names():
        cfg = preset(source)
    else:
        close = difflib.get_close_matches(source, recipe_names() + preset_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; `ttt recipes` lists them"
        raise ConfigError("config", f"'{source}' is neither a recipe, a preset nor a YAML file{hint}")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: JobConfig, overrides: Iterable[str]) -> JobConfig:
    """Apply `section.field=value` strings; values are parsed as YAML scalars (1e-3, true, swa)."""
    data = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key in LEGACY_KEYS and sep:
            raw = str(_legacy_value(key, yaml.safe_load(raw) if raw.strip() else raw))
            key = LEGACY_KEYS[key]
        if not sep or not key:
            # Named by what was typed; an empty item has nothing to name but itself as an override.
            raise ConfigError(item.strip() or "override", "an override must look like section.field=value")
        if "" in key.split("."):
            raise ConfigError(key, "is not a dotted field name such as train.total_steps")
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                _check_keys(JobConfig, _path_dict(key.split(".")[: i + 1]), "")
                raise ConfigError(key, "is not a config section")
            node = node[part]
        if leaf not in node:
            _check_keys(JobConfig, _path_dict(key.split(".")), "")
        if isinstance(node.get(leaf), dict):
            raise ConfigError(key, "is a section; override one of its fields")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(node.get(leaf), str | None) and _takes_text(key) and not isinstance(value, str | None):
            value = raw.strip()  # a name like 2024-01-01, 123 or yes is that text, not a date, int or bool
        node[leaf] = value
    return JobConfig.from_dict(data)


def _takes_text(key: str) -> bool:
    """The dotted field holds text (str or str | None), so a typed value is the text that was typed."""
    section, _, name = key.partition(".")
    cls = _section_types(JobConfig).get(section)
    if cls is None or not dataclasses.is_dataclass(cls) or name not in _section_types(cls):
        return False
    kind = _section_types(cls)[name]
    return kind is str or set(typing.get_args(kind)) == {str, type(None)}


def merge(cfg: JobConfig, partial: Mapping[str, Any], source: str = "config") -> JobConfig:
    """`cfg` with the sections and fields of `partial` (a recipe-shaped mapping) laid over it."""
    if not isinstance(partial, Mapping):
        raise ConfigError(source, f"expected a mapping, got {type(partial).__name__}")
    if "preset" in partial:
        raise ConfigError(f"{source}.preset", "a preset can only start a config, not be merged into one")
    return JobConfig.from_dict(_deep_merge(cfg.to_dict(), partial))


def _path_dict(parts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = None
    return out


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(cfg: JobConfig) -> dict[str, Any]:
    """`{"model.hidden_size": 768, ...}`: the form MLflow parameters and sweeps use (section.field)."""
    return {
        f"{section}.{key}": value
        for section, fields in cfg.to_dict().items()
        for key, value in fields.items()
    }


# -- presets ---------------------------------------------------------------------------------------

# Paper sizes (spec §2.10, §5.1): layers, width, heads, full-attention MLP width, pretraining steps,
# global batch, peak lr. E2E shrinks the MLP width so that its L+S MLPs match the baseline's L.
_SIZES: dict[str, tuple[int, int, int, int, int, int, float]] = {
    "125m": (12, 768, 12, 2048, 4800, 64, 3e-3),
    "350m": (24, 1024, 16, 2816, 13500, 64, 1.5e-3),
    "760m": (24, 1536, 16, 4096, 29000, 64, 1.25e-3),
    "1b": (24, 2048, 32, 5376, 50000, 64, 1e-3),
    "3b": (32, 2560, 32, 6912, 52000, 128, 8e-4),
}
VARIANTS = ("e2e", "nottt", "swa", "fa")
"""e2e: TTT-E2E; nottt: the same network with prime MLPs static; swa / fa: sliding-window and
full-attention baselines without prime MLPs (MLP width of the full-attention model)."""


def e2e_intermediate_size(fa_intermediate_size: int) -> int:
    """ceil(0.8 · I_FA / 128) · 128, the parameter-matched MLP width of the E2E models."""
    return math.ceil(fa_intermediate_size * 8 / (10 * 128)) * 128


def preset_names() -> list[str]:
    names = []
    for size in ("tiny", *_SIZES):
        names.append(size)
        names.extend(f"{size}-{v}" for v in VARIANTS)
    return names


def preset(name: str) -> JobConfig:
    """`<size>[-<variant>]`, size in tiny/125m/350m/760m/1b/3b, variant in e2e (default)/nottt/swa/fa."""
    size, _, variant = name.partition("-")
    variant = variant or "e2e"
    if variant not in VARIANTS or (size != "tiny" and size not in _SIZES):
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError("preset", f"unknown preset '{name}'{hint}")
    if size == "tiny":
        base, fa_width = _tiny(), 425  # 4 MLPs of 425 hold as many weights as E2E's 5 of 340
    else:
        layers, width, heads, fa_width, steps, batch, lr = _SIZES[size]
        warmup = steps // 10
        base = JobConfig(
            model=ModelConfig(
                hidden_size=width,
                num_layers=layers,
                num_heads=heads,
                intermediate_size=e2e_intermediate_size(fa_width),
                suffix_len=layers // 4,
            ),
            ttt=TTTConfig(inner_lr_warmup_steps=warmup),
            optim=OptimConfig(lr=lr, warmup_steps=warmup),
            train=TrainConfig(global_batch_size=batch, total_steps=steps),
        )
    return _variant(base, variant, fa_width)


def _tiny() -> JobConfig:
    # Byte-level vocabulary (256 bytes + BOS) and a size that trains in minutes on 2 CPU cores.
    return JobConfig(
        model=ModelConfig(
            vocab_size=257,
            bos_token_id=256,
            hidden_size=128,
            intermediate_size=340,
            num_layers=4,
            num_heads=4,
            suffix_len=1,
            window_size=64,
            rope_theta=1e4,
        ),
        ttt=TTTConfig(mini_batch_size=32, inner_lr_warmup_steps=30),
        optim=OptimConfig(lr=3e-3, warmup_steps=30),
        train=TrainConfig(seq_len=256, global_batch_size=8, total_steps=300),
    )


def _variant(cfg: JobConfig, variant: str, fa_width: int) -> JobConfig:
    if variant == "e2e":
        return cfg
    if variant == "nottt":
        return dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, enabled=False))
    # Baselines: no prime MLPs, the full-attention model's MLP width, one loss chunk per sequence.
    model = dataclasses.replace(
        cfg.model,
        suffix_len=0,
        intermediate_size=fa_width,
        attention="full" if variant == "fa" else "swa",
    )
    ttt = dataclasses.replace(cfg.ttt, enabled=False, mini_batch_size=cfg.train.seq_len)
    return dataclasses.replace(cfg, model=model, ttt=ttt)
