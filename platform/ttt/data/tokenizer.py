"""Tokenizers: bytes by default (nothing to download), or a Hugging Face tokenizer file the user has."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_token_id: int

    def encode(self, text: str | bytes) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, and 256 as BOS (a document separator the loss leaves out)."""

    name = "byte"
    vocab_size = 257
    bos_token_id = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` (e.g. Llama-3's) read with the `tokenizers` library; no hub access."""

    def __init__(self, path: str | Path, bos_token: str = "<|begin_of_text|>"):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ValueError(
                "a Hugging Face tokenizer needs the 'tokenizers' package: pip install 'ttt-platform[hf]'"
            ) from None
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"no tokenizer file at '{file}' (expected a tokenizer.json or a folder with one)"
            )
        self._tok = _Tokenizer.from_file(str(file))
        bos = self._tok.token_to_id(bos_token)
        if bos is None:
            raise ValueError(f"'{bos_token}' is not a token of {file}; name the BOS token with --bos-token")
        self.name = str(file)
        self.bos_token_id = bos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(spec: str, bos_token: str = "<|begin_of_text|>") -> Tokenizer:
    """'byte' or a path to a tokenizer.json (or a folder holding one)."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec, bos_token)
