# The submission image: `onegpu serve` on port 80 (the challenge harness maps it with -p 808N:80).
#
# Weights never come from the build context (.dockerignore keeps them out). Pick ONE source:
#   hub model, fetched and converted at build:
#     docker build -t onegpu-submission --build-arg MODEL_ID=meta-llama/Llama-2-7b-hf \
#       --secret id=hf_token,env=HF_TOKEN .
#   W&B model artifact (merged checkpoint or adapter), fetched at start:
#     docker build -t onegpu-submission --build-arg WANDB_ARTIFACT=team/project/model:v3 .
#     docker run --gpus all -e WANDB_API_KEY -p 8080:80 onegpu-submission
#   a LoRA adapter artifact on top of a hub base: both MODEL_ID and WANDB_ARTIFACT (the base is
#     converted at build into /models/base and the adapter is merged into it at start)
#   a local checkpoint dir, mounted at run time:
#     docker run --gpus all -v /path/to/out/final:/models/model:ro -p 8080:80 onegpu-submission
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# TOKENIZERS_PARALLELISM is not a secret (hadolint matches "TOKEN" in names)
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    WANDB_MODE=online \
    ONEGPU_CACHE=/models/cache

WORKDIR /app

# Dependencies first (a code change does not reinstall torch), then the kit itself.
# requirements.txt: the pins `onegpu submission pack` writes (absent in the repo: the glob matches none)
COPY pyproject.toml README.md requirements.tx[t] ./
COPY onegpu/ onegpu/
COPY data/ data/
COPY finetune/ finetune/
COPY eval/ eval/
COPY submission/ submission/
COPY sweeps/ sweeps/
RUN if [ -f requirements.txt ]; then pip install --no-cache-dir -r requirements.txt; fi \
    && pip install --no-cache-dir . && onegpu --help > /dev/null

ARG MODEL_ID=""
ARG WANDB_ARTIFACT=""
ARG PROMPT_STYLE=auto
ARG QUANTIZE=""
ARG DTYPE=auto
ARG POSTPROCESS=""
ARG MAX_BATCH_SIZE=16

# Build-time fetch of a hub model (HF_TOKEN as a build secret for gated models; never in a layer).
RUN --mount=type=secret,id=hf_token \
    if [ -n "${MODEL_ID}" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
      onegpu model prepare "${MODEL_ID}" --checkpoint_dir /models/base; \
    fi

# `onegpu serve` reads its model source from these when no flag is given (submission/server.py):
# ONEGPU_WANDB_ARTIFACT if set (an adapter in it merges into /models/base), else ONEGPU_CHECKPOINT:
# /models/base when MODEL_ID was built, else /models/model (mount a checkpoint there).
ENV ONEGPU_WANDB_ARTIFACT=${WANDB_ARTIFACT} \
    ONEGPU_BASE_CHECKPOINT=${MODEL_ID:+/models/base} \
    ONEGPU_CHECKPOINT=${MODEL_ID:+/models/base} \
    ONEGPU_PROMPT_STYLE=${PROMPT_STYLE} \
    ONEGPU_QUANTIZE=${QUANTIZE} \
    ONEGPU_DTYPE=${DTYPE} \
    ONEGPU_POSTPROCESS=${POSTPROCESS} \
    ONEGPU_MAX_BATCH_SIZE=${MAX_BATCH_SIZE}
ENV ONEGPU_CHECKPOINT=${ONEGPU_CHECKPOINT:-/models/model}

EXPOSE 80
# The harness polls for up to ~20 min; loading a 7B model takes ~1-2 min.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:80/health', timeout=8).status != 200)"]

CMD ["onegpu", "serve", "--host", "0.0.0.0", "--port", "80"]
