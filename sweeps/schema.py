"""W&B sweep configs: validation against W&B's own schema, and W&B's grid / random semantics.

``wandb sweep`` validates a config on the server with the JSON schema of W&B's ``sweeps`` engine;
we validate with the very same file (``wandb_sweep_schema.json``, copied unchanged from
``sweeps==0.3.0``, MIT) so a YAML that passes here is one ``wandb sweep`` accepts. The engine
itself is not a dependency: it pins ``numpy<2`` and its top-level package is also called
``sweeps``. Parameter classification (which distribution a parameter is), grid expansion and
random sampling below follow ``sweeps/params.py`` / ``grid_search.py`` line for line in intent:
parameters sorted by name, ``int_uniform``/``q_uniform`` expanded in a grid, the same
percent-point functions for sampling.

Errors name the offending key (``parameters.lora_r.distribution``) and say how to fix it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
from jsonschema import Draft7Validator, validators

from onegpu.contracts import read_yaml
from onegpu.errors import UserError

SCHEMA_PATH = Path(__file__).with_name("wandb_sweep_schema.json")
# W&B passes nested parameters (``parameters: {mix: {parameters: {...}}}``) as one dict value.
NEST = "."


@lru_cache(maxsize=1)
def wandb_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _format_checker():
    checker = jsonschema.FormatChecker()
    # W&B's engine registers these two formats; they decide int_uniform vs uniform for {min, max}.
    checker.checks("float")(lambda value: isinstance(value, float))
    checker.checks("integer")(lambda value: isinstance(value, int) and not isinstance(value, bool))
    return checker


def _validator(schema: dict[str, Any], fill_defaults: bool = False):
    # Sub-schemas ($ref into #/definitions) resolve against the whole document.
    root = wandb_schema()
    cls = Draft7Validator
    if fill_defaults:
        validate_properties = Draft7Validator.VALIDATORS["properties"]

        def set_defaults(validator, properties, instance, schema_):
            errored = False
            for error in validate_properties(validator, properties, instance, schema_):
                errored = True
                yield error
            if not errored and isinstance(instance, dict):
                for prop, sub in properties.items():
                    if isinstance(sub, dict) and "default" in sub:
                        instance.setdefault(prop, sub["default"])

        cls = validators.extend(Draft7Validator, {"properties": set_defaults})
    if schema is not root:  # let "#/definitions/..." refs inside a sub-schema resolve
        schema = {**schema, "definitions": root["definitions"]}
    return cls(schema, format_checker=_format_checker())


# ------------------------------------------------------------------------------------ parameters
def _parameter_kinds() -> list[str]:
    """Definition names a parameter may be, in the order W&B's engine tries them."""
    return [ref["$ref"].split("/")[-1] for ref in wandb_schema()["definitions"]["parameter"]["anyOf"]]


DISTRIBUTIONS = {
    # distribution name -> what it needs (for error messages)
    "constant": "value", "categorical": "values", "categorical_w_probabilities": "values, probabilities",
    "int_uniform": "min, max (integers)", "uniform": "min, max", "q_uniform": "min, max, q",
    "log_uniform_values": "min > 0, max", "q_log_uniform_values": "min > 0, max, q",
    "inv_log_uniform_values": "min > 0, max", "log_uniform": "min, max (natural-log exponents)",
    "q_log_uniform": "min, max (natural-log exponents), q", "inv_log_uniform": "min, max (exponents)",
    "normal": "mu, sigma", "q_normal": "mu, sigma, q", "log_normal": "mu, sigma",
    "q_log_normal": "mu, sigma, q", "beta": "a, b", "q_beta": "a, b, q",
}


def classify_parameter(key: str, spec: Any) -> tuple[str, dict[str, Any]]:
    """Which W&B parameter kind ``spec`` is (e.g. ``param_int_uniform``), with W&B's defaults filled.

    Raises UserError naming ``parameters.<key>`` when it is none of them.
    """
    where = f"parameters.{key}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} is {spec!r}, not a mapping",
                        fix=f"write `{key}: {{values: [...]}}` or `{key}: {{value: X}}`")
    dist = spec.get("distribution")
    if dist is not None and dist not in DISTRIBUTIONS:
        raise UserError(f"{where}.distribution: {dist!r} is not a W&B distribution",
                        fix="use one of: " + ", ".join(sorted(DISTRIBUTIONS)))
    for kind in _parameter_kinds():
        if kind == "param_dict":
            continue
        sub = wandb_schema()["definitions"][kind]
        if not _validator(sub).is_valid(spec):
            continue
        filled = copy.deepcopy(spec)
        _validator(sub, fill_defaults=True).validate(filled)
        _check_bounds(where, kind, filled)
        return kind, filled
    hint = ""
    for bound in ("min", "max", "mu", "sigma", "q"):
        if isinstance(spec.get(bound), str):
            hint = (f" ({bound} is the string {spec[bound]!r}: YAML reads `1e-4` as text, write `1.0e-4`)")
    if dist is not None:
        raise UserError(f"{where}: distribution {dist!r} needs {DISTRIBUTIONS[dist]}, got keys "
                        f"{sorted(spec)}{hint}", fix=f"give exactly: distribution, {DISTRIBUTIONS[dist]}")
    unknown = sorted(set(spec) - {"values", "value", "min", "max", "distribution", "probabilities", "q",
                                  "mu", "sigma", "a", "b", "parameters"})
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}",
                        fix="a W&B parameter has values | value | distribution with min/max, mu/sigma, a/b, q")
    raise UserError(f"{where}: {spec!r} is not a valid W&B parameter{hint}",
                    fix="use `values: [..]` (non-empty list), `value: X`, integer or float `min`/`max`, "
                        "or `distribution: NAME` with its arguments")


def _check_bounds(where: str, kind: str, spec: dict[str, Any]) -> None:
    if "min" in spec and "max" in spec and not spec["min"] < spec["max"]:
        raise UserError(f"{where}: min {spec['min']} is not less than max {spec['max']}",
                        fix="swap them or widen the range")
    if kind == "param_categorical_w_probabilities":
        probs = spec["probabilities"]
        if len(probs) != len(spec["values"]):
            raise UserError(f"{where}.probabilities has {len(probs)} entries for {len(spec['values'])} values",
                            fix="give one probability per value")
        if not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise UserError(f"{where}.probabilities sum to {sum(probs)}", fix="make them sum to 1")


def flat_parameters(parameters: dict[str, Any], prefix: str = "") -> dict[str, tuple[str, dict[str, Any]]]:
    """``{name: (kind, filled spec)}`` sorted by name as W&B's engine does; nested dicts as ``a.b``."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, spec in sorted(parameters.items()):
        name = f"{prefix}{key}"
        if isinstance(spec, dict) and set(spec) == {"parameters"} and isinstance(spec["parameters"], dict):
            out.update(flat_parameters(spec["parameters"], prefix=name + NEST))
        else:
            out[name] = classify_parameter(name, spec)
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"mix.dolly": 1}`` -> ``{"mix": {"dolly": 1}}`` (how W&B hands nested parameters to a run)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(NEST)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# -------------------------------------------------------------------------------- whole config
GRID_KINDS = {"param_categorical", "param_single_value", "param_int_uniform", "param_quniform"}


def validate_sweep_config(config: Any, source: str = "sweep config") -> dict[str, Any]:
    """Validate a sweep config dict against W&B's schema plus the engine's own checks.

    Returns the config (unchanged). Raises UserError naming the offending key.
    """
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a YAML mapping", fix="see sweeps/lora_rank.yaml for the layout")
    known = set(wandb_schema()["properties"])
    for key in config:
        if key not in known:
            raise UserError(f"{source}: unknown top-level key {key!r}",
                            fix="W&B sweep configs allow only: " + ", ".join(sorted(known)))
    if "method" not in config:
        raise UserError(f"{source}: `method` is missing", fix="add `method: grid` (or random, bayes)")
    if config["method"] not in ("grid", "random", "bayes"):
        raise UserError(f"{source}: method {config['method']!r} is not supported here",
                        fix="use grid, random or bayes (`custom` needs W&B's server-side scheduler)")
    if "parameters" not in config or not isinstance(config["parameters"], dict) or not config["parameters"]:
        raise UserError(f"{source}: `parameters` is missing or empty", fix="add `parameters: {NAME: {values: [..]}}`")
    params = flat_parameters(config["parameters"])
    # The whole-document check catches the rest (types of command/metric/early_terminate, ...).
    for error in sorted(_validator(wandb_schema()).iter_errors(config), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise UserError(f"{source}: {path}: {error.message}", fix=_fix_for(path))
    if "command" in config and not all(isinstance(c, (str, int, float)) for c in config["command"]):
        raise UserError(f"{source}: command must be a list of strings", fix='e.g. ["${env}", "onegpu", "finetune", "${args}"]')
    needs_metric = config["method"] == "bayes" or "early_terminate" in config
    if needs_metric and "metric" not in config:
        raise UserError(f"{source}: method {config['method']!r}"
                        f"{' with early_terminate' if 'early_terminate' in config else ''} needs `metric`",
                        fix="add `metric: {name: val_loss, goal: minimize}`")
    if config["method"] == "grid":
        for name, (kind, _spec) in params.items():
            if kind not in GRID_KINDS:
                raise UserError(f"parameters.{name}: a {kind.removeprefix('param_')} distribution cannot be "
                                "enumerated by a grid sweep",
                                fix="give `values: [...]` (or integer min/max, or q_uniform), or use method: random")
    if "early_terminate" in config:
        hyperband_bands(config["early_terminate"])  # raises on an empty band list
    return config


def _fix_for(path: str) -> str:
    if path.startswith("metric"):
        return "metric is {name: KEY, goal: minimize|maximize}"
    if path.startswith("early_terminate"):
        return "early_terminate is {type: hyperband, min_iter: N[, eta: 3]} or {type: hyperband, max_iter: N, s: S}"
    if path.startswith("command"):
        return 'command is a list, e.g. ["${env}", "onegpu", "finetune", "${args}"]'
    return "see W&B's sweep configuration reference (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration)"


def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """A sweep YAML, read (``contracts.read_yaml``) and validated against W&B's schema."""
    return validate_sweep_config(read_yaml(path, "sweep config"), source=str(path))


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- grid and random
def grid_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every grid point in W&B's order: parameters sorted by name, the product of their values."""

    names, value_lists = [], []
    for name, (kind, spec) in flat_parameters(config["parameters"]).items():
        if kind == "param_single_value":
            values = [spec["value"]]
        elif kind == "param_int_uniform":
            values = list(range(spec["min"], spec["max"] + 1))
        elif kind == "param_quniform":
            values = np.arange(spec["min"], spec["max"], spec["q"]).tolist()
        else:
            values = list(spec["values"])
        names.append(name)
        value_lists.append(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*value_lists)]


def sample_point(config: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One random draw of every parameter with W&B's distributions (``sweeps/params.py`` ppf)."""
    return {name: sample_parameter(kind, spec, rng.uniform(0.0, 1.0))
            for name, (kind, spec) in flat_parameters(config["parameters"]).items()}


def _quantize(value: float, q: float) -> Any:
    out = round(value / q) * q
    return int(out) if isinstance(q, int) else float(out)


def sample_parameter(kind: str, spec: dict[str, Any], u: float) -> Any:
    """Value of a parameter at percentile ``u`` in [0, 1] (inverse CDF), as W&B's engine draws it."""
    # the engine of random sampling: scipy.stats takes over a second to load, so not for --help
    from scipy import stats

    lo, hi = spec.get("min"), spec.get("max")
    if kind == "param_single_value":
        return spec["value"]
    if kind == "param_categorical":
        return spec["values"][min(int(u * len(spec["values"])), len(spec["values"]) - 1)]
    if kind == "param_categorical_w_probabilities":
        cumulative = list(itertools.accumulate(spec["probabilities"]))
        return spec["values"][next((i for i, c in enumerate(cumulative) if u < c), len(cumulative) - 1)]
    if kind == "param_int_uniform":
        return int(stats.randint.ppf(u, lo, hi + 1))
    if kind == "param_uniform":
        return float(stats.uniform.ppf(u, lo, hi - lo))
    if kind == "param_quniform":
        return _quantize(float(stats.uniform.ppf(u, lo, hi - lo)), spec["q"])
    if kind == "param_loguniform":  # min/max are natural-log exponents
        return float(math.exp(stats.uniform.ppf(u, lo, hi - lo)))
    if kind == "param_loguniform_v2":
        return float(math.exp(stats.uniform.ppf(u, math.log(lo), math.log(hi) - math.log(lo))))
    if kind == "param_qloguniform":
        return _quantize(math.exp(stats.uniform.ppf(u, lo, hi - lo)), spec["q"])
    if kind == "param_qloguniform_v2":
        return _quantize(math.exp(stats.uniform.ppf(u, math.log(lo), math.log(hi) - math.log(lo))), spec["q"])
    if kind == "param_inv_loguniform":
        return float(math.exp(-stats.uniform.ppf(1 - u, lo, hi - lo)))
    if kind == "param_inv_loguniform_v2":
        a, b = -math.log(hi), -math.log(lo)
        return float(math.exp(-stats.uniform.ppf(1 - u, a, b - a)))
    if kind in ("param_normal", "param_qnormal"):
        value = float(stats.norm.ppf(u, loc=spec["mu"], scale=spec["sigma"]))
        return _quantize(value, spec["q"]) if kind == "param_qnormal" else value
    if kind in ("param_lognormal", "param_qlognormal"):
        value = float(stats.lognorm.ppf(u, s=spec["sigma"], scale=math.exp(spec["mu"])))
        return _quantize(value, spec["q"]) if kind == "param_qlognormal" else value
    if kind in ("param_beta", "param_qbeta"):
        value = float(stats.beta.ppf(u, a=spec["a"], b=spec["b"]))
        return _quantize(value, spec["q"]) if kind == "param_qbeta" else value
    raise UserError(f"parameter kind {kind} is not supported", fix="use a distribution from W&B's list")


def representative_values(kind: str, spec: dict[str, Any]) -> list[Any]:
    """Values that exercise a parameter's range (all categories; both ends of a distribution)."""
    if kind == "param_single_value":
        return [spec["value"]]
    if kind in ("param_categorical", "param_categorical_w_probabilities"):
        return list(spec["values"])
    return [sample_parameter(kind, spec, u) for u in (0.001, 0.5, 0.999)]


# ------------------------------------------------------------------------------------ hyperband
def hyperband_bands(early_terminate: dict[str, Any]) -> list[int]:
    """The iterations at which W&B's hyperband compares runs (``sweeps/hyperband_stopping.py``)."""
    eta = early_terminate.get("eta", 3)
    if "max_iter" in early_terminate:
        band, bands = early_terminate["max_iter"], []
        for _ in range(early_terminate.get("s", 0)):
            band /= eta
            if band < 1:
                break
            bands.append(int(band))
        bands = sorted(bands)
    else:
        bands = [int(early_terminate["min_iter"] * eta**i) for i in range(100)]
    if not bands:
        raise UserError("early_terminate gives no hyperband bands",
                        fix="increase s, decrease eta or increase max_iter (or use min_iter)")
    return bands


def hyperband_should_stop(history: list[float], finished_histories: list[list[float]],
                          early_terminate: dict[str, Any], goal: str) -> str | None:
    """W&B's hyperband rule for one running trial; returns why it should stop, or None.

    At the last band the running trial has reached, the threshold is the ``1/eta`` quantile of
    every trial's metric at that band (lower is better after flipping a ``maximize`` goal); the
    trial stops if its best value so far (its value at the band when ``strict``) is worse.
    """
    sign = -1.0 if goal == "maximize" else 1.0
    eta = early_terminate.get("eta", 3)
    history = [sign * v for v in history]
    everyone = [[sign * v for v in h] for h in finished_histories if h] + ([history] if history else [])
    closest = None
    for band in hyperband_bands(early_terminate):
        if band > len(history):
            break
        values = sorted(h[band - 1] for h in everyone if len(h) >= band)
        closest = (band, values[int(len(values) / eta)] if values else math.inf)
    if closest is None:
        return None
    band, threshold = closest
    value = history[band - 1] if early_terminate.get("strict") else min(history)
    if value > threshold:
        return f"hyperband: {value * sign:.4g} at iteration {band} is worse than the threshold {threshold * sign:.4g}"
    return None


def iter_random_points(config: dict[str, Any], seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    while True:
        yield sample_point(config, rng)
