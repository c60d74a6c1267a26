"""``onegpu submission pack``: a self-contained, reproducible submission folder for one track.

    onegpu submission pack --model out/final --track rtx4090-24gb --out runs/submission

What it writes (weights never: they are fetched at build or mounted/fetched at start):

    Dockerfile        the repo's, with the model source and server options baked in as ARG defaults
    requirements.txt  pinned versions of everything the server imports (torch comes from the base image)
    server.yaml       the server config, usable as `onegpu serve --config server.yaml` outside Docker
    README.md         how to build, run and probe it; the memory estimate
    pack.json         the same facts, machine-readable (source, track, estimate, verification)
    onegpu/ data/ ... the kit's source, so `docker build` needs nothing else
    ../<out>.zip      a zip of the folder

Before writing, the inference memory (weights at the chosen dtype/quantization + the server's KV
cache, max_batch_size rows x max_seq_length positions, + the prefix cache + a fixed overhead) is
checked against the track's GPU; a config that does not fit is refused with the numbers. After
writing, the packed server config is started outside Docker (on the source if it is a local
checkpoint, else on the bundled model) and sent the organizers' health request.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Literal

from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT

GIB = 1 << 30
# Memory the driver reports as usable (nvidia-smi "Total"), in MiB.
TRACKS = {"a100-40gb": {"gpu": "NVIDIA A100-SXM4-40GB", "mib": 40_960},
          "rtx4090-24gb": {"gpu": "NVIDIA GeForce RTX 4090", "mib": 24_564}}
# CUDA context + allocator slack + prefill activations (one 2048-token sequence of a 7B is ~0.3 GiB).
OVERHEAD_BYTES = int(1.5 * GIB)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per weight of the Linear layers bitsandbytes quantizes (absmax per 64-block included; -dq
# quantizes those too); embeddings and norms stay in the compute dtype.
QUANT_BYTES = {"bnb.int8": 1.0, "bnb.nf4": 0.5 + 4 / 64, "bnb.fp4": 0.5 + 4 / 64,
               "bnb.nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256), "bnb.fp4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}
SOURCE_DIRS = ("onegpu", "data", "finetune", "eval", "submission", "sweeps")
HEALTH_REQUEST = {"prompt": "The capital of France is "}
# What the server process imports; torch (and its CUDA wheels) come from the Docker base image.
SERVE_ROOTS = ("litgpt", "lightning", "fastapi", "uvicorn", "pydantic", "jsonargparse", "tokenizers",
               "huggingface_hub", "safetensors", "wandb", "bitsandbytes", "httpx", "pyyaml", "tqdm")
FROM_BASE_IMAGE = ("torch", "triton", "nvidia-", "setuptools", "pip", "wheel")


def resolve_source(model: str) -> dict:
    """Classify ``model`` and read its litgpt Config without fetching weights."""
    from litgpt import Config

    local = Path(model).expanduser()
    if local.exists():
        local = local.resolve()
        if (local / "model_config.yaml").is_file():
            return {"kind": "checkpoint", "path": str(local), "config": Config.from_file(local / "model_config.yaml")}
        if (local / "hyperparameters.yaml").is_file() and (local / "lit_model.pth.lora").is_file():
            import yaml

            base = Path(yaml.safe_load((local / "hyperparameters.yaml").read_text())["checkpoint_dir"])
            if (base / "model_config.yaml").is_file():
                return {"kind": "checkpoint", "path": str(local), "config": Config.from_file(base / "model_config.yaml")}
            raise UserError(f"{local} is a LoRA adapter whose base {base} has no model_config.yaml",
                            fix="prepare the base (`onegpu model prepare NAME`) or pack the merged out/final dir")
        raise UserError(f"{local} is not a litgpt checkpoint dir (no model_config.yaml) nor a LoRA adapter dir",
                        fix="pass a fine-tune's out/final, a dir printed by `onegpu model prepare`, a hub id "
                            "(org/name) or a W&B model artifact (entity/project/name:alias)")
    if model.count("/") >= 2 or ":" in model:  # entity/project/name:alias
        return {"kind": "wandb_artifact", "name": model, "config": _wandb_config(model)}
    if model.count("/") == 1:
        from onegpu.paths import cache_dir

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
    import tempfile

    import yaml
    from litgpt import Config

    try:
        import wandb

        artifact = wandb.Api().artifact(name, type="model")
        root = Path(tempfile.mkdtemp(prefix="onegpu-pack-"))
        names = {f.name for f in artifact.files()}
        if "model_config.yaml" in names:
            artifact.get_entry("model_config.yaml").download(root=str(root))
            return Config.from_file(root / "model_config.yaml")
        artifact.get_entry("hyperparameters.yaml").download(root=str(root))
        base = Path(yaml.safe_load((root / "hyperparameters.yaml").read_text())["checkpoint_dir"])
        return Config.from_name(base.name)
    except Exception as err:  # wandb raises many types (CommError, ValueError...); litgpt ValueError
        raise UserError(f"cannot resolve W&B model artifact {name!r}: {err}",
                        fix="check entity/project/name:alias, `wandb login` / WANDB_API_KEY and network; "
                            "or pack a local copy of the checkpoint dir") from err


def count_params(config) -> tuple[int, int]:
    """(parameters in Linear layers, all other parameters), from a model built on the meta device."""
    import torch
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return linear, total - linear


def estimate_memory(config, dtype: str, quantize: str | None, max_batch_size: int, max_seq_length: int,
                    prefix_cache_mb: int) -> dict:
    """Bytes the server needs on the GPU, by part (weights, KV cache, prefix cache, overhead)."""
    compute = "bfloat16" if dtype == "auto" else dtype  # both tracks' GPUs support bf16
    linear, other = count_params(config)
    per_linear = QUANT_BYTES[quantize] if quantize else DTYPE_BYTES[compute]
    weights = int(linear * per_linear + other * DTYPE_BYTES[compute])
    seq = min(max_seq_length, config.block_size)
    kv_per_token = config.n_layer * 2 * config.n_query_groups * config.head_size * DTYPE_BYTES[compute]
    kv = kv_per_token * seq * max_batch_size
    prefix = prefix_cache_mb << 20
    return {"params": linear + other, "dtype": compute, "quantize": quantize, "weights_bytes": weights,
            "kv_cache_bytes": kv, "kv_rows": max_batch_size, "kv_positions": seq, "prefix_cache_bytes": prefix,
            "overhead_bytes": OVERHEAD_BYTES, "total_bytes": weights + kv + prefix + OVERHEAD_BYTES}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def pinned_requirements() -> list[str]:
    """``name==version`` for the server's imports and their dependencies, as installed here."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(SERVE_ROOTS)
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen or key.startswith(FROM_BASE_IMAGE):
            continue
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [f"{k}=={v}" for k, v in sorted(seen.items())]


def _dockerfile(source: dict, options: dict) -> str:
    """The repo's Dockerfile with ARG defaults set to this submission's source and options."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    args = {"MODEL_ID": source.get("name", "") if source["kind"] == "hub_model" else "",
            "WANDB_ARTIFACT": source.get("name", "") if source["kind"] == "wandb_artifact" else "",
            "PROMPT_STYLE": options["prompt_style"], "QUANTIZE": options["quantize"] or "",
            "DTYPE": options["dtype"], "POSTPROCESS": options["postprocess"] or "",
            "MAX_BATCH_SIZE": str(options["max_batch_size"])}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for arg, value in args.items():
            if line.startswith(f"ARG {arg}="):
                lines[i] = f'ARG {arg}="{value}"' if value == "" or not value.isdigit() else f"ARG {arg}={value}"
                args[arg] = None  # done
    missing = [a for a, v in args.items() if v is not None]
    if missing:
        raise UserError(f"the repo's Dockerfile has no ARG line for {missing}",
                        fix="restore the ARG lines in Dockerfile (see git log) and pack again")
    header = (f"# Packed by `onegpu submission pack` for track {options['track']}: "
              f"model source {source.get('name') or source.get('path')}.\n")
    return header + "\n".join(lines) + "\n"


def _server_config(source: dict, options: dict) -> dict:
    cfg = {"checkpoint": source["path"]} if source["kind"] == "checkpoint" else {source["kind"]: source["name"]}
    cfg.update(host="127.0.0.1", port=8080, prompt_style=options["prompt_style"],
               postprocess=options["postprocess"], dtype=options["dtype"], quantize=options["quantize"],
               max_batch_size=options["max_batch_size"], max_seq_length=options["max_seq_length"],
               prefix_cache_mb=options["prefix_cache_mb"])
    return cfg


def _readme(source: dict, options: dict, estimate: dict, track: dict) -> str:
    image = "onegpu-submission"
    if source["kind"] == "checkpoint":
        run = (f"docker run --gpus all -v {source['path']}:/models/model:ro -p 8080:80 {image}")
        where = "mounted at start (the weights stay outside the image)"
    elif source["kind"] == "wandb_artifact":
        run = f"docker run --gpus all -e WANDB_API_KEY -p 8080:80 {image}"
        where = "downloaded from W&B at start (WANDB_API_KEY needed)"
    else:
        run = f"docker run --gpus all -p 8080:80 {image}"
        where = "downloaded from the hub and converted at build (gated models: --secret id=hf_token,env=HF_TOKEN)"
    rules = options["postprocess"] or "none"
    return f"""# Submission: {source.get('name') or source.get('path')} on {options['track']}

Packed by `onegpu submission pack`. Model weights are {where}; nothing in this folder is a weight.

## Build and run

    docker build -t {image} .
    {run}
    curl -s localhost:8080/process -d '{json.dumps(HEALTH_REQUEST)}'

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

## Memory estimate for {track['gpu']} ({track['mib'] / 1024:.1f} GiB)

| part | size |
|---|---|
| weights ({estimate['params'] / 1e9:.2f} B params, {estimate['quantize'] or estimate['dtype']}) | {_gib(estimate['weights_bytes'])} |
| KV cache ({estimate['kv_rows']} rows x {estimate['kv_positions']} tokens) | {_gib(estimate['kv_cache_bytes'])} |
| prefix cache | {_gib(estimate['prefix_cache_bytes'])} |
| overhead (CUDA context, activations) | {_gib(estimate['overhead_bytes'])} |
| **total** | **{_gib(estimate['total_bytes'])}** |

requirements.txt pins what the server imports, as installed where this was packed; torch comes
from the base image.
"""


def verify_config(config_path: Path, checkpoint: Path, on_cpu: bool, timeout: float = 300.0) -> dict:
    """Start ``onegpu serve --config config_path`` on ``checkpoint`` and send the organizers' health request."""
    import httpx
    import yaml

    from onegpu.submission.launch import free_port, running_server

    cfg = yaml.safe_load(config_path.read_text())
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


def pack(model: str | None = None, track: Literal["a100-40gb", "rtx4090-24gb"] | None = None,
         out: Path = Path("runs/submission"),
         prompt_style: str = "auto", postprocess: str | None = None,
         dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
         quantize: Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"] | None = None,
         max_batch_size: int = 16, max_seq_length: int = 2048, prefix_cache_mb: int = 1024,
         verify: bool = True, force: bool = False) -> dict:
    """Write a self-contained submission folder (Dockerfile, pins, server config, README) and its zip.

    Refuses, with the numbers, a config whose estimated inference memory exceeds the track's GPU.
    Then serves the packed config outside Docker and sends the organizers' health request.

    Args:
        model: the model source: a local checkpoint dir (a fine-tune's out/final or an adapter dir),
            a W&B model artifact (entity/project/name:alias) or a hub id (org/name).
        track: the challenge track whose GPU the estimate is checked against: a100-40gb or rtx4090-24gb.
        out: the folder to write (the zip goes beside it as OUT.zip).
        prompt_style: raw, auto (the checkpoint's prompt_style.yaml, else raw) or a litgpt style name.
        postprocess: comma-separated output rules (drop_answer_prefix, mc_letter, cut_blank_line, strip);
            off by default.
        dtype: weights/KV dtype in the image (auto = bfloat16 on both tracks' GPUs).
        quantize: bitsandbytes weight quantization for the image (bnb.nf4, bnb.nf4-dq, bnb.fp4,
            bnb.fp4-dq, bnb.int8).
        max_batch_size: sequences the server decodes together (KV-cache rows; HELM's parallel requests
            beyond it wait in the queue).
        max_seq_length: context served; HELM's neurips/local deployment uses 2048.
        prefix_cache_mb: memory for cached few-shot prefixes (part of the estimate).
        verify: start the packed config outside Docker and send the health request (on the source if it
            is a local checkpoint, else on the bundled model).
        force: overwrite a non-empty OUT.
    """
    import yaml

    from onegpu.inference import resolve_prompt_style
    from onegpu.submission.postprocess import parse_rules

    # flags rather than positionals (`--model X --track Y`), as the submission docs write them
    if not model:
        raise UserError("no --model given", fix="pass --model DIR|entity/project/name:alias|org/name")
    if track not in TRACKS:
        raise UserError("no --track given" if track is None else f"unknown track {track!r}",
                        fix=f"pass --track with one of: {', '.join(TRACKS)}")
    if max_batch_size < 1 or max_seq_length < 2 or prefix_cache_mb < 0:
        raise UserError(f"max_batch_size={max_batch_size}, max_seq_length={max_seq_length}, "
                        f"prefix_cache_mb={prefix_cache_mb}", fix="use max_batch_size >= 1, max_seq_length >= 2, "
                                                                  "prefix_cache_mb >= 0")
    rules = parse_rules(postprocess)
    if prompt_style not in ("raw", "auto"):
        resolve_prompt_style(prompt_style, Path("."))  # unknown names fail here, listing the known ones
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty", fix="pass another --out, or --force true to overwrite it")
    source = resolve_source(model)
    estimate = estimate_memory(source["config"], dtype, quantize, max_batch_size, max_seq_length, prefix_cache_mb)
    gpu = TRACKS[track]
    capacity = gpu["mib"] << 20
    parts = (f"weights {_gib(estimate['weights_bytes'])} ({estimate['params'] / 1e9:.2f} B params at "
             f"{quantize or estimate['dtype']}) + KV cache {_gib(estimate['kv_cache_bytes'])} ({max_batch_size} rows x "
             f"{estimate['kv_positions']} tokens) + prefix cache {_gib(estimate['prefix_cache_bytes'])} + overhead "
             f"{_gib(estimate['overhead_bytes'])} = {_gib(estimate['total_bytes'])}")
    if estimate["total_bytes"] > capacity:
        kv_row = estimate["kv_cache_bytes"] // max_batch_size
        room = capacity - estimate["total_bytes"] + estimate["kv_cache_bytes"]
        rows = max(0, room // kv_row)
        hint = (f"--max_batch_size {rows}" if rows >= 1 else "--quantize bnb.nf4 (or a smaller model)")
        raise UserError(f"this config needs about {_gib(estimate['total_bytes'])} but the {track} track's "
                        f"{gpu['gpu']} has {_gib(capacity)}: {parts}",
                        fix=f"use {hint}, --quantize bnb.nf4/bnb.int8, a shorter --max_seq_length or a smaller "
                            "--prefix_cache_mb")
    print(f"[onegpu pack] memory estimate for {gpu['gpu']} ({_gib(capacity)}): {parts}", file=sys.stderr)

    options = {"track": track, "prompt_style": prompt_style, "postprocess": ",".join(rules) or None, "dtype": dtype,
               "quantize": quantize, "max_batch_size": max_batch_size, "max_seq_length": max_seq_length,
               "prefix_cache_mb": prefix_cache_mb}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in SOURCE_DIRS:
        shutil.copytree(REPO_ROOT / name, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO_ROOT / "pyproject.toml", out / "pyproject.toml")
    shutil.copy2(REPO_ROOT / ".dockerignore", out / ".dockerignore")
    (out / "Dockerfile").write_text(_dockerfile(source, options))
    (out / "requirements.txt").write_text("# pinned by `onegpu submission pack`; torch comes from the base image\n"
                                          + "\n".join(pinned_requirements()) + "\n")
    server_cfg = _server_config(source, options)
    (out / "server.yaml").write_text("# onegpu serve --config server.yaml (the Docker image reads the same values "
                                     "from ONEGPU_* env vars)\n" + yaml.safe_dump(server_cfg, sort_keys=False))
    (out / "README.md").write_text(_readme(source, options, estimate, gpu))
    info = {"source": {k: v for k, v in source.items() if k != "config"}, "options": options,
            "track": {"name": track, **gpu}, "estimate": estimate}
    if verify:
        import torch

        from onegpu.model import prepare

        checkpoint = Path(source["path"]) if source["kind"] == "checkpoint" else prepare()
        info["verify"] = verify_config(out / "server.yaml", checkpoint, on_cpu=not torch.cuda.is_available())
        print(f"[onegpu pack] health request answered: {info['verify']['text']!r}", file=sys.stderr)
    (out / "pack.json").write_text(json.dumps(info, indent=2, default=str))
    zip_path = shutil.make_archive(str(out), "zip", root_dir=out.parent, base_dir=out.name)
    info["zip"] = zip_path
    print(f"[onegpu pack] wrote {out} and {zip_path}")
    return info
