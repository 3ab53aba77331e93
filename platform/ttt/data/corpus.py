"""Datasets from text: `ttt data prepare`, and the bundled corpus built from the Python standard library.

Each input file is one document; documents are concatenated with BOS before each one, and every
`val_every`-th document is held out for validation (so validation text is never seen in training).
"""

from __future__ import annotations

import codecs
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ttt.data.streams import DataError, upload_dataset, write_dataset
from ttt.data.tokenizer import ByteTokenizer, Tokenizer
from ttt.storage import cache_dir

SNIFF_BYTES = 8192
"""How much of a file decides whether it is text: a NUL byte or invalid UTF-8 there makes it binary."""


def is_text(path: Path) -> bool:
    """Text whatever the extension (Perl .pm, a README): the leading chunk decodes as strict UTF-8 (a BOM
    is valid UTF-8) and holds no NUL byte. Latin-1 files and other encodings count as binary."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:  # a chunk shorter than the file may end inside a multi-byte character
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return False
    return True


def find_documents(inputs: Iterable[str | Path]) -> tuple[list[Path], int]:
    """The text files among `inputs` (files, and folders searched recursively, hidden entries left out),
    and how many files were skipped as binary."""
    candidates: list[Path] = []
    for text in map(str, inputs):
        item = Path(text)
        if not text.strip():
            raise DataError("an input is an empty path: name a text file or a folder")
        if item.is_dir():
            candidates += sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
        elif item.is_file():
            candidates.append(item)
        else:
            raise DataError(f"input '{item}' does not exist")
    files = [p for p in dict.fromkeys(candidates) if is_text(p)]
    skipped = len(dict.fromkeys(candidates)) - len(files)
    if not files:
        where = ", ".join(map(str, inputs))
        raise DataError(f"no text files found in {where} ({skipped} binary files skipped)")
    return files, skipped


def build_streams(
    files: list[Path], tokenizer: Tokenizer, val_every: int = 20
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    if val_every < 2:  # 1 would hold out every document and leave none to train on
        raise DataError(f"val_every: {val_every} must be at least 2 (every N-th document is held out)")
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


def check_replaceable(folder: Path) -> None:
    """The output folder is replaced as a whole: refuse one that holds anything but an earlier dataset
    (an --output pointed at the sources, or at a home folder, must not delete them)."""
    if folder.is_file():
        raise DataError(f"--output: '{folder}' is a file; give a new folder or an earlier dataset's")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "meta.json").is_file():
        raise DataError(
            f"--output: '{folder}' holds files that are not a prepared dataset (no meta.json); it would be "
            "replaced as a whole: give a new or empty folder"
        )


def prepare(
    inputs: list[str], output: str, tokenizer: Tokenizer, val_every: int = 20, source: str | None = None
) -> dict:
    """Tokenize text files/folders into `output` (a folder or s3:// prefix); returns the metadata."""
    if not output.startswith("s3://"):
        check_replaceable(Path(output))
    files, skipped = find_documents(inputs)
    splits, counts = build_streams(files, tokenizer, val_every)
    meta = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "dtype": str(splits["train"].dtype),
        "tokens_train": int(splits["train"].size),
        "tokens_val": int(splits["val"].size),
        **counts,
        "files_skipped": skipped,  # binaries (not UTF-8 text) found in the inputs
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
