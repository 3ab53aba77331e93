# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-gpu chart clean

install: $(STAMP)

$(STAMP): pyproject.toml infra/install-venv.sh infra/install-helm.sh
	infra/install-venv.sh $(VENV) dev
	infra/install-helm.sh $(VENV)
	@touch $@

demo: install
	$(VENV)/bin/ttt demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/meta_step.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/meta_step.py --compare-full --preset tiny --shapes 256:32:64 512:32:64 --batch 2 \
	  --repeats 5 --write benchmarks/RESULTS.md
	$(PY) benchmarks/workers.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/inference.py --write benchmarks/RESULTS.md
	TRITON_INTERPRET=1 $(PY) benchmarks/kernels.py --device cpu --write benchmarks/RESULTS.md

# On a CUDA machine: the kernels against the golden reference, then the GPU tables of issue 9 and 8.
bench-gpu: install
	$(PY) -m ttt parity tests/data/golden_tiny_fp32.npz --device cuda --set model.chunk_kernel=triton
	$(PY) benchmarks/kernels.py --device cuda --write benchmarks/RESULTS.md
	$(PY) benchmarks/meta_step.py --compare-full --preset 125m --shapes 8192:1024:8192 32768:1024:8192 \
	  --batch 1 --device cuda --write benchmarks/RESULTS.md
	$(PY) benchmarks/inference.py --preset 125m --device cuda --write benchmarks/RESULTS.md \
	  --contexts 8192,16384,32768,65536,131072

# The Helm chart: lint (helm keeps its cache and config inside the venv, not in the home folder), then its tests.
chart: install
	HELM_CACHE_HOME=$(VENV)/helm-home/cache HELM_CONFIG_HOME=$(VENV)/helm-home/config \
	  HELM_DATA_HOME=$(VENV)/helm-home/data $(VENV)/bin/helm lint --strict charts/ttt-platform
	$(PY) -m pytest -q tests/chart

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache platform/*.egg-info
