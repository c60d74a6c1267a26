"""The engine of ``onegpu submission pack`` (its options and checks: ``submission/pack.py``): the model
source resolved, the serving memory estimated against the track, the folder written and verified.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import torch
import yaml
from litgpt import GPT, Config
from packaging.requirements import Requirement

from onegpu.checkpoints import WANDB_PREFIX, locate_checkpoint
from onegpu.contracts import (TRACKS, TrackSpec, atomic_path, atomic_write_json, model_input, read_json, read_yaml,
                              staged_dir)
from onegpu.errors import UserError
from onegpu.inference import resolve_prompt_style
from onegpu.model import prepare
from onegpu.paths import REPO_ROOT, cache_dir
from onegpu.submission.launch import free_port, running_server
from onegpu.submission.vllm_env import vllm_requirement
from onegpu.submission.weights import MODEL_DIR, WeightsRoute, embed_checkpoint, parse_route, pin_revision

DOCKERFILES = {"onegpu": "Dockerfile", "vllm": "Dockerfile.vllm"}  # the template of each engine's image
VLLM_IMAGE = "vllm/vllm-openai"  # tagged v<the version of the kit's `vllm` extra>
# In vLLM's image the kit's venv sees the base's packages; these the kit's stack imports when present
# (torchmetrics imports transformers) at versions that clash with its pins (transformers 5.19 needs a
# newer huggingface_hub than the kit's), so the venv gets its own, at the kit's versions.
SHADOWED_IN_VLLM_IMAGE = ("transformers",)

GIB = 1 << 30
# CUDA context + allocator slack + prefill activations (one 2048-token sequence of a 7B is ~0.3 GiB).
OVERHEAD_BYTES = int(1.5 * GIB)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per weight of the Linear layers bitsandbytes quantizes (absmax per 64-block included; -dq
# quantizes those too); embeddings and norms stay in the compute dtype.
QUANT_BYTES = {"bnb.int8": 1.0, "bnb.nf4": 0.5 + 4 / 64, "bnb.fp4": 0.5 + 4 / 64,
               "bnb.nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256), "bnb.fp4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}
SOURCE_DIRS = ("onegpu", "data", "finetune", "eval", "submission", "sweeps")
HEALTH_REQUEST = {"prompt": "The capital of France is "}
# Distributions the Docker base image provides (its CUDA torch and packaging tools): never pinned.
FROM_BASE_IMAGE = {"torch", "triton", "setuptools", "pip", "wheel"}  # and every nvidia-* (CUDA wheels)
MODEL_STEP = ("# >>> model", "# <<< model")  # the Dockerfile block pack writes per weights route
IMAGE = "onegpu-submission"


def resolve_source(model: str) -> dict:
    """Classify ``model`` and read its litgpt Config without fetching weights."""
    local = Path(model).expanduser()
    if local.exists():
        ref = locate_checkpoint(local)  # a merged dir or an adapter dir whose base exists, else UserError
        config_dir = ref.path if (ref.path / "model_config.yaml").is_file() else ref.base
        return {"kind": "checkpoint", "path": str(local.resolve()), "adapter": ref.is_adapter,
                "config": Config.from_file(config_dir / "model_config.yaml"),
                "lineage": model_input(ref.path)}  # the model artifact packed: its name and digest
    model = model.removeprefix(WANDB_PREFIX)
    if model.count("/") >= 2 or ":" in model:  # entity/project/name:alias
        config, adapter = _wandb_config(model)
        return {"kind": "wandb_artifact", "name": model, "adapter": adapter, "config": config}
    if model.count("/") == 1:
        cached = cache_dir() / "checkpoints" / model / "model_config.yaml"
        if cached.is_file():
            return {"kind": "hub_model", "name": model, "config": Config.from_file(cached)}
        try:
            return {"kind": "hub_model", "name": model, "config": Config.from_name(model.split("/")[-1])}
        except ValueError:
            raise UserError(f"cannot resolve hub model {model!r}: litgpt has no config of that name and it is not "
                            f"converted under {cache_dir() / 'checkpoints'}",
                            fix="run `onegpu model prepare ORG/NAME` first, or use a name from `litgpt download list`") from None
    raise UserError(f"cannot resolve model source {model!r}: not an existing dir, a hub id (org/name) or a W&B "
                    "artifact (entity/project/name:alias)",
                    fix="check the path exists, or write the hub id / artifact name in full")


def _wandb_config(name: str):
    """(litgpt Config, adapter-only?) of a W&B model artifact, from its file list and config files."""
    try:
        import wandb  # optional (the wandb extra); its absence is reported below like any W&B failure

        artifact = wandb.Api().artifact(name, type="model")
        root = Path(tempfile.mkdtemp(prefix="onegpu-pack-"))
        names = {f.name for f in artifact.files()}
        adapter = "lit_model.pth" not in names and "lit_model.pth.lora" in names
        if "model_config.yaml" in names:
            artifact.get_entry("model_config.yaml").download(root=str(root))
            return Config.from_file(root / "model_config.yaml"), adapter
        artifact.get_entry("hyperparameters.yaml").download(root=str(root))
        base = Path(yaml.safe_load((root / "hyperparameters.yaml").read_text())["checkpoint_dir"])
        return Config.from_name(base.name), adapter
    except Exception as err:  # wandb raises many types (CommError, ValueError...); litgpt ValueError
        raise UserError(f"cannot resolve W&B model artifact {name!r}: {err}",
                        fix="check entity/project/name:alias, `wandb login` / WANDB_API_KEY and network; "
                            "or pack a local copy of the checkpoint dir") from err


def choose_route(weights: str | None, base: str | None, source: dict) -> tuple[WeightsRoute, WeightsRoute | None]:
    """The weights route (default: embed for a local checkpoint, else the source's own hub/W&B
    route) and, for an adapter-only W&B artifact, the hub base it merges into (revisions not yet pinned)."""
    default = {"checkpoint": "embed", "hub_model": f"hub:{source.get('name')}",
               "wandb_artifact": f"wandb:{source.get('name')}"}[source["kind"]]
    route = parse_route(weights or default)
    if route.kind == "embed" and source["kind"] != "checkpoint":
        raise UserError(f"--weights embed copies a local checkpoint into the bundle, but --model {source['name']} "
                        "is not a local dir",
                        fix=f"download/convert it first (`onegpu model prepare {source['name']}` prints the dir) and "
                            f"pass that dir as --model, or use --weights {default}")
    if source["kind"] != "checkpoint" and route.kind != "embed" and route.name != source["name"]:
        raise UserError(f"--model {source['name']} and --weights {route} name different models",
                        fix="pass the same model to both, or a local copy as --model (used for the memory check)")
    adapter_only = source.get("adapter") and source["kind"] == "wandb_artifact"
    if base is not None and route.kind != "wandb":
        raise UserError(f"--base {base} only applies to a wandb: route (an adapter-only artifact's base model)",
                        fix="drop --base")
    if adapter_only and base is None:
        raise UserError(f"W&B artifact {route.name} holds only a LoRA adapter; the image needs its base model too",
                        fix="pass --base hub:ORG/NAME@REVISION (merged into at build), or log the merged out/final")
    base_route = parse_route(base) if base is not None else None
    if base_route is not None and base_route.kind != "hub":
        raise UserError(f"--base {base} is not a hub route", fix="use --base hub:ORG/NAME@REVISION")
    return route, base_route


def count_params(config) -> tuple[int, int]:
    """(parameters in Linear layers, all other parameters), from a model built on the meta device."""
    with torch.device("meta"):
        model = GPT(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return linear, total - linear


def kv_bytes_per_token(config, dtype: str) -> int:
    """K and V of one token in every layer, at ``dtype`` (a name in DTYPE_BYTES)."""
    return config.n_layer * 2 * config.n_query_groups * config.head_size * DTYPE_BYTES[dtype]


def estimate_memory(config, dtype: str, quantize: str | None, max_batch_size: int, max_seq_length: int,
                    prefix_cache_mb: int) -> dict:
    """Bytes the server needs on the GPU, by part (weights, KV cache, prefix cache, overhead)."""
    compute = "bfloat16" if dtype == "auto" else dtype  # both tracks' GPUs support bf16
    linear, other = count_params(config)
    per_linear = QUANT_BYTES[quantize] if quantize else DTYPE_BYTES[compute]
    weights = int(linear * per_linear + other * DTYPE_BYTES[compute])
    seq = min(max_seq_length, config.block_size)
    kv = kv_bytes_per_token(config, compute) * seq * max_batch_size
    prefix = prefix_cache_mb << 20
    return {"engine": "onegpu", "params": linear + other, "dtype": compute, "quantize": quantize,
            "weights_bytes": weights, "kv_cache_bytes": kv, "kv_rows": max_batch_size, "kv_positions": seq,
            "prefix_cache_bytes": prefix, "overhead_bytes": OVERHEAD_BYTES,
            "total_bytes": weights + kv + prefix + OVERHEAD_BYTES}


def estimate_vllm_memory(config, dtype: str, max_batch_size: int, max_seq_length: int,
                         gpu_memory_utilization: float, capacity_bytes: int) -> dict:
    """vLLM's plan on a GPU of ``capacity_bytes``: the share it takes, the weights, and the paged KV
    cache it is left with (prefix cache included), in bytes, tokens and full-length sequences."""
    compute = "bfloat16" if dtype == "auto" else dtype
    linear, other = count_params(config)
    weights = (linear + other) * DTYPE_BYTES[compute]
    seq = min(max_seq_length, config.block_size)
    share = int(gpu_memory_utilization * capacity_bytes)
    kv = max(0, share - weights - OVERHEAD_BYTES)
    per_token = kv_bytes_per_token(config, compute)
    return {"engine": "vllm", "params": linear + other, "dtype": compute, "quantize": None, "weights_bytes": weights,
            "gpu_memory_utilization": gpu_memory_utilization, "share_bytes": share, "overhead_bytes": OVERHEAD_BYTES,
            "kv_cache_bytes": kv, "kv_tokens": kv // per_token, "kv_sequences": kv // (per_token * seq),
            "kv_rows": max_batch_size, "kv_positions": seq, "total_bytes": share}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def pinned_requirements(extras: tuple[str, ...] = ("serve",), also: tuple[str, ...] = ()) -> list[str]:
    """``name==version`` for onegpu's core + ``extras`` requirements (+ the distributions ``also``) and
    their dependencies, as installed here."""
    def wanted(req: Requirement, extras: set[str]) -> bool:
        return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {""} | extras)

    todo = [r for r in map(Requirement, metadata.requires("onegpu") or []) if wanted(r, set(extras))]
    todo += [Requirement(name) for name in also]
    seen: dict[str, str] = {}
    expanded: set[tuple[str, str]] = set()  # (distribution, extra) pairs already walked
    while todo:
        req = todo.pop()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key == "onegpu" or key in FROM_BASE_IMAGE or key.startswith("nvidia-"):
            continue
        seen[key] = dist.version
        new = {e for e in {""} | set(req.extras) if (key, e) not in expanded}
        expanded |= {(key, e) for e in new}
        todo += [r for r in map(Requirement, dist.requires or []) if new and wanted(r, new)]
    return [f"{k}=={v}" for k, v in sorted(seen.items())]


def model_step(route: WeightsRoute, base: WeightsRoute | None) -> str:
    """The Dockerfile lines that put the merged checkpoint at MODEL_DIR for ``route``."""
    if route.kind == "embed":
        return ("# --weights embed: the merged checkpoint in this folder's model/; nothing is fetched, at build or\n"
                f"# at start.\nCOPY model/ {MODEL_DIR}/")
    hf_token = ('if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi')
    if route.kind == "hub":
        return (f"# --weights {route}: downloaded and converted at build, at this pinned revision. A gated\n"
                "# model's token is a BuildKit secret, mounted for this step only (never in a layer, ARG or ENV):\n"
                f"#   docker build --secret id=hf_token,env=HF_TOKEN -t {IMAGE} .\n"
                "RUN --mount=type=secret,id=hf_token \\\n"
                f"    {hf_token} \\\n"
                f"    && HF_HOME=/tmp/hf onegpu model prepare {route.name} --revision {route.revision} "
                f"--checkpoint_dir {MODEL_DIR} \\\n"
                "    && rm -rf /tmp/hf")
    work = "/tmp/onegpu-fetch"  # downloads, caches and the base: removed in the same step, so in no layer
    lines = [f"# --weights {route}: downloaded from W&B at build. The API key is a BuildKit secret, mounted",
             "# for this step only (never in a layer, ARG or ENV):",
             f"#   docker build --secret id=wandb_api_key,env=WANDB_API_KEY -t {IMAGE} ."]
    mounts = "--mount=type=secret,id=wandb_api_key"
    fetch = (f"WANDB_API_KEY=\"$(cat /run/secrets/wandb_api_key)\" WANDB_MODE=online WANDB_DIR={work} "
             f"WANDB_CACHE_DIR={work}/wandb-cache WANDB_CONFIG_DIR={work}/wandb-config ONEGPU_CACHE={work} \\\n"
             f"       onegpu submission fetch {route} --out {MODEL_DIR}")
    steps = [f"mkdir -p {work}"]
    if base is not None:
        lines += [f"# The artifact is a LoRA adapter: merged here into the base --base {base}",
                  "# (a gated base also needs --secret id=hf_token,env=HF_TOKEN)."]
        mounts += " --mount=type=secret,id=hf_token"
        steps = [hf_token, f"HF_HOME={work}/hf onegpu model prepare {base.name} --revision {base.revision} "
                           f"--checkpoint_dir {work}/base"]
        fetch += f" --base_checkpoint {work}/base"
    need_key = ("test -s /run/secrets/wandb_api_key || { echo 'this image downloads a W&B artifact at build: "
                "docker build --secret id=wandb_api_key,env=WANDB_API_KEY ...' >&2; exit 1; }")
    body = " \\\n    && ".join([*steps, fetch, f"rm -rf {work}"])
    return "\n".join(lines) + f"\nRUN {mounts} \\\n    {need_key}; \\\n    {body}"


def render_dockerfile(route: WeightsRoute, base: WeightsRoute | None, options: dict) -> str:
    """The engine's Dockerfile template with the model step for ``route`` and ARG defaults set to ``options``."""
    engine = options.get("engine", "onegpu")
    text = (REPO_ROOT / DOCKERFILES[engine]).read_text()
    begin, end = (text.find(f"\n{m}") for m in MODEL_STEP)
    if begin < 0 or end < begin:
        raise UserError(f"the repo's Dockerfile has no '{MODEL_STEP[0]}' ... '{MODEL_STEP[1]}' block",
                        fix="restore the model step in Dockerfile (see git log) and pack again")
    text = f"{text[:begin]}\n{MODEL_STEP[0]}\n{model_step(route, base)}{text[end:]}"
    args = {"ONEGPU_EXTRAS": "serve,wandb" if route.kind == "wandb" else "serve",
            "PROMPT_STYLE": options["prompt_style"], "QUANTIZE": options["quantize"] or "",
            "DTYPE": options["dtype"], "POSTPROCESS": options["postprocess"] or "",
            "MAX_BATCH_SIZE": str(options["max_batch_size"])}
    if engine == "vllm":  # vLLM quantizes by its own options; its share of the GPU instead
        del args["QUANTIZE"]
        args["GPU_MEMORY_UTILIZATION"] = str(options["gpu_memory_utilization"])
        args["BASE_IMAGE"] = f"{VLLM_IMAGE}:v{vllm_requirement(gpu=True).split('==')[1]}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for arg, value in args.items():
            if line.startswith(f"ARG {arg}="):
                lines[i] = f"ARG {arg}={value}" if value.replace(".", "", 1).isdigit() else f'ARG {arg}="{value}"'
                args[arg] = None  # done
    missing = [a for a, v in args.items() if v is not None]
    if missing:
        raise UserError(f"the repo's Dockerfile has no ARG line for {missing}",
                        fix="restore the ARG lines in Dockerfile (see git log) and pack again")
    header = (f"# Packed by `onegpu submission pack` for track {options['track']}: --weights {route}, "
              f"--engine {engine}.\n")
    return header + "\n".join(lines) + "\n"


def _server_config(source: dict, options: dict) -> dict:
    cfg = {"checkpoint": source["path"]} if source["kind"] == "checkpoint" else {source["kind"]: source["name"]}
    cfg.update(host="127.0.0.1", port=8080, engine=options["engine"], prompt_style=options["prompt_style"],
               postprocess=options["postprocess"], dtype=options["dtype"], quantize=options["quantize"],
               max_batch_size=options["max_batch_size"], max_seq_length=options["max_seq_length"],
               prefix_cache_mb=options["prefix_cache_mb"])
    if options["engine"] == "vllm":
        cfg["gpu_memory_utilization"] = options["gpu_memory_utilization"]
    return cfg


def build_command(route: WeightsRoute, base: WeightsRoute | None) -> str:
    """The organizers' `docker build` for this bundle (secrets only where the route fetches)."""
    secrets = []
    if route.kind == "wandb":
        secrets.append("--secret id=wandb_api_key,env=WANDB_API_KEY")
    if route.kind == "hub" or base is not None:
        secrets.append("--secret id=hf_token,env=HF_TOKEN")
    return " ".join(["docker build", *secrets, f"-t {IMAGE} ."])


def _readme(route: WeightsRoute, base: WeightsRoute | None, source: dict, options: dict, estimate: dict,
            track: TrackSpec) -> str:
    where = {"embed": "copied into `model/` here and into the image by the Dockerfile's `COPY`",
             "hub": f"downloaded from the Hugging Face hub at build ({route.name}, revision {route.revision}; "
                    "for a gated model HF_TOKEN is passed as a build secret, the command below)",
             "wandb": f"downloaded from W&B at build ({route.name}; WANDB_API_KEY is passed as a build secret"
                      + (f"; an adapter merged into {base}" if base else "") + ")"}[route.kind]
    rules = options["postprocess"] or "none"
    return f"""# Submission: {source.get('name') or source.get('path')} on {options['track']}

Packed by `onegpu submission pack --weights {route}`. The model weights are {where}. The image
serves them from `{MODEL_DIR}`; nothing is fetched when it starts, and it runs as a non-root user.

## Build and run

    {build_command(route, base)}
    docker run --gpus all -p 8080:80 {IMAGE}
    curl -s localhost:8080/process -d '{json.dumps(HEALTH_REQUEST)}'

`RUN --mount=type=secret` needs BuildKit (Docker >= 23 uses it by default; older: `DOCKER_BUILDKIT=1`).
The server binds port 80 as a non-root user: Docker >= 20.10 and podman open unprivileged ports
from 0 inside the container (`net.ipv4.ip_unprivileged_port_start=0`).

Outside Docker (with the onegpu kit installed): `onegpu serve --config server.yaml`.

## Server config (server.yaml; the Dockerfile bakes the same values in as ARG defaults)

| option | value |
|---|---|
| prompt_style | {options['prompt_style']} (auto = the checkpoint's prompt_style.yaml, else raw) |
| postprocess | {rules} |
| dtype | {options['dtype']} |
| quantize | {options['quantize'] or 'none'} |
| max_batch_size | {options['max_batch_size']} |
| max_seq_length | {options['max_seq_length']} |
| engine | {options['engine']}{f" (gpu_memory_utilization {options['gpu_memory_utilization']})" if options['engine'] == 'vllm' else ''} |

## Memory estimate for {track.gpu} ({track.memory_gib:.1f} GiB), {options['engine']} engine

{_memory_table(estimate)}

requirements.txt pins what the server imports, as installed where this was packed; torch is the
base image's (the Dockerfile holds pip to it and fails the build if it would change).
"""


def _memory_table(estimate: dict) -> str:
    rows = [("part", "size"), ("---", "---"),
            (f"weights ({estimate['params'] / 1e9:.2f} B params, {estimate['quantize'] or estimate['dtype']})",
             _gib(estimate["weights_bytes"]))]
    if estimate["engine"] == "vllm":
        rows += [("overhead (CUDA context, activations, CUDA graphs)", _gib(estimate["overhead_bytes"])),
                 (f"paged KV cache incl. prefix cache: {estimate['kv_tokens']:,} tokens = {estimate['kv_sequences']} "
                  f"sequences of {estimate['kv_positions']} (max_batch_size {estimate['kv_rows']})",
                  _gib(estimate["kv_cache_bytes"])),
                 (f"**vLLM's share: gpu_memory_utilization {estimate['gpu_memory_utilization']}**",
                  f"**{_gib(estimate['share_bytes'])}**")]
    else:
        rows += [(f"KV cache ({estimate['kv_rows']} rows x {estimate['kv_positions']} tokens)",
                  _gib(estimate["kv_cache_bytes"])),
                 ("prefix cache", _gib(estimate["prefix_cache_bytes"])),
                 ("overhead (CUDA context, activations)", _gib(estimate["overhead_bytes"])),
                 ("**total**", f"**{_gib(estimate['total_bytes'])}**")]
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def verify_config(config_path: Path, checkpoint: Path, on_cpu: bool, timeout: float = 300.0) -> dict:
    """Start ``onegpu serve --config config_path`` on ``checkpoint`` and send the organizers' health request."""
    import httpx  # optional (the eval extra); only the check after writing needs it

    cfg = read_yaml(config_path, "server config")
    for key in ("checkpoint", "wandb_artifact", "hub_model"):
        cfg.pop(key, None)
    cfg["checkpoint"] = str(checkpoint)
    changed = []
    if on_cpu:  # a GPU config on a CPU: keep template and rules, make it run here
        for key, value in (("quantize", None), ("dtype", "auto"), ("max_batch_size", 2), ("prefix_cache_mb", 64)):
            if cfg.get(key) != value:
                changed.append(f"{key}={value}")
                cfg[key] = value
    port = free_port()
    cfg.update(host="127.0.0.1", port=port)
    run_cfg = config_path.parent / ".verify-server.yaml"
    run_cfg.write_text(yaml.safe_dump(cfg))
    try:
        command = [sys.executable, "-m", "onegpu", "serve", "--config", str(run_cfg)]
        with running_server(None, port=port, command=command, timeout=timeout) as base_url:
            response = httpx.post(f"{base_url}/process", json=HEALTH_REQUEST, timeout=120.0)
            health = httpx.get(f"{base_url}/health", timeout=10.0).json()
    finally:
        run_cfg.unlink(missing_ok=True)
    if response.status_code != 200:
        raise UserError(f"the packed server answered the health request with {response.status_code}: "
                        f"{response.text[:300]}", fix="run `onegpu serve --config server.yaml` by hand to see why")
    body = response.json()
    return {"checkpoint": str(checkpoint), "status": response.status_code, "text": body["text"],
            "n_tokens": len(body["tokens"]), "prompt_style": health.get("prompt_style"),
            "postprocess": health.get("postprocess"), "changed_for_this_machine": changed}


def check_fits(source: dict, track: str, options: dict) -> dict:
    """The memory estimate for ``track``'s GPU; a config that does not fit is a UserError with the numbers."""
    if options["engine"] == "vllm":
        return check_vllm_fits(source, track, options)
    estimate = estimate_memory(source["config"], options["dtype"], options["quantize"], options["max_batch_size"],
                               options["max_seq_length"], options["prefix_cache_mb"])
    gpu = TRACKS[track]
    capacity = gpu.memory_mib << 20
    parts = (f"weights {_gib(estimate['weights_bytes'])} ({estimate['params'] / 1e9:.2f} B params at "
             f"{options['quantize'] or estimate['dtype']}) + KV cache {_gib(estimate['kv_cache_bytes'])} "
             f"({options['max_batch_size']} rows x {estimate['kv_positions']} tokens) + prefix cache "
             f"{_gib(estimate['prefix_cache_bytes'])} + overhead {_gib(estimate['overhead_bytes'])} = "
             f"{_gib(estimate['total_bytes'])}")
    if estimate["total_bytes"] > capacity:
        kv_row = estimate["kv_cache_bytes"] // options["max_batch_size"]
        room = capacity - estimate["total_bytes"] + estimate["kv_cache_bytes"]
        rows = max(0, room // kv_row)
        hint = (f"--max_batch_size {rows}" if rows >= 1 else "--quantize bnb.nf4 (or a smaller model)")
        raise UserError(f"this config needs about {_gib(estimate['total_bytes'])} but the {track} track's "
                        f"{gpu.gpu} has {_gib(capacity)}: {parts}",
                        fix=f"use {hint}, --quantize bnb.nf4/bnb.int8, a shorter --max_seq_length or a smaller "
                            "--prefix_cache_mb")
    print(f"[onegpu pack] memory estimate for {gpu.gpu} ({_gib(capacity)}): {parts}", file=sys.stderr)
    return estimate


def check_vllm_fits(source: dict, track: str, options: dict) -> dict:
    """vLLM's memory plan for ``track``'s GPU; a share that leaves no room for one full-length
    sequence is a UserError with the numbers (vLLM itself would refuse to start)."""
    gpu = TRACKS[track]
    capacity = gpu.memory_mib << 20
    estimate = estimate_vllm_memory(source["config"], options["dtype"], options["max_batch_size"],
                                    options["max_seq_length"], options["gpu_memory_utilization"], capacity)
    parts = (f"gpu_memory_utilization {options['gpu_memory_utilization']} x {_gib(capacity)} = "
             f"{_gib(estimate['share_bytes'])}: weights {_gib(estimate['weights_bytes'])} "
             f"({estimate['params'] / 1e9:.2f} B params at {estimate['dtype']}) + overhead "
             f"{_gib(estimate['overhead_bytes'])} + paged KV cache {_gib(estimate['kv_cache_bytes'])} "
             f"({estimate['kv_tokens']:,} tokens, {estimate['kv_sequences']} sequences of {estimate['kv_positions']})")
    if estimate["kv_sequences"] < 1:
        raise UserError(f"vLLM's share of the {track} track's {gpu.gpu} leaves no room for one "
                        f"{estimate['kv_positions']}-token sequence: {parts}",
                        fix="raise --gpu_memory_utilization (at most ~0.95), shorten --max_seq_length, or use a "
                            "smaller model (or the onegpu engine with --quantize bnb.nf4)")
    print(f"[onegpu pack] vLLM memory plan for {gpu.gpu}: {parts}", file=sys.stderr)
    if estimate["kv_sequences"] < options["max_batch_size"]:
        print(f"[onegpu pack] note: {estimate['kv_sequences']} full-length sequences fit, fewer than "
              f"--max_batch_size {options['max_batch_size']}: vLLM queues the rest when prompts are that long",
              file=sys.stderr)
    return estimate


def write_bundle(out: Path, source: dict, route: WeightsRoute, base: WeightsRoute | None, options: dict,
                 estimate: dict) -> None:
    """The kit's source, the rendered Dockerfile, pins, server config, README and (embed) model/ in ``out``."""
    for name in SOURCE_DIRS:
        shutil.copytree(REPO_ROOT / name, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO_ROOT / "pyproject.toml", out / "pyproject.toml")  # its readme is the bundle's README.md
    ignore = (REPO_ROOT / ".dockerignore").read_text()
    if route.kind == "embed":
        ignore += "\n# the embedded model (onegpu submission pack --weights embed)\n!model/\n!model/**\n"
        copied = embed_checkpoint(source["path"], out / "model")
        print(f"[onegpu pack] embedded {', '.join(copied)} from {source['path']}", file=sys.stderr)
    (out / ".dockerignore").write_text(ignore)
    (out / "Dockerfile").write_text(render_dockerfile(route, base, options))
    extras = ("serve", "wandb") if route.kind == "wandb" else ("serve",)
    also = SHADOWED_IN_VLLM_IMAGE if options["engine"] == "vllm" else ()
    (out / "requirements.txt").write_text("# pinned by `onegpu submission pack`; torch comes from the base image\n"
                                          + "\n".join(pinned_requirements(extras, also)) + "\n")
    (out / "server.yaml").write_text("# onegpu serve --config server.yaml (the Docker image reads the same values "
                                     "from ONEGPU_* env vars)\n"
                                     + yaml.safe_dump(_server_config(source, options), sort_keys=False))
    (out / "README.md").write_text(_readme(route, base, source, options, estimate, TRACKS[options["track"]]))


def write_or_reuse(out: Path, info: dict, source: dict, route: WeightsRoute, base_route: WeightsRoute | None,
                   verify: bool, force: bool) -> dict:
    """The folder ``info`` describes written into ``out`` (whole or not at all), or the earlier one it repeats."""
    earlier = earlier_pack(out, info, verify)
    if earlier is not None:
        print(f"[onegpu pack] {out} already holds this pack (the same model, weights route and options, by its "
              "pack.json): reusing it", file=sys.stderr)
        return earlier
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty", fix="pass another --out, or --force true to overwrite it")
    with staged_dir(out) as stage:
        stage.chmod(0o755)  # a temp dir is private; the bundle is shared with whoever builds it
        write_bundle(stage, source, route, base_route, info["options"], info["estimate"])
        if verify:
            info["verify"] = _verify(stage, source, route)
        atomic_write_json(stage / "pack.json", info)
    return info


def earlier_pack(out: Path, info: dict, verify: bool) -> dict | None:
    """The ``pack.json`` of a finished earlier pack in ``out`` that this one would repeat, else None.

    The folder appears whole or not at all (it is written beside ``out`` and renamed), so a
    ``pack.json`` inside means a complete pack; a re-run after a kill during the zip reuses it.
    """
    earlier = read_json(out / "pack.json")
    same = {k: v for k, v in earlier.items() if k not in ("verify", "zip")} == info
    return earlier if same and (not verify or "verify" in earlier) else None


def write_zip(out: Path) -> str:
    """``OUT.zip`` of the folder (written beside it and renamed: never a cut archive under that name)."""
    archive_path = out.with_name(out.name + ".zip")
    with atomic_path(archive_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(out.rglob("*")):
            archive.write(path, path.relative_to(out.parent))
    return str(archive_path)


def _verify(stage: Path, source: dict, route: WeightsRoute) -> dict:
    if route.kind == "embed":
        checkpoint = stage / "model"  # the very files the image will hold
    else:
        checkpoint = Path(source["path"]) if source["kind"] == "checkpoint" else prepare()
    result = verify_config(stage / "server.yaml", checkpoint, on_cpu=not torch.cuda.is_available())
    if route.kind == "embed":
        result["checkpoint"] = "model/"  # the staging dir it ran in is renamed to --out
    print(f"[onegpu pack] health request answered: {result['text']!r}", file=sys.stderr)
    return result


def write_submission(model: str, out: Path, weights: str | None, base: str | None, options: dict, verify: bool,
                     zip: bool, force: bool) -> dict:
    """The folder ``onegpu submission pack`` writes (see its options in ``submission/pack.py``)."""
    if options["prompt_style"] not in ("raw", "auto"):
        resolve_prompt_style(options["prompt_style"], Path("."))  # unknown names fail here, listing the known ones
    track = options["track"]
    source = resolve_source(model)
    route, base_route = choose_route(weights, base, source)
    estimate = check_fits(source, track, options)
    route, base_route = pin_revision(route), pin_revision(base_route) if base_route else None
    info = {"source": {k: v for k, v in source.items() if k != "config"}, "weights": str(route),
            "base": str(base_route) if base_route else None, "options": options,
            "track": {"name": track, "gpu": TRACKS[track].gpu, "mib": TRACKS[track].memory_mib},
            "estimate": estimate, "build": build_command(route, base_route)}
    info = json.loads(json.dumps(info, default=str))  # as pack.json holds it
    info = write_or_reuse(out, info, source, route, base_route, verify, force)
    if zip:
        info["zip"] = write_zip(out)
    print(f"[onegpu pack] wrote {out}" + (f" and {info['zip']}" if zip else "") + f"; build it with: cd {out} && "
          f"{info['build']}")
    return info
