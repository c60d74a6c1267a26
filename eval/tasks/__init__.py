"""Offline lm-eval tasks over the local dataset copies (``../shared/datasets`` or ``ONEGPU_DATA_DIR``).

The YAMLs beside this file are lm-eval task templates with ``dataset_path: json``. Their data paths
are placeholders because the datasets dir is only known at run time: ``offline_include_dir()``
renders them into a cache dir (``$ONEGPU_CACHE/eval-tasks/<hash>``) together with normalised
JSONL copies of files whose shape lm-eval cannot use as is (TruthfulQA's ``{answer: label}`` maps,
MMLU CSVs, BBQ's per-category files, BIG-bench ``task.json``), and lm-eval's ``TaskManager`` loads
that dir via ``include_path``. Task names all start with ``onegpu_``; the hub names (``gsm8k``,
``mmlu_philosophy``...) stay available for users with network access.

Row order: BBQ and BIG-bench files are sorted by category/condition, so a ``--limit`` would only
see the first block; they are shuffled once with a fixed seed when normalised.

Every multiple-choice family also gets a HELM-faithful generation variant, ``onegpu_helm_<name>``
(``onegpu_helm_mmlu_<subject>``, ``onegpu_helm_truthfulqa_mc1``, ``onegpu_helm_bbq``,
``onegpu_helm_bigbench_<task>``): HELM's prompt, request and exact-match scoring (``helm_mc.py``).
The hidden eval's families are HELM-faithful tasks only (``helm_hidden.py``): ``onegpu_helm_ethics_<subset>``,
``onegpu_helm_corr2cause``, ``onegpu_helm_math_<subject>``, ``onegpu_helm_dialogsum``; from the hub (the
full files the challenge's HELM fork scored, ``eval/tasks/hub.py``) the same names plus ``onegpu_helm_samsum``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

from onegpu.contracts import scratch_dir
from onegpu.data import hidden
from onegpu.eval.tasks import helm_hidden, helm_mc
from onegpu.paths import cache_dir, shared_datasets_dir

TEMPLATES = Path(__file__).resolve().parent
SHUFFLE_SEED = 1234
BBQ_FILES = ("data/Age.jsonl", "data/Disability_status.jsonl", "data/Nationality.jsonl",
             "data/Physical_appearance.jsonl", "data/Religion.jsonl", "data/Sexual_orientation.jsonl",
             "bbq_lite_from_bigbench/Gender_identity.json", "bbq_lite_from_bigbench/Race_ethnicity.json",
             "bbq_lite_from_bigbench/SES.json")


def offline_include_dir(datasets_dir: Path | None = None) -> Path | None:
    """Render the offline task YAMLs (+ normalised data) and return the dir; None without datasets."""
    datasets_dir = Path(datasets_dir) if datasets_dir else shared_datasets_dir()
    if datasets_dir is None or not datasets_dir.is_dir():
        return None
    datasets_dir = datasets_dir.resolve()
    return rendered_dir(str(datasets_dir), lambda staged, prepared, final: _build(datasets_dir, staged, prepared, final))


def rendered_dir(source: str, build) -> Path:
    """A rendered include dir for ``source`` (built once into ``$ONEGPU_CACHE/eval-tasks/<hash>``)."""
    code = sorted(TEMPLATES.glob("*.y*ml")) + sorted(TEMPLATES.glob("*.py")) + [Path(hidden.__file__)]
    key = hashlib.sha1(source.encode() + b"".join(p.read_bytes() for p in code)).hexdigest()[:12]
    out = cache_dir() / "eval-tasks" / key
    if (out / ".complete").is_file():
        return out
    with scratch_dir(out.parent, out.name) as tmp:  # a killed builder's goes next time
        staged = tmp / "tasks"
        prepared = staged / "data"
        prepared.mkdir(parents=True)
        build(staged, prepared, out / "data")
        (staged / ".complete").write_text(source)
        if out.exists():  # a concurrent builder finished first: keep theirs
            return out
        try:
            staged.rename(out)
        except OSError:
            if not (out / ".complete").is_file():
                raise
    return out


def _render(template: str, out_path: Path, **subs: str) -> None:
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    for key, value in subs.items():
        text = text.replace(f"@{key}@", value)
    out_path.write_text(text, encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build(ds: Path, staged: Path, prepared: Path, final_prepared: Path) -> None:
    subs = {"DATASETS": str(ds), "PREPARED": str(final_prepared)}
    if (ds / "gsm8k" / "test.jsonl").is_file():
        _render("gsm8k.yaml", staged / "onegpu_gsm8k.yaml", **subs)

    tqa = ds / "truthfulqa" / "data" / "v1" / "mc_task.json"
    if tqa.is_file():
        rows = []
        for item in json.loads(tqa.read_text(encoding="utf-8")):
            choices = list(item["mc1_targets"])
            rows.append({"question": item["question"], "choices": choices,
                         "label": [item["mc1_targets"][c] for c in choices].index(1)})
        _write_jsonl(prepared / "truthfulqa_mc1.jsonl", rows)
        _render("truthfulqa_mc1.yaml", staged / "onegpu_truthfulqa_mc1.yaml", **subs)

    for test_csv in sorted((ds / "mmlu" / "test").glob("*_test.csv")):
        subject = test_csv.name[: -len("_test.csv")]
        dev_csv = ds / "mmlu" / "dev" / f"{subject}_dev.csv"
        if not dev_csv.is_file():
            continue
        for split, path in (("test", test_csv), ("dev", dev_csv)):
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)],
                         "answer": int(r["answer"]), "subject": subject} for r in csv.DictReader(fh)]
            _write_jsonl(prepared / "mmlu" / f"{subject}_{split}.jsonl", rows)
        _render("mmlu.yaml", staged / f"onegpu_mmlu_{subject}.yaml", SUBJECT=subject,
                SUBJECT_TEXT=subject.replace("_", " "), **subs)

    bbq_rows = []
    for rel in BBQ_FILES:
        path = ds / "bbq" / rel
        if not path.is_file():
            continue
        if path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))["examples"]
        else:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for r in records:
            bbq_rows.append({"context": r["context"], "question": r["question"],
                             "choices": [r["ans0"], r["ans1"], r["ans2"]], "label": int(r["label"]),
                             "category": r.get("category", path.stem), "context_condition": r.get("context_condition")})
    if bbq_rows:
        random.Random(SHUFFLE_SEED).shuffle(bbq_rows)
        _write_jsonl(prepared / "bbq.jsonl", bbq_rows)
        _render("bbq.yaml", staged / "onegpu_bbq.yaml", **subs)

    for task_json in sorted((ds / "bigbench").glob("**/task.json")):
        rel = task_json.parent.relative_to(ds / "bigbench")
        spec = json.loads(task_json.read_text(encoding="utf-8"))
        examples = spec.get("examples") or []
        if not examples:
            continue  # a parent task whose examples live in subtask dirs
        name = "_".join(rel.parts)
        rows = _bigbench_rows(spec, examples)
        if not rows:
            continue
        random.Random(SHUFFLE_SEED).shuffle(rows)
        _write_jsonl(prepared / "bigbench" / f"{name}.jsonl", rows)
        template = "bigbench_mc.yaml" if "choices" in rows[0] else "bigbench_gen.yaml"
        _render(template, staged / f"onegpu_bigbench_{name}.yaml", NAME=name, **subs)
    _build_helm(ds, staged, prepared, final_prepared)


def _write_helm_task(name: str, fmt: helm_mc.JointFormat, train: list, evaluated: list, staged: Path,
                     prepared: Path, final_prepared: Path) -> None:
    task = f"{helm_mc.HELM_TASK_PREFIX}{name}"
    _write_jsonl(prepared / "helm" / f"{task}.jsonl", helm_mc.task_rows(fmt, train, evaluated))
    yaml_text = helm_mc.task_yaml(task, final_prepared / "helm" / f"{task}.jsonl", fmt)
    (staged / f"{task}.yaml").write_text(yaml_text, encoding="utf-8")


def task_writer(staged: Path, prepared: Path, final_prepared: Path):
    """``write(name, rows, fmt)`` for ``helm_hidden.build``: a JointFormat renders a multiple-choice task,
    anything else a generation task."""
    def write(name: str, rows: list[dict], fmt) -> None:
        _write_jsonl(prepared / "helm" / f"{name}.jsonl", rows)
        data_file = final_prepared / "helm" / f"{name}.jsonl"
        text = helm_mc.task_yaml(name, data_file, fmt) if isinstance(fmt, helm_mc.JointFormat) else \
            helm_hidden.task_yaml(name, data_file, rows)
        (staged / f"{name}.yaml").write_text(text, encoding="utf-8")
    return write


def _build_helm(ds: Path, staged: Path, prepared: Path, final_prepared: Path) -> None:
    """The HELM-faithful generation variants of the multiple-choice families (see helm_mc.py)."""
    (staged / "helm_mc_hooks.py").write_text(helm_mc.HOOKS_MODULE, encoding="utf-8")
    out = {"staged": staged, "prepared": prepared, "final_prepared": final_prepared}
    for test_csv in sorted((ds / "mmlu" / "test").glob("*_test.csv")):
        subject = test_csv.name[: -len("_test.csv")]
        dev_csv = ds / "mmlu" / "dev" / f"{subject}_dev.csv"
        if dev_csv.is_file():
            _write_helm_task(f"mmlu_{subject}", helm_mc.mmlu_format(subject),
                             *helm_mc.mmlu_instances(dev_csv, test_csv), **out)
    tqa = ds / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"  # the 817-question CSV HELM read in 2023
    if tqa.is_file():
        _write_helm_task("truthfulqa_mc1", helm_mc.truthfulqa_format(),
                         *helm_mc.truthfulqa_instances(tqa), **out)
    records = []
    for category in helm_mc.BBQ_CATEGORIES:  # HELM's order; the files present locally
        full, lite = ds / "bbq" / "data" / f"{category}.jsonl", ds / "bbq" / "bbq_lite_from_bigbench" / f"{category}.json"
        if full.is_file():
            records += [json.loads(line) for line in full.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif lite.is_file():
            records += json.loads(lite.read_text(encoding="utf-8"))["examples"]
    if records:
        _write_helm_task("bbq", helm_mc.bbq_format(), *helm_mc.bbq_instances(records), **out)
    (staged / "helm_hidden_hooks.py").write_text(helm_hidden.HOOKS_MODULE, encoding="utf-8")
    helm_hidden.build(helm_hidden.LocalFiles(ds), task_writer(staged, prepared, final_prepared))
    for task_json in sorted((ds / "bigbench").glob("**/task.json")):
        spec = json.loads(task_json.read_text(encoding="utf-8"))
        if spec.get("examples") and helm_mc.bigbench_is_multiple_choice(spec):
            name = "_".join(task_json.parent.relative_to(ds / "bigbench").parts)
            _write_helm_task(f"bigbench_{name}", helm_mc.bigbench_format(spec),
                             *helm_mc.bigbench_instances(spec), **out)


def _bigbench_rows(spec: dict, examples: list[dict]) -> list[dict]:
    """BIG-bench examples -> {prompt, choices, label} (multiple choice) or {prompt, target}."""
    task_prefix = spec.get("task_prefix", "")
    in_prefix = spec.get("example_input_prefix", "Q: ")
    out_prefix = spec.get("example_output_prefix", "\nA:").rstrip(" ")
    multiple_choice = all("target_scores" in e for e in examples)
    rows = []
    for e in examples:
        prompt = task_prefix + in_prefix + e["input"]
        if multiple_choice:
            choices = list(e["target_scores"])
            scores = [e["target_scores"][c] for c in choices]
            if spec.get("append_choices_to_input", True):
                prompt += "\n" + "\n".join(f"  choice: {c}" for c in choices)
            rows.append({"prompt": prompt + out_prefix, "choices": choices, "label": scores.index(max(scores))})
        elif "target" in e:
            target = e["target"] if isinstance(e["target"], str) else e["target"][0]
            rows.append({"prompt": prompt + out_prefix, "target": target})
    return rows
