# Set-up: `make demo` (installs, writes demo data, trains, evaluates) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint venv venv-test venv-gpu venv-tpu bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# Test extras: torch (CPU build) for parity tests and Triton's interpreter, triton + jax-triton,
# libtpu for TPU-topology compiles, and the CUDA plugin (--no-deps) so jax-triton imports on CPU
# and kernels lower for CUDA without a GPU.
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps "jax-cuda12-plugin==$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)')"
	touch $(VENV)/.installed $@

# Accelerator extras for cluster launches (launch/slurm_gpu.sbatch, launch/tpu_pod.sh).
$(VENV)/.installed-gpu $(VENV)/.installed-tpu: $(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[$*]'
	touch $(VENV)/.installed $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test
venv-gpu: $(VENV)/.installed-gpu
venv-tpu: $(VENV)/.installed-tpu

# Lint and format first: CI (which runs `make test`) fails on either before spending time on tests.
lint: venv-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -q

demo: venv
	$(PY) -m launch.demo --config configs/demo.py --workdir runs/demo --data data/demo

clean:
	rm -rf $(VENV) runs data/demo
