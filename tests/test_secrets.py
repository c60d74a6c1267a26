"""Secrets stay secret: fake Hugging Face and W&B tokens in the environment and passed as a flag on the
routes that carry them, then every file the kit wrote is searched for them, byte for byte: zero hits.

Here: `onegpu model push --token` to a hub (a stand-in for huggingface.co on 127.0.0.1: the real
huggingface_hub client talks to it through HF_ENDPOINT; the test checks the token did reach it, in the
Authorization header, and is in nothing uploaded or written), `submission pack` of a hub route (whose
image build takes the token as a build secret), and a tracked run handed secrets directly. Every
stage verb runs with the fake tokens in its environment in tests/test_kill_anywhere.py, which
searches all its runs' files, logs and W&B files the same way; the image's layers, config and
history are searched in tests/test_image.py.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import FAKE_SECRETS, exportable_tiny, secret_hits

pytestmark = pytest.mark.slow

SECRETS = {k: v for k, v in FAKE_SECRETS.items() if not k.startswith("-")}  # in the environment
FLAG_TOKEN = FAKE_SECRETS["--token"]  # `model push --token`


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the hub API for `HfApi.whoami`, `create_repo` and `upload_folder` (every file as a
    regular one, inline in the commit)."""

    seen: list[tuple[str, str, str]] = []  # (method, path, authorization)
    uploaded: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def _reply(self, doc: dict, status: int = 200) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
        if self.path.startswith("/api/whoami-v2"):
            return self._reply({"name": "tester", "type": "user", "auth": {"accessToken": {"role": "write"}}})
        self._reply({"error": "not here"}, 404)

    def do_POST(self) -> None:
        self.seen.append(("POST", self.path, self.headers.get("Authorization", "")))
        body = self._body()
        if self.path.startswith("/api/validate-yaml"):  # the model card's front matter
            return self._reply({"errors": [], "warnings": []})
        if self.path.startswith("/api/repos/create"):
            return self._reply({"url": f"http://{self.headers['Host']}/{json.loads(body)['name']}"})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply({"commitUrl": f"http://{self.headers['Host']}/commit/1", "commitOid": "1" * 40})
        self._reply({"error": "not here"}, 404)


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def kit_env(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """The environment of every command: the fake tokens, and W&B's and the hub client's own dirs in this
    test's tmp dir (so the search covers what they write)."""
    home = tmp_path_factory.mktemp("secrets-home")
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "WANDB_DIR": str(home / "wandb-dir"), "WANDB_DATA_DIR": str(home / "wandb-data"),
           "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
           "HF_HOME": str(home / "hf-home")}
    return env, home


def onegpu(env: dict, cwd: Path, log: Path, *args, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "onegpu", *map(str, args)], cwd=cwd, env={**env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=900)
    log.write_text(f"{done.stdout}\n{done.stderr}")  # what the kit printed (the command line is the test's)
    return done


def test_no_token_in_the_upload_or_the_pack_of_a_hub_route(kit_env, hub, tmp_path, bundled_checkpoint):
    checkpoint = exportable_tiny(tmp_path / "model", bundled_checkpoint)
    env, home = kit_env
    logs = tmp_path / "logs"
    logs.mkdir()
    work = tmp_path / "work"
    work.mkdir()

    def ok(name: str, *args, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        done = onegpu(env, work, logs / f"{name}.log", *args, extra_env=extra_env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    revision = "0" * 40
    ok("pack-hub", "submission", "pack", "--weights", f"hub:meta-llama/Llama-2-7b-hf@{revision}", "--track",
       "a100-40gb", "--out", "sub-hub", "--verify", "false")
    # the upload route, to the stand-in hub: the token given as a flag goes where it must, in the
    # requests' Authorization header (and wins over HF_TOKEN)
    FakeHub.seen.clear()
    pushed = ok("push", "model", "push", checkpoint, "--repo", "team/secret-test", "--token", FLAG_TOKEN,
                extra_env={"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "0"})
    assert f"{hub}/commit/1" in pushed.stdout
    assert {auth for _method, _path, auth in FakeHub.seen} == {f"Bearer {FLAG_TOKEN}"}
    assert {"model.safetensors", "README.md", "onegpu_lineage.json", "tokenizer.json"} <= set(FakeHub.uploaded)
    uploaded = tmp_path / "uploaded"
    for name, data in FakeHub.uploaded.items():
        (uploaded / name).parent.mkdir(parents=True, exist_ok=True)
        (uploaded / name).write_bytes(data)

    # the search: the commands' outputs, everything they wrote (the packed folder and zip, the hub
    # client's and W&B's own dirs), and what was uploaded
    written = [work, logs, home, uploaded]
    assert (work / "sub-hub" / "Dockerfile").is_file() and (work / "sub-hub.zip").is_file()
    assert secret_hits(*written) == []
    # and the search does find a token where there is one
    (tmp_path / "canary").write_text(f"x{SECRETS['WANDB_API_KEY']}x")
    assert secret_hits(tmp_path / "canary") == [f"{tmp_path / 'canary'}: WANDB_API_KEY"]


def test_a_secret_handed_to_a_tracked_run_is_not_written_down(tmp_path, monkeypatch):
    """Defence in depth: a config key named like a secret, a secret variable's value inside a config
    string and a `--token` option on the command line reach neither run.json nor the W&B run."""
    from onegpu.tracking import Run

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["onegpu", "verb", "--token", FLAG_TOKEN, "--api_key=" + FLAG_TOKEN])
    config = {"token": FLAG_TOKEN, "note": f"made with {SECRETS['HF_TOKEN']}", "tokenizer": "bundled",
              "max_tokens": 8}
    with Run("test", tmp_path / "run", config) as run:
        run.log({"loss": 1.0}, step=1)
    assert secret_hits(tmp_path) == []
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"] == {"token": "***", "note": "made with ***", "tokenizer": "bundled", "max_tokens": 8}
    assert meta["command"] == "onegpu verb --token '***' '--api_key=***'"  # W&B's copy of argv: searched above
