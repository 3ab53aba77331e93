"""Generated bad input on every user-facing surface of the CLI and library: `--set` overrides, config and
recipe YAML, sweep files, `ttt data prepare` inputs and `data.path`. Every outcome is a success or one
line that names the field; an exception of any other kind fails the test (that is a traceback for the user).

Hypothesis runs derandomized and without its example database, so CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import ROOT, generated
from ttt import cli
from ttt import config as cfgmod
from ttt.config import ConfigError
from ttt.data.corpus import prepare
from ttt.data.streams import DataError, open_dataset, write_dataset
from ttt.data.tokenizer import ByteTokenizer
from ttt.errors import UserError
from ttt.sweep import spec as sweepmod

TINY = cfgmod.preset("tiny")
FIELDS = sorted(cfgmod.flatten(TINY))
SECTIONS = sorted(TINY.to_dict())

# -- what bad values look like ------------------------------------------------------------------------

NASTY_TEXT = [
    "",
    " ",
    "nan",
    ".nan",
    ".inf",
    "-.inf",
    "1e309",
    "-1",
    "0",
    "0x10",
    "1_000",
    "null",
    "~",
    "[]",
    "{}",
    "[1, {a: 2}]",
    "{model: {x: 1}}",
    "2024-01-01",
    "yes",
    "on",
    "'unclosed",
    '"',
    ": :",
    "&a [*a]",
    "!!python/object:os.system",
    "ü̈ber-名前-🙂",
    "\u202e",
    "a" * 300,
]
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(NASTY_TEXT),
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(FIELDS + SECTIONS), inner, max_size=3)
    ),
    max_leaves=6,
)


def near_miss(name: str) -> st.SearchStrategy[str]:
    """Typos of a real name: a character dropped, doubled or changed, case changed."""
    return st.integers(min_value=0, max_value=max(len(name) - 1, 0)).flatmap(
        lambda i: st.sampled_from(
            [name[:i] + name[i + 1 :], name[:i] + name[i] * 2 + name[i + 1 :], name.upper(), name + "x"]
        )
    )


field_names = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(SECTIONS),
    st.sampled_from(FIELDS).flatmap(near_miss),
    st.sampled_from(FIELDS).map(lambda f: f + ".deeper"),
    st.text(max_size=15),
    st.sampled_from(["", ".", "..", "model.", ".lr", "model..hidden_size", "scale.resources_per_worker.gpu"]),
)


def value_text(value) -> str:
    """A value as a user would type it after `=`."""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


override_items = st.one_of(
    st.tuples(field_names, junk.map(value_text)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(FIELDS), st.sampled_from(NASTY_TEXT)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=20),  # no '=' at all, or '=' in odd places
)


def assert_one_line(exc: BaseException) -> str:
    """A UserError whose message is a single line: what the CLI prints after `ttt: ... error:`."""
    assert isinstance(exc, UserError), f"{type(exc).__name__} is not a user error: {exc!r}"
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, f"not one line: {text!r}"
    assert "Traceback" not in text
    return text


def names_override_field(exc: ConfigError, item: str) -> bool:
    raw = item
    key, sep, _ = item.partition("=")
    key, item, f = cfgmod.one_line(key.strip()), cfgmod.one_line(item), exc.field  # as printed
    if not sep or not key:  # not of the form section.field=value at all: named as typed
        return f in (cfgmod.one_line(raw.strip()), "override")
    return bool(f) and (f in (item, key) or key.startswith(f + ".") or f.startswith(key + ".") or f in FIELDS)


# -- `--set` overrides ----------------------------------------------------------------------------------


@generated(120)
@given(st.lists(override_items, min_size=1, max_size=3))
def test_generated_overrides_succeed_or_name_the_field(items):
    try:
        cfg = cfgmod.apply_overrides(TINY, items)
    except ConfigError as exc:
        assert_one_line(exc)
        assert any(names_override_field(exc, item) for item in items), (exc.field, items)
    else:
        assert isinstance(cfg, cfgmod.JobConfig)
        # What was accepted is finite: a NaN or infinite learning rate is not a config.
        assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in cfgmod.flatten(cfg).values())


@generated(40)
@given(override_items)
def test_the_cli_prints_one_line_for_any_override(item):
    """In process, through the real parser and main(): exit 0 or 2, and never an exception."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["config", "tiny", f"--set={item}"])
    if rc == 0:
        assert cfgmod.from_yaml(out.getvalue())  # what it printed is a config that loads again
    else:
        assert rc == 2
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ttt: config error: "), err.getvalue()


@pytest.mark.parametrize("value", ["2024-01-01", "123", "yes", "1e3"])
def test_text_fields_take_what_was_typed(value):
    """A run name that YAML would read as a date, a number or a boolean is still that name."""
    cfg = cfgmod.apply_overrides(TINY, [f"tracking.run_name={value}"])
    assert cfg.tracking.run_name == value


# -- config and recipe YAML -----------------------------------------------------------------------------

section_docs = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    junk | st.dictionaries(st.sampled_from([f.split(".")[1] for f in FIELDS]) | st.text(max_size=6), junk),
    max_size=4,
)
yaml_docs = st.one_of(
    section_docs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.tuples(st.sampled_from([*cfgmod.preset_names(), "huge", "", "tiny-xyz"]), section_docs).map(
        lambda p: yaml.safe_dump({"preset": p[0], **p[1]}, allow_unicode=True)
    ),
    junk.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.sampled_from([*NASTY_TEXT, "model: [", "a: b: c", "\t- x", "--- 1\n--- 2\n", "%YAML 9\n---\n"]),
    st.text(max_size=40),
)


def names_yaml_field(exc: ConfigError, text: str, source: str) -> bool:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    top = {cfgmod.one_line(k) for k in data} if isinstance(data, dict) else set()
    f = exc.field
    return f == source or f in FIELDS or f in top or f.split(".")[0] in top | {"preset"}


@generated(70)
@given(yaml_docs)
def test_generated_config_yaml_loads_or_names_the_field(text):
    try:
        cfgmod.from_yaml(text, source="bad.yaml")
    except ConfigError as exc:
        assert_one_line(exc)
        assert names_yaml_field(exc, text, "bad.yaml"), (exc.field, text)


@generated(15)
@given(yaml_docs)
def test_a_generated_recipe_file_resolves_or_names_the_field(text):
    """`ttt train RECIPE`: a recipe found through TTT_RECIPES_DIR, read like any config file."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "junk-recipe.yaml").write_text(text, encoding="utf-8")
        old = os.environ.get("TTT_RECIPES_DIR")
        os.environ["TTT_RECIPES_DIR"] = tmp
        try:
            cfgmod.resolve("junk-recipe")
        except ConfigError as exc:
            assert_one_line(exc)
            assert names_yaml_field(exc, text, str(Path(tmp) / "junk-recipe.yaml")), exc.field
        finally:
            if old is None:
                os.environ.pop("TTT_RECIPES_DIR")
            else:
                os.environ["TTT_RECIPES_DIR"] = old


# -- sweep files ----------------------------------------------------------------------------------------

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0, 1, 2, 1e-300, 1e300]),
)
parameters = st.fixed_dictionaries(
    {"name": field_names},
    optional={
        "values": st.lists(junk, max_size=3) | junk,
        "min": numbers | junk,
        "max": numbers,
        "step": numbers,
        "num": st.integers(min_value=-2, max_value=2**40) | junk,
        "scale": st.sampled_from(["linear", "log", "LOG", ""]) | junk,
        "extra": junk,
    },
)
sweep_docs = st.fixed_dictionaries(
    {"parameters": st.lists(parameters, max_size=3) | junk},
    optional={
        "name": st.sampled_from(["sweep", "", "A", "-x", "a" * 50]) | st.text(max_size=8),
        "overrides": st.lists(override_items, max_size=2) | junk,
        "algorithm": st.sampled_from(["grid", "random", "bayes"]) | junk,
        "max_trials": st.integers(min_value=-1, max_value=2**40) | junk,
        "parallelism": st.integers(min_value=-1, max_value=5) | junk,
        "objective": st.fixed_dictionaries({}, optional={"metric": st.text(max_size=10), "goal": junk})
        | junk,
        "early_stopping": st.fixed_dictionaries(
            {}, optional={"method": junk, "grace_period": junk, "reduction_factor": numbers}
        )
        | junk,
        "skip_invalid": st.booleans() | junk,
        "seed": numbers,
        "unknown": junk,
    },
)
SWEEP_KEYS = {"parameters", "name", "base", "overrides", "algorithm", "max_trials", "parallelism"}
SWEEP_KEYS |= {"objective", "early_stopping", "skip_invalid", "seed", "sweep"}


@generated(100)
@given(sweep_docs)
def test_generated_sweeps_expand_or_name_the_field(doc):
    try:
        spec = sweepmod.from_dict(doc)
        expansion = sweepmod.expand(spec, TINY)
    except ConfigError as exc:
        assert_one_line(exc)
        top = exc.field.split(".")[0].split("[")[0]
        assert top in SWEEP_KEYS or exc.field in FIELDS or exc.field in doc, (exc.field, doc)
    else:
        assert 1 <= len(expansion.trials) <= sweepmod.MAX_TRIALS
        for trial in expansion.trials:
            assert isinstance(trial.config, cfgmod.JobConfig)


def test_a_sweep_file_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parameters: [\n  - name: x\n")
    with pytest.raises(ConfigError) as info:
        sweepmod.load_any(str(path))
    assert_one_line(info.value)
    assert info.value.field == str(path) and "line" in info.value.message


# -- `ttt data prepare` ---------------------------------------------------------------------------------

TEXT = "def f():\n    return 'héllo'  # ü\n" * 3
contents = st.one_of(
    st.text(max_size=200).map(lambda t: t.replace("\0", "").encode()),  # text of any script
    st.binary(max_size=200),  # mostly not text
    st.sampled_from(
        [
            b"",
            TEXT.encode(),
            b"\xef\xbb\xbf" + TEXT.encode(),  # UTF-8 with a BOM: text
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",  # binary
            b"caf\xe9 cr\xe8me",  # Latin-1: not UTF-8
            TEXT.encode() + b"\0" + TEXT.encode(),
        ]
    ),
)
file_names = st.tuples(
    st.text(alphabet="abcdefghij_-é名", min_size=1, max_size=8),
    st.sampled_from([".txt", ".pm", ".py", ".bin", "", ".png", ".tar.gz", ".PY"]),
).map("".join)


def is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@generated(40)
@given(
    st.dictionaries(file_names, contents, max_size=6),
    st.integers(min_value=-3, max_value=25),
    st.lists(st.sampled_from(["folder", "missing", "", "one-file"]), min_size=1, max_size=2),
)
def test_generated_prepare_inputs_make_a_dataset_or_name_the_problem(files, val_every, inputs):
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for name, data in files.items():
            (docs / name).write_bytes(data)
        where = {
            "folder": str(docs),
            "missing": str(Path(tmp) / "nope"),
            "": "",
            "one-file": str(next(iter(sorted(docs.iterdir())), docs)),
        }
        paths = list(dict.fromkeys(where[i] for i in inputs))
        try:
            meta = prepare(paths, str(Path(tmp) / "ds"), ByteTokenizer(), val_every)
        except UserError as exc:
            assert_one_line(exc)
            assert not (Path(tmp) / "ds").exists()  # nothing half-written
        else:
            # Every text file is a document whatever its extension; binaries are skipped and counted.
            texts = sum(is_text(d) for d in files.values())
            assert meta["documents_train"] + meta["documents_val"] == texts
            assert meta["files_skipped"] == len(files) - texts
            assert open_dataset(str(Path(tmp) / "ds")).split("train")


def test_prepare_takes_text_of_any_extension_and_counts_binaries(tmp_path):
    docs = tmp_path / "docs"
    (docs / "lib").mkdir(parents=True)
    (docs / "lib" / "Util.pm").write_text("package Util;\nsub f { return 1; }\n1;\n")
    (docs / "README").write_text("no extension, still text\n")
    (docs / "bom.txt").write_bytes(b"\xef\xbb\xbftext after a byte order mark\n")
    (docs / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (docs / "latin1.txt").write_bytes(b"caf\xe9\n")
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden folders are not documents
    meta = prepare([str(docs)], str(tmp_path / "ds"), ByteTokenizer(), val_every=2)
    assert meta["documents_train"] + meta["documents_val"] == 3
    assert meta["files_skipped"] == 2
    tokens = open_dataset(str(tmp_path / "ds"))
    text = bytes(t for t in np.concatenate([tokens.split(s)[:] for s in ("train", "val")]) if t < 256)
    assert b"package Util;" in text and b"no extension" in text and b"PNG" not in text


def test_prepare_refuses_a_hold_out_period_below_two(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("text\n")
    for val_every in (0, 1, -5):  # 0 divided by zero; 1 held out every document, leaving none to train on
        with pytest.raises(DataError, match="val_every") as info:
            prepare([str(tmp_path)], str(tmp_path / "ds"), ByteTokenizer(), val_every=val_every)
        assert_one_line(info.value)
        assert not (tmp_path / "ds").exists()


# -- data.path --------------------------------------------------------------------------------------------


@generated(20)
@given(st.sampled_from(["file", "missing", "empty-dir", "dataset"]) | st.text(max_size=12))
def test_generated_data_paths_open_or_say_what_is_wrong(kind):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "file").write_text("not a dataset")
        (base / "empty-dir").mkdir()
        write_dataset(base / "dataset", {"train": np.arange(9, dtype=np.uint16)}, {})
        location = str(base / kind) if kind in ("file", "missing", "empty-dir", "dataset") else kind
        try:
            open_dataset(location).split("train")
        except UserError as exc:
            assert location in assert_one_line(exc)


def test_a_data_path_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "train.npy").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        open_dataset(str(tmp_path / "train.npy"))
    message = assert_one_line(info.value)
    assert "is a file, not a dataset directory" in message and "does not exist" not in message
    assert message.startswith("data.path: ")  # the field to fix


def test_an_s3_data_path_that_is_an_object_is_named_as_such(monkeypatch, tmp_path):
    moto = pytest.importorskip("moto")  # a dev dependency: present in every test install
    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path / "cache"))
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="sets/tiny/train.npy", Body=b"x")
        with pytest.raises(DataError) as info:
            open_dataset("s3://data/sets/tiny/train.npy")
        assert "is an object, not a prefix" in assert_one_line(info.value)
        with pytest.raises(DataError, match="has no streams"):
            open_dataset("s3://data/sets/none")


# -- the real CLI: what reaches the user ------------------------------------------------------------------


def ttt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ttt", *args], capture_output=True, text=True, timeout=120, cwd=cwd or ROOT
    )


def test_workers_zero_is_refused_before_training(tmp_path):
    """`--workers 0` used to be dropped (falsy) and train on one worker."""
    proc = ttt("train", "tiny-cpu", "--workers", "0", "--set", f"storage.root={tmp_path}", "--no-progress")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttt: config error: scale.workers:"), proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_bad_files_reach_the_user_as_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.txt"):
        (docs / name).write_text("text\n")
    for args in (
        ("config", str(bad)),
        ("sweep", str(bad), "--dry-run"),
        ("data", "prepare", str(docs), "--output", str(tmp_path / "ds"), "--val-every", "0"),
    ):
        proc = ttt(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
