#!/usr/bin/env bash
# Wheels the GPU checks need beyond a CUDA PyTorch image without a package index (pydantic and its parts;
# numpy, pyyaml, triton and pytest are there), for CPython 3.12 on x86-64, into .whl/ (git-ignored).
# The versions are the ones the project's venv resolved. infra/gpu-check.sh installs them there.
set -euo pipefail

dest=${1:-.whl}
py=${PY:-.venv/bin/python}
pins=$("$py" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
mkdir -p "$dest"
# shellcheck disable=SC2086  # one word per pin
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" $pins
echo "device-wheels: $(ls "$dest" | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))"
