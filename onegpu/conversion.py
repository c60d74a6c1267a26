"""The engine of ``onegpu model prepare`` (onegpu/model.py checks the source and decides whether to build):
HF-format weights -> a verified litgpt checkpoint.

* the bundled GGUF: de-quantized by transformers, its tokenizer set up as SmolLM2's;
* a hub repo or a local HF dir: config.json first, the litgpt config it needs (``--model_name``, a
  pushed fine-tune's lineage, or the hub id / dir name) checked against its architecture before any
  weights are fetched, then weights and tokenizer;
* litgpt's ``convert_hf_checkpoint`` in a temporary dir, then :func:`verify_checkpoint` (files,
  config, tokenizer, state-dict keys and shapes against the config on the meta device) before the
  rename into place.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects
from litgpt import GPT, Config, Tokenizer
from litgpt.config import configs
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

from onegpu.contracts import PUSHED_FILES, PUSHED_LINEAGE, read_json, scratch_dir, staged_dir
from onegpu.errors import UserError
from onegpu.model import BUNDLED_GGUF, BUNDLED_NAME, ModelSource, file_sha256, write_provenance

# Files a litgpt checkpoint dir needs (plus the HF config for exports back to HF format, and what
# `onegpu model push` published beside a fine-tune: its lineage and training format).
CHECKPOINT_FILES = (
    "lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
    "generation_config.json", "config.json", "tokenizer.model", "special_tokens_map.json", *PUSHED_FILES,
)
# What to fetch from a hub repo besides the weights (litgpt's own download takes the same).
HUB_SUPPORT_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json"]

# What the GGUF -> transformers round trip writes is wrong for SmolLM2 (CodeLlamaTokenizer, which
# mangles spaces; eos = <|im_start|>). This is SmolLM2's real tokenizer setup.
SMOLLM2_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    # litgpt prepends BOS for SmolLM2-*Instruct dirs by *name*; saying it here keeps that true for
    # renamed copies too (a fine-tune's out/final), so training, eval and serving agree.
    "add_bos_token": True,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 8192,
    "chat_template": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
SMOLLM2_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

# HF config.json keys (by architecture family) -> litgpt Config fields, for matching architectures.
HF_ARCH_FIELDS = {
    "n_layer": ("num_hidden_layers", "n_layer", "num_layers"),
    "n_embd": ("hidden_size", "n_embd", "d_model"),
    "n_head": ("num_attention_heads", "n_head"),
    "n_query_groups": ("num_key_value_heads", "num_kv_heads"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "vocab_size": ("vocab_size",),
}


def build(source: ModelSource, out: Path, model_name: str | None, rebuild: bool) -> None:
    """``model_name`` checked against litgpt's configs first; then, when ``rebuild``, the checkpoint of
    ``source`` converted, verified and renamed into ``out``."""
    if model_name is not None:
        litgpt_config(model_name)  # an unknown name fails here, before anything is fetched
    if not rebuild:
        return
    if source.kind == "bundled":
        convert_bundled(source, out)
    else:
        prepare_from_source(HubRepo(source) if source.kind == "hub" else LocalDir(source), out, model_name)


def convert_bundled(source: ModelSource, out: Path) -> None:
    """The bundled GGUF de-quantized by transformers, its tokenizer set up as SmolLM2's, converted into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional: not in the serving image

    gguf_path = source.path
    print(f"[onegpu] converting {gguf_path.name} (bundled {BUNDLED_NAME}) -> litgpt checkpoint in {out}",
          file=sys.stderr)
    with scratch_dir(out.parent, f"{out.name}-hf") as tmp:  # a killed run's goes next time
        hf_dir = tmp / "hf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=BUNDLED_GGUF,
                                                            dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=BUNDLED_GGUF)
        hf_model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        del hf_model
        fix_smollm2_tokenizer(hf_dir)
        convert_hf_dir(hf_dir, out, BUNDLED_NAME, source.provenance, move=True)


def fix_smollm2_tokenizer(hf_dir: Path) -> None:
    """Replace the GGUF-derived tokenizer setup with SmolLM2's real one.

    tokenizer.json: the GGUF export prepends <|im_start|> to every encoding and decodes with a
    SentencePiece-style '▁' replacement; SmolLM2 is plain byte-level BPE with neither.
    """
    tok_path = hf_dir / "tokenizer.json"
    spec = json.loads(tok_path.read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(SMOLLM2_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    gen.update(SMOLLM2_GENERATION_CONFIG)
    gen_path.write_text(json.dumps(gen, indent=2), encoding="utf-8")
    (hf_dir / "chat_template.jinja").unlink(missing_ok=True)  # the template lives in tokenizer_config


# ------------------------------------------------------------------------- local dirs and the hub
class ModelFiles:
    """Where the HF-format files of a model source come from: the hub (:class:`HubRepo`) or a local
    dir (:class:`LocalDir`).

    ``files()`` lists the repo's files, ``fetch(patterns, into)`` puts the ones matching
    huggingface_hub's ``allow_patterns`` into ``into``; :func:`prepare_from_source` is the one path
    from there to a verified checkpoint, so a local dir (a ``model push --dry_run`` folder included)
    and a hub repo are prepared alike.
    """

    def __init__(self, source: ModelSource):
        self.source = source
        self.name = source.name  # what litgpt_name_for reads: the hub id, or the dir's name

    def files(self) -> list[str]:
        raise NotImplementedError

    def fetch(self, patterns: list[str], into: Path) -> None:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        raise NotImplementedError


class HubRepo(ModelFiles):
    def __init__(self, source: ModelSource):
        super().__init__(source)
        self.info = None

    def files(self) -> list[str]:
        with self.errors():
            self.info = HfApi(token=self.source.token).model_info(self.name, revision=self.source.revision)
        return [s.rfilename for s in self.info.siblings or []]

    def fetch(self, patterns: list[str], into: Path) -> None:
        with self.errors():
            snapshot_download(self.name, revision=self.info.sha, token=self.source.token, local_dir=into,
                              allow_patterns=patterns)

    def provenance(self) -> dict[str, Any]:
        card = getattr(self.info, "card_data", None) or getattr(self.info, "cardData", None)
        return {**self.source.wanted, "hub_id": self.name, "commit": self.info.sha,
                "license": card.get("license") if hasattr(card, "get") else None}

    def errors(self):
        return _hub_errors(self.name, self.source.revision, self.source.token)


class LocalDir(ModelFiles):
    """A local HF model dir: what ``save_pretrained`` writes, or a ``model push --dry_run`` folder."""

    def files(self) -> list[str]:
        path = self.source.path
        return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())

    def fetch(self, patterns: list[str], into: Path) -> None:
        for name in filter_repo_objects(self.files(), allow_patterns=patterns):  # the hub download's own selection
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.source.path / name, into / name)

    def provenance(self) -> dict[str, Any]:
        return {**self.source.wanted, "config_sha256": file_sha256(self.source.path / "config.json")}


def prepare_from_source(source: ModelFiles, out: Path, model_name: str | None) -> None:
    """config.json and what `onegpu model push` published first -> the litgpt config -> the architecture
    check -> weights + tokenizer -> convert, verify, rename into ``out``.

    The litgpt config: ``--model_name``, else the one a pushed fine-tune names in its lineage, else
    the one the hub id or dir name matches. A pushed ``prompt_style.yaml`` and lineage stay in the
    checkpoint, so serving and evaluation use the format the model was trained with.
    """
    with staged_dir(out) as staged:
        hf_dir = staged / "hf"
        hf_dir.mkdir()
        files = source.files()
        source.fetch(["config.json", *PUSHED_FILES], hf_dir)
        hf_config = _read_hf_config(hf_dir / "config.json", where=source.name)
        pushed = read_json(hf_dir / PUSHED_LINEAGE)
        name = model_name or pushed.get("litgpt_model_name") or litgpt_name_for(source.name, hf_config)
        check_architecture(hf_config, name, source=source.name)
        print(f"[onegpu] fetching {source.name} -> litgpt checkpoint {name} in {out}", file=sys.stderr)
        source.fetch(HUB_SUPPORT_FILES + _weight_patterns(source.name, files), hf_dir)
        provenance = {**source.provenance(), "model_name": name}
        if pushed:
            base = pushed.get("base") or {}
            provenance.update(pushed_by="onegpu model push", lineage=PUSHED_LINEAGE, base_hub_id=base.get("hub_id"),
                              prompt_style_file="prompt_style.yaml" if (hf_dir / "prompt_style.yaml").is_file() else None)
        _convert_in_place(hf_dir, staged, name, provenance)


def _weight_patterns(repo_id: str, files: list[str]) -> list[str]:
    if any(f.endswith(".safetensors") for f in files):  # safetensors first: no pickle, and litgpt reads both
        return ["*.safetensors", "*.safetensors.index.json"]
    if any(re.search(r"model.*\.bin$", f) for f in files):
        return ["*model*.bin", "*.bin.index.json"]
    raise UserError(f"{repo_id} has no weight files (*.safetensors or *model*.bin)",
                    fix="check the repo (and --revision) holds the model weights, not only an adapter")


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: str | None):
    """huggingface_hub's exceptions -> one UserError that names the fix."""
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        yield
    except GatedRepoError as err:
        raise UserError(f"{where} is gated and {'this HF_TOKEN has no access' if token else 'no HF_TOKEN is set'}",
                        fix=f"accept the licence on https://huggingface.co/{repo_id} and export HF_TOKEN=hf_... "
                            "(or pass --access_token)") from err
    except RevisionNotFoundError as err:
        raise UserError(f"{repo_id} has no revision {revision!r}",
                        fix="pass a commit sha, tag or branch of the repo to --revision") from err
    except RepositoryNotFoundError as err:
        raise UserError(f"hub repo {repo_id} does not exist or is private",
                        fix="check the spelling; for a private repo export HF_TOKEN=hf_... with read access") from err
    except (OSError, ValueError) as err:  # offline mode, DNS/connection errors, HTTP errors
        raise UserError(f"could not reach the Hugging Face hub for {where}: {err}",
                        fix="check network access (and that HF_HUB_OFFLINE is unset); HF_TOKEN for gated or "
                            "private repos; or pass a local HF model dir instead of a hub id") from err
    except Exception as err:  # httpx transport errors are not OSErrors
        if type(err).__module__.startswith(("httpx", "requests", "urllib3")):
            raise UserError(f"could not reach the Hugging Face hub for {where}: {err}",
                            fix="check network access (proxy, DNS); HF_TOKEN for gated or private repos; "
                                "or pass a local HF model dir instead of a hub id") from err
        raise


def _read_hf_config(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{where} is not a Hugging Face model dir (no config.json)",
                        fix="pass `bundled`, a hub id like meta-llama/Llama-2-7b-hf, or a dir from save_pretrained")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- litgpt config names
def litgpt_config(name: str):
    """litgpt's Config of that name; an unknown name lists the closest known ones."""
    try:
        return Config.from_name(name)
    except ValueError as err:
        close = difflib.get_close_matches(name, _litgpt_names(), n=5, cutoff=0.5)
        raise UserError(f"litgpt has no model config named {name!r}"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""),
                        fix="pass --model_name with one of litgpt's configs; "
                            f"families: {', '.join(litgpt_families())}") from err


def _litgpt_names() -> list[str]:
    return [c["name"] for c in configs]


def litgpt_families() -> list[str]:
    """Config names without their size/version suffix: ``Llama``, ``Mistral``, ``SmolLM2``, ..."""
    return sorted({re.split(r"[-_ ](?=v?\d)", n)[0] for n in _litgpt_names()}, key=str.lower)


def litgpt_name_for(source: str, hf_config: dict[str, Any]) -> str:
    """The litgpt config named by a hub id (``org/name`` as litgpt lists it) or a dir/repo name.

    Anything else (a fine-tune in your own repo) is refused with the configs closest by
    architecture, because converting with a guessed config could load wrong weights silently.
    """
    by_hub_id = {f"{c['hf_config']['org']}/{c['hf_config']['name']}".lower(): c["name"] for c in configs}
    names = set(_litgpt_names())
    base = source.rsplit("/", 1)[-1]
    found = by_hub_id.get(source.lower()) or (base if base in names else None)
    if found:
        return found
    close = closest_litgpt_configs(hf_config, base)
    arch = ", ".join(hf_config.get("architectures") or []) or hf_config.get("model_type", "?")
    raise UserError(f"litgpt does not know {source!r} ({arch}; closest litgpt configs by architecture: "
                    f"{', '.join(close) or 'none'})",
                    fix=f"name the litgpt config to convert with: --model_name {close[0] if close else 'NAME'} "
                        f"(families: {', '.join(litgpt_families())}; "
                        "the repos behind each config: `litgpt download list`)")


def _fits(cfg, field: str, value: int) -> bool:
    # HF's vocab_size is often litgpt's padded size (Qwen2.5, phi-2): either one fits.
    return value in (cfg.vocab_size, cfg.padded_vocab_size) if field == "vocab_size" else getattr(cfg, field) == value


def _hf_arch(hf_config: dict[str, Any]) -> dict[str, int]:
    arch = {}
    for field, keys in HF_ARCH_FIELDS.items():
        value = next((hf_config[k] for k in keys if isinstance(hf_config.get(k), int)), None)
        if value is not None:
            arch[field] = value
    return arch


def closest_litgpt_configs(hf_config: dict[str, Any], name: str = "", n: int = 5) -> list[str]:
    """litgpt config names ranked by how many architecture numbers they share, then by name."""
    arch = _hf_arch(hf_config)
    scored = []
    for cfg_name in _litgpt_names():
        cfg = Config.from_name(cfg_name)
        same = sum(_fits(cfg, f, v) for f, v in arch.items())
        scored.append((same, difflib.SequenceMatcher(None, name.lower(), cfg_name.lower()).ratio(), cfg_name))
    scored.sort(reverse=True)
    best = scored[0][0] if scored else 0
    return [s[2] for s in scored[:n] if s[0] == best and best > 0] or [s[2] for s in scored[:n]]


def check_architecture(hf_config: dict[str, Any], name: str, source: str) -> None:
    """Refuse a litgpt config whose sizes differ from the HF config (before any weights are read)."""
    cfg = litgpt_config(name)
    wrong = [f"{f}: {source} has {v}, {name} has {getattr(cfg, f)}"
             for f, v in _hf_arch(hf_config).items() if not _fits(cfg, f, v)]
    if wrong:
        close = closest_litgpt_configs(hf_config, source.rsplit("/", 1)[-1])
        raise UserError(f"litgpt config {name} does not fit {source} ({'; '.join(wrong)})",
                        fix=f"pass --model_name with a config of the same architecture, e.g. {', '.join(close)}")


# ------------------------------------------------------------------------------- convert, verify
def convert_hf_dir(hf_dir: Path, out: Path, model_name: str, provenance: dict[str, Any], move: bool) -> None:
    """litgpt's converter on a HF model dir (moved, or copied when it is the user's), verified, into ``out``."""
    with staged_dir(out) as staged:
        work = staged / "hf"
        if move:
            shutil.move(str(hf_dir), work)
        else:
            shutil.copytree(hf_dir, work)
        _convert_in_place(work, staged, model_name, provenance)


def _convert_in_place(hf_dir: Path, staged: Path, model_name: str, provenance: dict[str, Any]) -> None:
    """Convert ``hf_dir`` (inside ``staged``), keep only the checkpoint files, verify them."""
    with contextlib.redirect_stdout(sys.stderr):  # litgpt pprints; stdout's last line is the checkpoint dir
        convert_hf_checkpoint(checkpoint_dir=hf_dir, model_name=model_name)
    for name in CHECKPOINT_FILES:
        if (hf_dir / name).is_file():
            shutil.move(str(hf_dir / name), staged / name)
    shutil.rmtree(hf_dir)
    write_provenance(staged, provenance)
    verify_checkpoint(staged)


def verify_checkpoint(path: Path) -> None:
    """Raise unless ``path`` is a loadable litgpt checkpoint: files, config, tokenizer, and a state
    dict whose keys and shapes are the config's model (built on the meta device: no memory, no time)."""
    path = Path(path)
    missing = [n for n in ("lit_model.pth", "model_config.yaml") if not (path / n).is_file()]
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise UserError(f"{path} is not a complete litgpt checkpoint: no {', '.join(missing)}",
                        fix="re-run `onegpu model prepare` with --force true")
    try:
        config = Config.from_file(path / "model_config.yaml")
        Tokenizer(path)
        state = torch.load(path / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # yaml, tokenizer and pickle errors alike
        raise UserError(f"{path} does not load: {type(err).__name__}: {err}",
                        fix="re-run `onegpu model prepare` with --force true") from err
    state = state.get("model", state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in expected.keys() - got.keys()]
    problems += [f"unexpected {k}" for k in got.keys() - expected.keys()]
    problems += [f"{k}: {got[k]} vs {expected[k]}" for k in expected.keys() & got.keys() if got[k] != expected[k]]
    if problems:
        shown = "; ".join(sorted(problems)[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise UserError(f"{path}/lit_model.pth does not match its model_config.yaml ({config.name}): {shown}",
                        fix="convert with the litgpt config of this architecture (--model_name), then --force true")
