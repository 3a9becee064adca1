# eenn: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: help install demo test test-all lint bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install eenn with its dev tools

demo: $(STAMP) ## train a multi-exit ResNet-20 on the bundled digits and print per-exit accuracy
	$(BIN)/eenn-train data=digits backbone=resnet20 exits=stages trainer.max_epochs=15

test: $(STAMP) ## run the test suite (slow and browser tests deselected)
	$(BIN)/python -m pytest

test-all: $(STAMP) ## run every test, slow and browser ones included
	$(BIN)/python -m pytest -m ''

lint: $(STAMP) ## ruff
	$(BIN)/ruff check eenn tests benchmarks

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
