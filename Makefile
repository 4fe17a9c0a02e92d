# make test   — create/reuse .venv, install torch and the dependencies, build the extension and the docs, run the tests
# make demo   — the same setup, then run the main job (examples/lora_training.hy; builds the default model once)
# make fuzz   — the same setup, then the fuzz suite with many more examples, and its figures
# make docs   — the same setup, then build the documentation (docs/, mkdocs.yml) into build/site/, strictly
# Override the torch requirement for another platform, e.g. `make test TORCH_SPEC="torch==2.13.0+cu128"`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# torch loads every installed device-backend plugin at import; bitsandbytes (a test extra, for the NF4 comparison)
# registers one that prints a notice about optional CPU kernels on every `import torch`. The commands here need no
# such plugin.
export TORCH_DEVICE_BACKEND_AUTOLOAD ?= 0
DEPS_STAMP := $(VENV)/.deps.stamp
BUILD_STAMP := $(VENV)/.build.stamp
# Subpackages too: the editable install maps the package tree it saw when it was made.
SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.h) CMakeLists.txt cmake/lispetorchConfig.cmake pyproject.toml \
	$(wildcard lispetorch/*/__init__.py lispetorch/*/*/__init__.py)

.PHONY: all build test fuzz demo bench docs clean

all: build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and on its own, so that nothing after it can pull another torch build.
$(DEPS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "scikit-build-core>=0.10" ninja
# hy comes as a source distribution whose build imports funcparserlib: it builds in pip's isolated environment
# here, since the editable install below runs without isolation.
	$(BIN)/python -m pip install -q "hy>=1.0"
	touch $@

# Editable install with a persistent build directory (build/): rebuilds are incremental.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,docs]"
	touch $@

build: $(BUILD_STAMP)

# lint-imports: the package's layers (the contract in pyproject.toml) before anything else.
test: build docs
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzz suite with many more examples (tests/conftest.py's "fuzz" profile); the outcomes by input kind are printed
# as a table at the end (and kept in build/fuzz-stats.json).
fuzz: build
	mkdir -p build
	HYPOTHESIS_PROFILE=fuzz LISPETORCH_FUZZ_STATS=build/fuzz-stats.json $(BIN)/python -m pytest -q tests/test_fuzz.py
	$(BIN)/python tests/test_fuzz.py build/fuzz-stats.json

# Strict: any warning (a broken link or anchor, an API name that no longer resolves) fails the build. Not --quiet,
# which hides the warnings and with them the failure. The API pages are read from the sources, not imported. Then
# the README's links into docs/, which MkDocs does not see.
docs: build
	$(BIN)/mkdocs build --strict
	@for f in $$(grep -o '](docs/[^)#]*' README.md | cut -c3-); do \
		test -f "$$f" || { echo "README.md: no such file: $$f" >&2; exit 1; }; done

demo: build
	$(BIN)/lispetorch run examples/lora_training.hy

bench: build
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_methods.py
	$(BIN)/python benchmarks/bench_combine.py
	$(BIN)/python benchmarks/bench_merged_export.py
	$(BIN)/python benchmarks/bench_adapter_loading.py
	$(BIN)/python benchmarks/bench_checkpointing.py
	$(BIN)/python benchmarks/bench_compile.py
	$(BIN)/python benchmarks/bench_mixed_batches.py
	$(BIN)/python benchmarks/bench_experts.py

clean:
	rm -rf build $(BUILD_STAMP)
