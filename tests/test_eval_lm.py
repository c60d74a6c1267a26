"""The lm-eval wrapper (`eval/lm.py`) scores exactly like lm-eval's own HFLM on the same weights
(HFLM given the same BOS decision, `add_bos_token`, that the inference layer makes for both)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(bundled_checkpoint, shared_datasets, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    from onegpu.eval.lm import LitGPTLM
    from onegpu.inference import export_hf

    torch.set_num_threads(1)  # shared 2-core CI: a second thread spin-waits more than it computes
    hf_dir = export_hf(bundled_checkpoint, tmp_path_factory.mktemp("hf") / "model")
    ours = LitGPTLM(bundled_checkpoint, batch_size=4, device="cpu", dtype="float32", prompt_style="raw")
    theirs = HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32",
                  add_bos_token=ours.add_bos_token)
    return ours, theirs


_MANAGER = []


def _evaluate(lm, task, **kw):
    from lm_eval import simple_evaluate

    from onegpu.eval.harness import task_manager

    if not _MANAGER:  # offline tasks only: indexing lm-eval's own thousands of YAMLs takes seconds
        _MANAGER.append(task_manager(["onegpu_"])[0])
    manager = _MANAGER[0]
    return simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True, **kw)


def test_multiple_choice_matches_hflm(models):
    ours, theirs = models
    task = "onegpu_bigbench_emoji_movie"  # 5 choices per question, short prompts: cheap on a CPU
    a = _evaluate(ours, task, limit=3)
    b = _evaluate(theirs, task, limit=3)
    lls_a = [float(r[0][0]) for s in a["samples"][task] for r in s["resps"]]
    lls_b = [float(r[0][0]) for s in b["samples"][task] for r in s["resps"]]
    assert len(lls_a) == len(lls_b) == 15
    assert max(abs(x - y) for x, y in zip(lls_a, lls_b)) <= 1e-4
    assert a["results"][task]["acc,none"] == pytest.approx(b["results"][task]["acc,none"], abs=1e-4)


def test_generation_matches_hflm(models):
    ours, theirs = models
    kw = dict(limit=2, num_fewshot=0, gen_kwargs={"max_gen_toks": 16})
    a = _evaluate(ours, "onegpu_gsm8k", **kw)
    b = _evaluate(theirs, "onegpu_gsm8k", **kw)
    gen_a = [s["resps"][0][0] for s in a["samples"]["onegpu_gsm8k"]]
    gen_b = [s["resps"][0][0] for s in b["samples"]["onegpu_gsm8k"]]
    assert gen_a == gen_b and all(g.strip() for g in gen_a)  # real text, identical
    for key, value in b["results"]["onegpu_gsm8k"].items():
        if isinstance(value, float):
            assert a["results"]["onegpu_gsm8k"][key] == pytest.approx(value, abs=1e-4)


def test_stop_strings_and_batching(models):
    """Batched, left-padded decoding gives the same text as one request at a time, cut at the stop."""
    from lm_eval.api.instance import Instance

    ours, _ = models
    prompts = ["The capital of France is", "Question: What is 2 plus 3?\nAnswer:", "List three colors:\n1."]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    batched = ours.generate_until(reqs, disable_tqdm=True)
    one_by_one = [ours.generate_until([r], disable_tqdm=True)[0] for r in reqs]
    assert batched == one_by_one
    assert all("\n" not in text for text in batched)



@pytest.mark.parametrize("task,kw", [("onegpu_truthfulqa_mc1", dict(limit=3)),          # 6-shot preamble, long lists
                                     ("onegpu_bbq", dict(limit=3)),                     # shared contexts
                                     ("onegpu_mmlu_philosophy", dict(limit=2, num_fewshot=5))])
def test_shared_context_scores_are_bit_identical_to_hflm(models, task, kw):
    """Each context computed once (``shared_context``, the default) gives HFLM's log-likelihoods and
    greedy flags to the last bit, on offline-suite tasks and 5-shot MMLU, while computing fewer
    positions than there are in the requests."""
    ours, theirs = models
    assert ours.shared_context
    before = dict(ours.scorer.stats)
    a = _evaluate(ours, task, **kw)
    b = _evaluate(theirs, task, **kw)
    resps_a = [(float(r[0][0]), bool(r[0][1])) for s in a["samples"][task] for r in s["resps"]]
    resps_b = [(float(r[0][0]), bool(r[0][1])) for s in b["samples"][task] for r in s["resps"]]
    assert len(resps_a) == len(resps_b) >= 6
    assert resps_a == resps_b
    computed = ours.scorer.stats["positions_computed"] - before["positions_computed"]
    positions = ours.scorer.stats["positions"] - before["positions"]
    assert positions > 0 and computed < positions, ours.scorer.stats


def test_shared_context_matches_the_plain_batched_forward(models):
    """The same requests scored with ``shared_context=False`` (HFLM's batched forward on the litgpt
    model): identical to the last bit."""
    ours, _ = models
    task, kw = "onegpu_bigbench_emoji_movie", dict(limit=3)
    shared = _evaluate(ours, task, **kw)
    ours.shared_context = False
    try:
        plain = _evaluate(ours, task, **kw)
    finally:
        ours.shared_context = True
    assert [s["resps"] for s in shared["samples"][task]] == [s["resps"] for s in plain["samples"][task]]
