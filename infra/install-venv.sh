#!/usr/bin/env bash
# Create the project virtualenv (if absent) and install the project into it.
#   infra/install-venv.sh [VENV] [EXTRAS]    EXTRAS default: dev (tests and tools, with the `train` extra);
#   "train" for the trainer alone. (The operator alone needs no torch: `pip install .`.)
#
# torch comes first and is then pinned for every later install: on a CPU machine the 2.13.0 CPU build
# (any other version would pull gigabytes of CUDA wheels); on a GPU image whose python already has a CUDA
# torch, the venv sees that one (system site packages) and keeps it.
set -euo pipefail

venv=${1:-.venv}
extras=${2:-dev}
python=${PYTHON:-python3}
cpu_torch="torch==2.13.0"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "install-venv: Python >= 3.10 is required ($("$python" --version))" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c 'import torch' 2>/dev/null; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -c 'import torch' 2>/dev/null || "$py" -m pip install -q "$cpu_torch"

constraints="$venv/torch-constraint.txt"
"$py" -W ignore -c 'import torch; print(f"torch=={torch.__version__}")' > "$constraints"
"$py" -m pip install -q -c "$constraints" -e ".[$extras]"
echo "install-venv: $("$py" -c 'import torch; print("torch", torch.__version__)') in $venv"
