"""Where every benchmark writes: its own marked block of a Markdown file (RESULTS.md)."""

from __future__ import annotations


def write_block(path: str, name: str, table: str, heading: str) -> None:
    """Replace the block between `<!-- name:begin -->` and `<!-- name:end -->` in `path`, keeping the notes
    around it; a file without the block gets it appended under `heading`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{table}{end}\n"
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        text = ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text + ("\n" if text else "") + f"## {heading}\n\n" + block
    with open(path, "w") as fh:
        fh.write(text)
