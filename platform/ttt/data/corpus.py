"""Datasets from text: `ttt data prepare`, and the bundled corpus built from the Python standard library.

Each input file is one document; documents are concatenated with BOS before each one, and every
`val_every`-th document is held out for validation (so validation text is never seen in training).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ttt.data.streams import DataError, upload_dataset, write_dataset
from ttt.data.tokenizer import ByteTokenizer, Tokenizer
from ttt.storage import cache_dir

# Files in a folder that count as documents (a file named explicitly always counts).
TEXT_SUFFIXES = (
    ".txt",
    ".md",
    ".rst",
    ".tex",
    ".html",
    ".xml",
    ".json",
    ".jsonl",
    ".csv",
    ".yaml",
    ".yml",
    ".toml",
    ".py",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".rs",
    ".go",
    ".java",
    ".js",
    ".ts",
    ".sh",
)


def find_documents(inputs: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in suffixes)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"input '{item}' does not exist")
    if not files:
        raise DataError(f"no text files ({', '.join(suffixes)}) found in {', '.join(map(str, inputs))}")
    return files


def build_streams(
    files: list[Path], tokenizer: Tokenizer, val_every: int = 20
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    if len(files) < 2:
        raise DataError("need at least two documents: one for training and one for validation")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for i, path in enumerate(files):
        ids = [tokenizer.bos_token_id, *tokenizer.encode(path.read_bytes())]
        held_out = i % val_every == val_every - 1 or (i == len(files) - 1 and len(files) < val_every)
        parts["val" if held_out else "train"].append(np.asarray(ids, dtype=dtype))
    splits = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    counts = {"documents_train": len(parts["train"]), "documents_val": len(parts["val"])}
    return splits, counts


def prepare(
    inputs: list[str], output: str, tokenizer: Tokenizer, val_every: int = 20, source: str | None = None
) -> dict:
    """Tokenize text files/folders into `output` (a folder or s3:// prefix); returns the metadata."""
    files = find_documents(inputs)
    splits, counts = build_streams(files, tokenizer, val_every)
    meta = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "dtype": str(splits["train"].dtype),
        "tokens_train": int(splits["train"].size),
        "tokens_val": int(splits["val"].size),
        **counts,
        "source": source or ", ".join(map(str, inputs)),
    }
    if output.startswith("s3://"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_dataset(Path(tmp) / "dataset", splits, meta)
            upload_dataset(Path(tmp) / "dataset", output)
    else:
        write_dataset(Path(output), splits, meta)
    return meta


def bundled_corpus(name: str) -> Path:
    """Build (once, into the cache) and return the folder of a bundled corpus."""
    if name != "stdlib":
        raise DataError(f"unknown bundled corpus '{name}' (available: bundled:stdlib)")
    version = sysconfig.get_python_version()
    folder = cache_dir() / "corpus" / f"stdlib-py{version}"
    if not (folder / "meta.json").is_file():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(
            p for p in stdlib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)
        )
        splits, counts = build_streams(files, ByteTokenizer(), val_every=20)
        write_dataset(
            folder,
            splits,
            {
                "tokenizer": "byte",
                "vocab_size": 257,
                "bos_token_id": 256,
                "dtype": "uint16",
                "tokens_train": int(splits["train"].size),
                "tokens_val": int(splits["val"].size),
                **counts,
                "source": f"Python {version} standard library sources",
            },
        )
    return folder
