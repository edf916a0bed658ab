# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
# The venv is (re)installed only when setup.py or pyproject.toml change (stamp file).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlmfast-installed
# A CUDA build of torch that runs on the CPU; torchvision is needed by the Qwen2.5-VL processor.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

export HF_HUB_OFFLINE := 1
export TRITON_DEFAULT_FP_FUSION := 1

.PHONY: demo test test-fast lint bench inspect-kernels clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN) wheel "setuptools>=64"
	$(PIP) --no-build-isolation -e ".[dev]" $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vlmfast.cli demo

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not aot"

lint: $(STAMP)
	$(PY) -m ruff check vlmfast kernels tests bench

bench: $(STAMP)
	$(PY) -m bench

inspect-kernels: $(STAMP)
	$(PY) -m vlmfast.kernels.inspect

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
