# eenn: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: help install demo test test-all test-slow test-slurm test-browser lint bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install eenn with its dev tools

demo: $(STAMP) ## the main job on the bundled digits: train, fit every policy over a budget sweep, compare
	$(BIN)/eenn-pipeline exits=early

test: $(STAMP) ## run the test suite (slow and browser tests deselected)
	$(BIN)/python -m pytest

test-all: $(STAMP) ## run every test, slow, slurm and browser ones included
	$(BIN)/python -m pytest -m ''

lint: $(STAMP) ## ruff: the lint rules and the formatting (ruff format --check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache

test-slow: $(STAMP) ## only the tests marked slow (subprocess CLI runs, DDP, submitit sweeps)
	$(BIN)/python -m pytest -m slow

test-browser: $(STAMP) ## the browser test: report.html screenshotted by a headless chromium, which must be installed (it fails, not skips, without one)
	EENN_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -m browser -rs

test-slurm: $(STAMP) ## the cluster tests: sweeps, requeue and 2-task DDP on a one-node Slurm that scripts/local_slurm.sh starts (root: it apt-installs Slurm)
	$(BIN)/python -m pytest -m slurm

bench: $(STAMP) ## run every benchmark the README quotes, as it quotes it (about 12 h on 2 CPU cores; results in benchmarks/results/)
	$(BIN)/python benchmarks/train_speed.py --compile
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/budget_aware.py                 # every arm tuned alike, then 5 seeds each (hours)
	$(BIN)/python benchmarks/budget_aware.py --stage curve   # the learning-curve check, then the JSON with it
	# risk control and EENet's detach choice on the study's joint tuning run (its seed is never reported)
	$(BIN)/python benchmarks/risk_control.py --draws 1000 --run-dir outputs/bench_budget_aware_v2/tune/joint_lr0.2_s100
	$(BIN)/python benchmarks/policy_quality.py --eenet-detach --seeds 3 --threads 1 \
		--run-dir outputs/bench_budget_aware_v2/tune/joint_lr0.2_s100
	$(BIN)/python benchmarks/fit_speed.py
	$(BIN)/python benchmarks/inference_speed.py --threads 1 --compile
	$(BIN)/python benchmarks/deploy_speed.py
	$(BIN)/python benchmarks/policy_quality.py --epochs 12
	$(BIN)/python benchmarks/reliability.py
	$(BIN)/python benchmarks/fit_memory.py
	$(BIN)/python benchmarks/eenet_resnet56_short.py --epochs 10 --cost flops --run-dir outputs/bench_eenet_resnet56_b \
		--override 'training.scheduler.milestones=[6,8]' --override training.warmup_epochs=0
