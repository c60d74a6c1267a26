"""The prompt format travels from training to serving and eval; output post-processing rules.

The checkpoint is the bundled model's files (symlinked) plus a prompt_style.yaml written with the
same litgpt call the fine-tune uses, so the server sees exactly what a fine-tune's out/final holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from onegpu.data.schema import render
from onegpu.errors import UserError
from onegpu.submission import postprocess
from onegpu.submission.launch import running_server

TRAINED_STYLE = "alpaca"  # what the data manifest named; the fine-tune renders rows with it
QUESTION = "Name the capital of France."


def _linked_checkpoint(bundled: Path, dest: Path) -> Path:
    dest.mkdir()
    for item in bundled.iterdir():
        if item.name != "prompt_style.yaml":
            (dest / item.name).symlink_to(item)
    return dest


@pytest.fixture(scope="module")
def templated_checkpoint(bundled_checkpoint, tmp_path_factory) -> Path:
    from litgpt.prompts import save_prompt_style

    ckpt = _linked_checkpoint(bundled_checkpoint, tmp_path_factory.mktemp("ft") / "final")
    save_prompt_style(TRAINED_STYLE, ckpt)  # as finetune/lora.py does for out/final
    return ckpt


@pytest.fixture(scope="module")
def untemplated_checkpoint(bundled_checkpoint, tmp_path_factory) -> Path:
    return _linked_checkpoint(bundled_checkpoint, tmp_path_factory.mktemp("raw") / "final")


@pytest.fixture(scope="module")
def client(templated_checkpoint):
    # no --prompt_style: the default (auto) must pick the checkpoint's template
    with running_server(templated_checkpoint, "--postprocess", "cut_blank_line,strip", "--max_batch_size", "4",
                        "--max_seq_length", "512", "--num_threads", "1", "--prefix_cache_mb", "16") as url:
        with httpx.Client(base_url=url, timeout=300) as http:
            yield http


@pytest.mark.slow
def test_server_feeds_the_training_format_without_any_flag(client):
    health = client.get("/health").json()
    assert health["prompt_style"] == "Alpaca" and health["postprocess"] == ["cut_blank_line", "strip"]
    trained_prompt, _ = render({"instruction": QUESTION, "input": "", "output": ""}, TRAINED_STYLE)
    shown = client.post("/effective_prompt", json={"prompt": QUESTION}).json()
    assert shown["prompt"] == trained_prompt and "### Instruction" in trained_prompt
    assert shown["tokens"] == client.post("/tokenize", json={"text": trained_prompt}).json()["tokens"]
    # echo scoring sends the prompt as is
    assert client.post("/effective_prompt", json={"prompt": QUESTION, "echo_prompt": True}).json()["prompt"] == QUESTION


def test_real_request_is_templated_and_postprocessed_consistently(client):
    body = client.post("/process", json={"prompt": QUESTION, "max_new_tokens": 24}).json()
    text, tokens = body["text"], body["tokens"]
    assert text and "### Response" not in text and "### Instruction" not in text  # no template text leaks
    assert text == text.strip() and "\n\n" not in text  # strip + cut_blank_line
    assert "".join(t["text"] for t in tokens) == text
    assert body["logprob"] == pytest.approx(sum(t["logprob"] for t in tokens))
    # echo responses are never post-processed: the prompt comes back verbatim, token by token
    echo = client.post("/process", json={"prompt": " padded prompt ", "max_new_tokens": 0, "echo_prompt": True}).json()
    assert echo["text"] == " padded prompt " and "".join(t["text"] for t in echo["tokens"]) == echo["text"]


def test_server_prompt_function_matches_render_for_every_style():
    from litgpt.prompts import PromptStyle

    from onegpu.submission.server import effective_prompt

    for style in ("alpaca", "smollm2", "llama3", "llama2", "flan"):
        engine = SimpleNamespace(prompt_style=PromptStyle.from_name(style))
        assert effective_prompt(engine, QUESTION) == render({"instruction": QUESTION, "input": "", "output": ""}, style)[0]
        assert effective_prompt(engine, QUESTION, echo=True) == QUESTION
    assert effective_prompt(SimpleNamespace(prompt_style=None), QUESTION) == QUESTION


def test_eval_uses_the_same_format(templated_checkpoint, untemplated_checkpoint, capsys):
    from onegpu.inference import resolve_prompt_style

    style = resolve_prompt_style("auto", templated_checkpoint, None)
    assert style.apply(QUESTION) == render({"instruction": QUESTION, "input": "", "output": ""}, TRAINED_STYLE)[0]
    assert resolve_prompt_style("auto", untemplated_checkpoint, None) is None
    assert "no prompt_style.yaml" in capsys.readouterr().err


def test_missing_format_warns_and_serves_raw_unknown_style_lists_known(untemplated_checkpoint, capsys):
    from onegpu.inference import resolve_prompt_style

    assert resolve_prompt_style("auto", untemplated_checkpoint, who="onegpu serve") is None
    warning = capsys.readouterr().err
    assert "no prompt_style.yaml" in warning and "raw" in warning
    with pytest.raises(UserError) as err:
        resolve_prompt_style("alpacca", untemplated_checkpoint)
    assert "alpacca" in err.value.problem and "alpaca" in err.value.fix and "raw" in err.value.fix


@pytest.mark.slow
def test_serve_cli_rejects_unknown_rule_and_style_before_loading(untemplated_checkpoint):
    for flag, value, expect in (("--postprocess", "strip,trim", "cut_blank_line"),
                                ("--prompt_style", "alpacca", "alpaca")):
        result = subprocess.run([sys.executable, "-m", "onegpu", "serve", "--checkpoint", str(untemplated_checkpoint),
                                 flag, value], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and expect in result.stderr and "Traceback" not in result.stderr
    # the Docker image sets rules through ONEGPU_POSTPROCESS (build arg POSTPROCESS): it is read and checked
    env = dict(os.environ, ONEGPU_POSTPROCESS="cut_blank_line,trim")
    result = subprocess.run([sys.executable, "-m", "onegpu", "serve", "--checkpoint", str(untemplated_checkpoint)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "trim" in result.stderr


def _tokens(*texts: str) -> dict:
    toks = [{"text": t, "logprob": -float(i + 1), "top_logprob": {t: -float(i + 1)}} for i, t in enumerate(texts)]
    return {"text": "".join(texts), "tokens": toks, "logprob": sum(t["logprob"] for t in toks)}


MC_PROMPT = "Question: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"


@pytest.mark.parametrize("rules, pieces, prompt, expected", [
    ("strip", (" \n", " Paris", " is", " it", ". ", "\n"), "", "Paris is it."),
    ("cut_blank_line", ("\n", "Paris", ".", "\n", "\n", "Question", ":"), "", "\nParis."),
    ("cut_blank_line", ("Paris", ".\n", " \n", "More"), "", "Paris."),
    ("mc_letter", (" B", ".", " 4", " because"), MC_PROMPT, "B"),
    ("mc_letter", (" (", "C", ")", " 5"), MC_PROMPT, "C"),
    ("mc_letter", (" Banana", " split"), MC_PROMPT, " Banana split"),  # a word, not a letter
    ("mc_letter", (" B", "."), "no options here", " B."),  # not a multiple-choice prompt
    ("drop_answer_prefix", (" The", " answer", " is", " Paris", "."), "", "Paris."),
    ("drop_answer_prefix", (" Answer", ":", " B"), "", "B"),
    ("drop_answer_prefix", (" Paris", ". The answer is", " Paris"), "", " Paris. The answer is Paris"),
    ("drop_answer_prefix,mc_letter,strip", (" The", " answer", " is", " D", ".", "\n\n", "E"), MC_PROMPT, "D"),
])
def test_each_rule_narrows_text_and_tokens_together(rules, pieces, prompt, expected):
    out = postprocess.apply(_tokens(*pieces), postprocess.parse_rules(rules), prompt)
    assert out["text"] == expected
    assert "".join(t["text"] for t in out["tokens"]) == out["text"]
    assert out["logprob"] == pytest.approx(sum(t["logprob"] for t in out["tokens"]))
    assert len(out["tokens"]) <= len(pieces)


def test_rules_are_off_by_default_and_unknown_names_fail():
    result = _tokens(" The answer is", " B", "\n\n")
    assert postprocess.apply(result, postprocess.parse_rules(None)) is result
    assert postprocess.parse_rules("strip,drop_answer_prefix") == ["drop_answer_prefix", "strip"]  # fixed order
    with pytest.raises(UserError) as err:
        postprocess.parse_rules("strip,trim")
    assert "trim" in err.value.problem and "cut_blank_line" in err.value.fix
