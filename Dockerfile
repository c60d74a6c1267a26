# The submission image: `onegpu serve` on port 80 (the challenge harness maps it with -p 808N:80), as
# the non-root user `onegpu` (uid 10001), on a merged litgpt checkpoint baked into /models/model.
#
# This is the template of `onegpu submission pack`, which writes the model step below for its
# --weights route (embed / hub:ORG/NAME@REV / wandb:ENTITY/PROJECT/NAME:VERSION) and the ARG defaults
# into the folder it packs. In that folder, the organizers run
#     docker build -t onegpu-submission .     (hub/W&B routes: plus the --secret the folder's README names)
#     docker run --gpus all -p 8080:80 onegpu-submission
# and nothing else: no volume, no API key, no flag.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# TOKENIZERS_PARALLELISM is not a secret (hadolint matches "TOKEN" in names)
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
# Only what `onegpu serve` imports (the `serve` extra, every version pinned by requirements.txt), with
# pip held to the base image's torch: its CUDA build is kept, and the build fails if it would change.
COPY pyproject.toml README.md requirements.txt ./
COPY onegpu/ onegpu/
COPY data/ data/
COPY finetune/ finetune/
COPY eval/ eval/
COPY submission/ submission/
COPY sweeps/ sweeps/
ARG ONEGPU_EXTRAS=serve
RUN pip list --format=freeze | grep -i '^torch==' > /app/base-torch.txt \
    && pip install --no-cache-dir -c /app/base-torch.txt -r requirements.txt ".[${ONEGPU_EXTRAS}]" \
    && pip list --format=freeze | grep -i '^torch==' | cmp - /app/base-torch.txt \
    && onegpu --help > /dev/null \
    && useradd --no-log-init --create-home --uid 10001 --shell /usr/sbin/nologin onegpu

# >>> model
# --weights embed: the merged checkpoint in this folder's model/; nothing is fetched, at build or
# at start.
COPY model/ /models/model/
# <<< model

ARG PROMPT_STYLE=auto
ARG QUANTIZE=""
ARG DTYPE=auto
ARG POSTPROCESS=""
ARG MAX_BATCH_SIZE=16
# `onegpu serve` reads its options from these when no flag is given (submission/server.py).
ENV ONEGPU_CHECKPOINT=/models/model \
    ONEGPU_PROMPT_STYLE=${PROMPT_STYLE} \
    ONEGPU_QUANTIZE=${QUANTIZE} \
    ONEGPU_DTYPE=${DTYPE} \
    ONEGPU_POSTPROCESS=${POSTPROCESS} \
    ONEGPU_MAX_BATCH_SIZE=${MAX_BATCH_SIZE}

# Port 80 as a non-root user: Docker >= 20.10 and podman set net.ipv4.ip_unprivileged_port_start=0
# inside the container.
USER 10001
EXPOSE 80
# The harness polls for up to ~20 min; loading a 7B model takes ~1-2 min.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:80/health', timeout=8).status != 200)"]

CMD ["onegpu", "serve", "--host", "0.0.0.0", "--port", "80"]
