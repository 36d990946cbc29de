# Every target bootstraps .venv on first use; the stamp files make a second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check --quiet
# torch is pinned only here (pyproject keeps torch>=2.4): 2.13.0 is the CPU build on this machine's disk.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.stamp-dev
DOCS_STAMP := $(VENV)/.stamp-docs
PYTEST := $(PY) -m pytest
# Triton kernels are tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set
# before triton is imported, so the kernel tests run in a pytest process of their own).
PYTEST_ARGS ?= -q

.PHONY: demo test test-all bench bench-quick gpu-check docs lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -c .ci/constraints.txt -e ".[dev,gpu,rl,bench]"
	# backpack (via curvlinops) pulls the registry's torchvision, which fails to import beside the CPU
	# torch and breaks `import transformers`; neither curvlinops nor backpack needs it.
	$(PIP) uninstall -y torchvision
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PIP) install -c .ci/constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/curvopt bench --problem softmax --threads 1

test: $(STAMP)
	TRITON_INTERPRET=1 $(PYTEST) $(PYTEST_ARGS) -m "not slow" tests/kernels
	$(PYTEST) $(PYTEST_ARGS) -m "not slow" --ignore=tests/kernels

# test-all also runs the property-based tests (tests/fuzz) with a large example budget.
test-all: $(STAMP)
	TRITON_INTERPRET=1 $(PYTEST) $(PYTEST_ARGS) tests/kernels
	HYPOTHESIS_PROFILE=thorough $(PYTEST) $(PYTEST_ARGS) --ignore=tests/kernels

# Full runs take tens of minutes and refresh the figures under docs/img; `make bench-quick` is a
# smoke run (a few minutes) that writes its figures under results/quick instead.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

# Every GPU figure in one command (benchmarks/gpu_check.py: five parts with their own budgets, under
# 8 minutes on an H200; report in results/gpu/). Without CUDA it is a dry run of well under a minute
# (also run by `make test`). On the GPU machine, which has its own Python and no registry access,
# skip the venv and run from the source tree:  CURVOPT_NO_VENV=1 make gpu-check
GPU_CHECK_PY = $(if $(CURVOPT_NO_VENV),$(PYTHON),$(PY))
GPU_CHECK_ARGS ?=

gpu-check: $(if $(CURVOPT_NO_VENV),,$(STAMP))
	PYTHONPATH=. $(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# mkdocstrings reads the source statically and cannot follow the package-dir mapping of kernels/,
# so the docs are built from a plain (non-editable) copy of the package under build/docs-pkg.
docs: $(DOCS_STAMP)
	rm -rf build/docs-pkg
	$(PIP) install --no-deps --no-build-isolation --target build/docs-pkg .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) site build *.egg-info
