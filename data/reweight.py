"""``onegpu data reweight``: the next data mix from the validation results (eval-guided mixing).

The challenge's winners won by curating data, iterated by hand. This does one turn of that
iteration by a stated rule, so it can be read, argued with and repeated:

1. **weakness** per task family: ``1 - score`` of each task's primary metric in the ``onegpu eval
   val`` dirs given (a HELM-faithful ``onegpu_helm_*`` task counts as its own task beside its
   likelihood twin), averaged over the family's tasks and the dirs;
2. **pull** per source: the affinity-weighted mean weakness of the families it feeds, from an
   editable table (``data/recipes/affinity.yaml``); a source no family names gets the mean weakness;
3. **update** of the ``weight:`` sources' shares ``p`` (``count:``/``tokens:`` sources keep theirs):
   ``target_s = p_s * exp(rate * (pull_s - mean pull))``, then
   ``new_s = clip(lam * target_s, max(floor, p_s - max_step), p_s + max_step)`` with ``lam`` the one
   scale that makes the shares sum to 1: a bounded step, and no source below ``floor``, so the mix
   never collapses onto one source;
4. the new recipe, with a comment block saying what changed and why (old -> new share per source,
   the weakness per family and the rule's settings), written where ``data build`` can read it.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from onegpu.contracts import atomic_write_text, read_json, read_yaml
from onegpu.data.families import DEFAULT_AFFINITY, read_affinity, task_family
from onegpu.errors import UserError
from onegpu.tables import text_table


def read_scores(results: list[Path]) -> dict[str, list[float]]:
    """{task: [primary score per results dir]} from ``onegpu eval val`` dirs."""
    if not results:
        raise UserError("no validation results given", fix="pass --results DIR (an `onegpu eval val --out` dir)")
    scores: dict[str, list[float]] = defaultdict(list)
    for d in results:
        path = Path(d) / "results.json"
        data = read_json(path) if path.is_file() else None
        if not isinstance(data, dict) or data.get("stage") != "eval-val" or not isinstance(data.get("tasks"), dict):
            raise UserError(f"{d} is not an `onegpu eval val` results dir (no eval-val results.json)",
                            fix="pass the --out dir of `onegpu eval val` (it holds results.json)")
        for task, entry in data["tasks"].items():
            if isinstance(entry.get("primary"), (int, float)):
                scores[task].append(float(entry["primary"]))
    if not scores:
        raise UserError(f"no task in {[str(d) for d in results]} has a score", fix="re-run `onegpu eval val`")
    return scores


def family_weakness(scores: dict[str, list[float]], affinity: dict[str, dict[str, float]]
                    ) -> tuple[dict[str, float], list[str]]:
    """{family: mean(1 - score)} for the families the table knows; the tasks it does not know."""
    by_family: dict[str, list[float]] = defaultdict(list)
    unknown = []
    for task, values in sorted(scores.items()):
        family = task_family(task)
        if family in affinity:
            by_family[family] += [1.0 - min(1.0, max(0.0, v)) for v in values]
        else:
            unknown.append(task)
    if not by_family:
        raise UserError(f"no evaluated task belongs to a family of the affinity table ({', '.join(affinity)}); "
                        f"tasks: {', '.join(sorted(scores))}", fix="add rows for these task families to the table")
    return {f: sum(v) / len(v) for f, v in by_family.items()}, unknown


def source_pull(sources: list[str], weakness: dict[str, float], affinity: dict[str, dict[str, float]]) -> dict[str, float]:
    """Affinity-weighted mean weakness of the families each source feeds (the mean weakness if none)."""
    neutral = sum(weakness.values()) / len(weakness)
    pull = {}
    for s in sources:
        pairs = [(affinity[f].get(s, 0.0), w) for f, w in weakness.items()]
        total = sum(a for a, _ in pairs)
        pull[s] = sum(a * w for a, w in pairs) / total if total > 0 else neutral
    return pull


def update_shares(shares: dict[str, float], pull: dict[str, float], rate: float, max_step: float,
                  floor: float) -> dict[str, float]:
    """The update rule (module docstring, step 3): exponentiated pull, bounded step, floor, sum 1."""
    mean_pull = sum(shares[s] * pull[s] for s in shares)
    target = {s: shares[s] * math.exp(rate * (pull[s] - mean_pull)) for s in shares}
    lo = {s: max(floor, shares[s] - max_step) for s in shares}
    hi = {s: max(lo[s], shares[s] + max_step) for s in shares}

    def total(lam: float) -> float:
        return sum(min(hi[s], max(lo[s], lam * target[s])) for s in shares)

    if sum(lo.values()) >= 1.0:  # the floors alone fill the mix
        return {s: lo[s] / sum(lo.values()) for s in shares}
    a, b = 0.0, 1.0
    while total(b) < 1.0 and b < 1e12:
        b *= 2
    for _ in range(100):  # bisection: total() is monotone in lam
        mid = (a + b) / 2
        a, b = (mid, b) if total(mid) < 1.0 else (a, mid)
    return {s: min(hi[s], max(lo[s], b * target[s])) for s in shares}


def reweight(results: list[Path] | None = None, recipe: Path | None = None, out: Path | None = None, affinity: Path = DEFAULT_AFFINITY, rate: float = 2.0,
             max_step: float = 0.1, floor: float = 0.05) -> dict[str, Any]:
    """Write the next recipe: the ``weight:`` sources reweighted toward the tasks the results are weakest on.

    Args:
        results: ``onegpu eval val`` output dirs (their ``results.json``); several are averaged.
        recipe: the recipe YAML the evaluated model was trained on.
        out: the new recipe YAML (its relative file paths are rewritten to stay valid there).
        affinity: the task-family -> source affinity table (default ``data/recipes/affinity.yaml``).
        rate: how hard a source's pull moves its share (the exponent's factor).
        max_step: the most a source's share of the weighted budget moves in one turn (0.1 = 10 points).
        floor: the least share any weighted source keeps (the mix never collapses).

    Returns:
        {source: {old_share, new_share, old_weight, new_weight, pull}}, also printed.
    """
    if recipe is None or out is None:
        raise UserError("reweight needs the recipe the model was trained on and where to write the new one",
                        fix="onegpu data reweight --results EVAL_DIR --recipe RECIPE.yaml --out NEW.yaml")
    results = [Path(r) for r in results or []]
    if not (rate >= 0 and 0 < max_step <= 1 and 0 <= floor < 1):
        raise UserError(f"rate {rate}, max_step {max_step}, floor {floor}: out of range",
                        fix="use rate >= 0, 0 < max_step <= 1, 0 <= floor < 1 (e.g. 2.0, 0.1, 0.05)")
    recipe, out = Path(recipe), Path(out)
    from onegpu.data.recipe import load_recipe  # the engine: litgpt (the prompt styles) loads here, not for --help

    load_recipe(recipe)  # a bad recipe fails here, as `data build` would fail on it
    raw = read_yaml(recipe, "recipe")
    weighted = [s for s in raw["sources"] if "weight" in s]
    if len(weighted) < 2:
        raise UserError(f"recipe {recipe} has {len(weighted)} `weight:` source(s); there is no mix to reweight",
                        fix="give at least two sources a `weight:` (count/tokens sources keep their size)")
    names = [s["name"] for s in weighted]
    if floor * len(names) >= 1:
        raise UserError(f"floor {floor} x {len(names)} weighted sources leaves nothing to move",
                        fix=f"use --floor below {1 / len(names):.3f}")
    table = read_affinity(affinity)
    weakness, unknown = family_weakness(read_scores(results), table)
    old_total = sum(float(s["weight"]) for s in weighted)
    shares = {s["name"]: float(s["weight"]) / old_total for s in weighted}
    pull = source_pull(names, weakness, table)
    new = update_shares(shares, pull, rate, max_step, floor)
    changes = {n: {"old_share": shares[n], "new_share": new[n], "old_weight": float(s["weight"]),
                   "new_weight": round(new[n] * old_total, 4), "pull": pull[n]} for n, s in zip(names, weighted)}
    for s in weighted:
        s["weight"] = changes[s["name"]]["new_weight"]
    rebase_paths(raw, recipe.parent, out.parent)
    raw["name"] = out.stem
    kept = [s["name"] for s in raw["sources"] if "weight" not in s]
    header = comment_block(recipe, results, affinity, weakness, unknown, changes, rate, max_step, floor, kept)
    text = header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    load_recipe(out)  # what we wrote is a recipe `data build` accepts
    print("\n".join(line[2:] for line in header.splitlines() if line) + f"\nnew recipe: {out}\nbuild it: onegpu data build {out} --out DIR")
    return changes


def rebase_paths(raw: dict[str, Any], old_dir: Path, new_dir: Path) -> None:
    """Local-file sources' relative paths, rewritten relative to the new recipe's dir."""
    for s in raw["sources"]:
        if s.get("path") and not Path(s["path"]).is_absolute():
            s["path"] = os.path.relpath((old_dir / s["path"]).resolve(), new_dir.resolve())


def comment_block(recipe: Path, results: list[Path], affinity: Path, weakness: dict[str, float], unknown: list[str],
                  changes: dict[str, dict[str, float]], rate: float, max_step: float, floor: float,
                  kept: list[str]) -> str:
    """What changed and why, as YAML comments at the top of the new recipe."""
    mean_pull = sum(c["old_share"] * c["pull"] for c in changes.values())
    lines = [f"Reweighted by `onegpu data reweight` from {recipe}",
             f"results: {', '.join(str(r) for r in results)}; affinity table: {affinity}",
             f"rule: target = share * exp({rate} * (pull - {mean_pull:.3f})); new share = clip(scale * target, "
             f"max({floor}, share - {max_step}), share + {max_step}), shares sum to 1",
             "weakness (1 - score) per task family: "
             + ", ".join(f"{f} {w:.3f}" for f, w in sorted(weakness.items(), key=lambda x: -x[1]))]
    if kept:
        lines.append(f"unchanged (count/tokens sources keep their size): {', '.join(kept)}")
    if unknown:
        lines.append(f"not used (no family in the affinity table): {', '.join(unknown)}")
    rows = []
    for name, c in changes.items():
        delta = c["new_share"] - c["old_share"]
        why = ("its tasks are weaker than the mix's average: more" if c["pull"] > mean_pull + 1e-9 else
               "its tasks are stronger than the mix's average: less" if c["pull"] < mean_pull - 1e-9 else "neutral")
        bound = " (at the floor)" if abs(c["new_share"] - floor) < 1e-6 else \
            " (step bound)" if abs(abs(delta) - max_step) < 1e-6 else ""
        rows.append((name, f"{c['old_share']:.3f} -> {c['new_share']:.3f}", f"{c['old_weight']:g} -> {c['new_weight']:g}",
                     f"{c['pull']:.3f}", why + bound))
    lines += text_table(("source", "share", "weight", "pull", "why"), rows, cell=str).splitlines()
    return "".join(f"# {line}\n" for line in lines) + "\n"
