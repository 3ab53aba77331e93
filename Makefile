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
	$(PY) benchmarks/tracking.py --write benchmarks/RESULTS.md
	TRITON_INTERPRET=1 $(PY) benchmarks/kernels.py --device cpu --write benchmarks/RESULTS.md
	$(PY) benchmarks/kernels.py --compile --write benchmarks/RESULTS.md

# On a CUDA machine (no install step: a GPU image may have no package index; see infra/gpu-check.sh).
bench-gpu:
	infra/gpu-check.sh

# The Helm chart: lint (helm keeps its cache and config inside the venv, not in the home folder), then its tests.
chart: install
	HELM_CACHE_HOME=$(VENV)/helm-home/cache HELM_CONFIG_HOME=$(VENV)/helm-home/config \
	  HELM_DATA_HOME=$(VENV)/helm-home/data $(VENV)/bin/helm lint --strict charts/ttt-platform
	$(PY) -m pytest -q tests/chart

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache platform/*.egg-info
