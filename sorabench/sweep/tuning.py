"""Equal tuning budget per strategy: recipes drawn once, every strategy tuned on the same ones, the best carried over.

A strategy compared at a recipe tuned for another one is compared at a handicap. The fair alternative, and what a
reviewer asks for, is the same tuning budget for every strategy, spent on the selection split (val), and only then
the reported seeds on a split no selection touched. Two sweeps do it with the grid machinery:

1. The tuning sweep (`tune:` in its YAML) draws `trials` recipes from `space` with a fixed seed -- the **same**
   candidate recipes for every strategy, so no strategy gets a luckier draw -- and adds them as the grid axis
   `recipe` (r0, r1, ...). Every (strategy, recipe) cell trains once on val-scored metrics, with the guidance axis
   (`metrics.guidance_scales`) scoring each trial at every scale, so the scale is tuned too at no training cost.
2. The final sweep (`tuned_from:` in its YAML) reads the tuning study's finished trials, picks per strategy the
   (recipe, guidance scale) with the best selection metric, refuses if the strategies did not get the same number of
   finished tuning trials, and runs its grid axis `recipe: [shared, tuned]`: `shared` is the sweep's own fixed recipe
   for every strategy, `tuned` each strategy's own pick. The report ranks each recipe apart and prints the picks.

The drawn recipes and the picks are frozen in the study's user attrs when the sweep first runs: a changed YAML or
a tuning study that changed underneath is refused instead of silently mixing two protocols.
"""

from __future__ import annotations

import math
import random

from sorabench.config import ConfigError, require

RECIPE = "recipe"  # the grid axis a tuned sweep adds
SHARED, TUNED = "shared", "tuned"


def _draw(rng: random.Random, key: str, spec: dict):
    where = f"sweep.tune.space.{key}"
    if "choices" in spec:
        require(isinstance(spec["choices"], list) and spec["choices"], where, spec, "choices must be a non-empty list")
        return rng.choice(spec["choices"])
    require({"low", "high"} <= set(spec) and spec["low"] < spec["high"], where, spec, "needs low < high, or choices")
    low, high = float(spec["low"]), float(spec["high"])
    if spec.get("log"):
        require(low > 0, where, spec, "a log range needs low > 0")
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    if isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
        return int(round(value))
    return float(f"{value:.3g}")  # three significant digits: a readable override, a recipe anyone can retype


def draw_recipes(tune: dict) -> dict[str, list[str]]:
    """{r0: [overrides], r1: ...}: `tune.trials` recipes drawn from `tune.space` with `tune.seed` (default 0)."""
    require(isinstance(tune, dict), "sweep.tune", tune, "must be {trials: N, space: {key: spec}, seed: S}")
    trials, space = tune.get("trials"), tune.get("space") or {}
    require(isinstance(trials, int) and trials >= 1, "sweep.tune.trials", trials, "must be an integer >= 1")
    require(isinstance(space, dict) and space, "sweep.tune.space", space, "must map config keys to {low, high} or "
            "{choices}")
    rng = random.Random(int(tune.get("seed", 0)))
    return {f"r{i}": [f"{key}={_draw(rng, key, space[key])}" for key in sorted(space)] for i in range(trials)}


def candidate_scores(metrics: dict, metric: str, scales: list[float]) -> dict[float | None, float]:
    """{guidance scale: the selection metric} of one tuning trial; {None: eval/<metric>} without a guidance axis."""
    if not scales:
        v = metrics.get(f"eval/{metric}")
        return {None: v} if v is not None else {}
    out = {}
    for s in scales:
        v = metrics.get(f"eval/cfg{s:g}/{metric}")
        if v is not None:
            out[float(s)] = v
    return out


def select_recipes(trials: list[dict], per: str, metric: str, direction: str, scales: list[float],
                   recipes: dict[str, list[str]]) -> dict[str, dict]:
    """Each strategy's best (recipe, guidance scale) from the finished tuning trials.

    `trials`: [{"values": the cell {per: ..., recipe: ..., seed: ...}, "metrics": {eval/...: value}}] (finished
    only). Refuses (ConfigError) unless every strategy has the same number of finished trials and recipe set: the
    equal tuning budget is the point. Ties go to the earlier recipe, then the smaller scale (less guidance).
    """
    require(direction in ("maximize", "minimize"), "sweep.tuned_from.direction", direction, "maximize|minimize")
    by: dict[str, list[dict]] = {}
    for t in trials:
        by.setdefault(str(t["values"][per]), []).append(t)
    require(bool(by), "sweep.tuned_from", per, "the tuning study has no finished trial: run it first")
    budgets = {s: sorted(str(t["values"][RECIPE]) for t in ts) for s, ts in by.items()}
    if len({tuple(b) for b in budgets.values()}) > 1:
        detail = ", ".join(f"{s}: {len(b)} ({' '.join(b)})" for s, b in sorted(budgets.items()))
        raise ConfigError(f"sweep.tuned_from: the strategies' finished tuning trials differ ({detail}); an unequal "
                          "tuning budget would favour one of them: finish the tuning sweep (rerun it) first")
    sign = 1.0 if direction == "maximize" else -1.0
    picks = {}
    order = list(recipes)
    for strategy, ts in sorted(by.items()):
        best = None
        for t in sorted(ts, key=lambda t: order.index(t["values"][RECIPE])):
            for scale, v in sorted(candidate_scores(t["metrics"], metric, scales).items(),
                                   key=lambda kv: -math.inf if kv[0] is None else kv[0]):
                if v is None or not math.isfinite(v):
                    continue
                if best is None or sign * v > sign * best["value"]:
                    best = {"recipe": t["values"][RECIPE], "guidance": scale, "value": float(v)}
        if best is None:
            raise ConfigError(f"sweep.tuned_from: no finite {metric} in {strategy}'s tuning trials")
        overrides = list(recipes[best["recipe"]])
        if best["guidance"] is not None:
            overrides += [f"metrics.cfg={best['guidance']:g}", f"sample.guidance_scale={best['guidance']:g}"]
        picks[strategy] = {**best, "overrides": overrides, "trials": len(ts)}
    return picks


def recipe_overrides(recipe: str, strategy: str, recipes: dict[str, list[str]], picks: dict[str, dict]) -> list[str]:
    """What a cell's `recipe` value adds to the trial's overrides."""
    if recipe == SHARED:
        return []
    if recipe == TUNED:
        if strategy not in picks:
            raise ConfigError(f"sweep.tuned_from: the tuning study has no pick for {strategy!r} "
                              f"(it tuned {sorted(picks)})")
        return list(picks[strategy]["overrides"])
    if recipe not in recipes:
        raise ConfigError(f"sweep.params.recipe: {recipe!r} is not a drawn recipe ({', '.join(recipes)}) nor "
                          f"{SHARED!r}/{TUNED!r}")
    return list(recipes[recipe])


# ---- wiring: the sweep dict as the study sees it, frozen in the study ----------------------------------------------

TUNED_FROM_DEFAULTS = {"per": "conditioning", "direction": "maximize"}


def tuning_trials(storage, study_name: str) -> tuple[list[dict], dict[str, list[str]]]:
    """(the finished trials of the tuning study `study_name` as {values, metrics}, its drawn recipes)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"sweep.tuned_from.study={study_name!r}: no such study in this storage; run the tuning "
                          "sweep first (same outputs= / storage=)") from None
    trials = study.get_trials(deepcopy=False)
    busy = [t.number for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    if busy:
        raise ConfigError(f"sweep.tuned_from.study={study_name!r}: trials {busy[:8]} are still queued or running; "
                          "picks are made from a finished tuning study only")
    recipes = study.user_attrs.get("sorabench.recipes")
    require(isinstance(recipes, dict) and recipes, "sweep.tuned_from.study", study_name,
            "is not a tuning study (it has no drawn recipes: its sweep YAML has no `tune:` section)")
    done = [{"values": t.user_attrs.get("cell") or t.params, "metrics": t.user_attrs.get("metrics") or {}}
            for t in trials if t.state == TrialState.COMPLETE]
    return done, recipes


def expand_sweep(sweep: dict, storage=None) -> dict:
    """The sweep with its recipes resolved: `tune:` draws them and adds the grid axis `recipe`; `tuned_from:` reads
    the tuning study (in `storage`) and picks each strategy's recipe. A sweep with neither is returned as it is."""
    if "tune" in sweep and "tuned_from" in sweep:
        raise ConfigError("sweep: `tune` and `tuned_from` are two steps of the protocol: one sweep each")
    sweep = dict(sweep)
    if "tune" in sweep:
        require(sweep.get("mode") == "grid", "sweep.mode", sweep.get("mode"), "a tuning sweep is a grid")
        recipes = draw_recipes(sweep["tune"])
        require(RECIPE not in (sweep.get("params") or {}), "sweep.params.recipe", RECIPE,
                "is set by `tune:` (the drawn recipes)")
        sweep["recipes"] = recipes
        sweep["params"] = {**(sweep.get("params") or {}), RECIPE: {"choices": list(recipes)}}
    elif "tuned_from" in sweep:
        src = {**TUNED_FROM_DEFAULTS, **(sweep["tuned_from"] or {})}
        require(bool(src.get("study")) and bool(src.get("metric")), "sweep.tuned_from", src,
                "needs study: <the tuning study> and metric: <e.g. acc_all>")
        choices = ((sweep.get("params") or {}).get(RECIPE) or {}).get("choices") or []
        require(bool(choices) and set(choices) <= {SHARED, TUNED}, "sweep.params.recipe", choices,
                f"a tuned sweep's recipe axis takes {SHARED!r} and/or {TUNED!r}")
        if storage is None:  # a caller bug, not the user's: run_sweep and status pass the study's storage
            raise ValueError("expand_sweep: a sweep with tuned_from needs the storage of its tuning study")
        trials, recipes = tuning_trials(storage, str(src["study"]))
        scales = _tuning_scales(trials)
        sweep["recipes"] = recipes
        sweep["picks"] = select_recipes(trials, str(src["per"]), str(src["metric"]), str(src["direction"]), scales,
                                        recipes)
    return sweep


def _tuning_scales(trials: list[dict]) -> list[float]:
    """The guidance scales the tuning trials were scored at (their eval/cfg<s>/ keys); [] without an axis."""
    scales = set()
    for t in trials:
        for key in t["metrics"]:
            head, _, rest = key.partition("/")
            if head == "eval" and rest.startswith("cfg") and "/" in rest:
                try:
                    scales.add(float(rest[3:].split("/", 1)[0]))
                except ValueError:
                    pass
    return sorted(scales)


def protocol_hash(cfg_overrides: list[str], sweep: dict) -> str:
    """What the study's numbers mean, hashed: the fixed overrides, the command line's, the declared protocol, the
    objectives, the drawn recipes and the picks. Adding seeds or choices to a grid leaves it unchanged."""
    import hashlib
    import json

    spec = {k: sweep.get(k) for k in ("command", "fixed", "protocol", "objectives", "recipes", "picks")}
    spec["overrides"] = list(cfg_overrides or [])
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def freeze(study, sweep: dict, cfg_overrides: list[str]) -> str:
    """Record the recipes, picks and protocol hash in the study on its first run; refuse (one line) a later run whose
    sweep means something else. Returns the protocol hash."""
    import json

    digest = protocol_hash(cfg_overrides, sweep)
    current = {"sorabench.recipes": sweep.get("recipes"), "sorabench.picks": sweep.get("picks"),
               "sorabench.protocol_hash": digest}
    for attr, value in current.items():
        if value is None:
            continue
        value = json.loads(json.dumps(value))
        old = study.user_attrs.get(attr)
        if old is None:
            study.set_user_attr(attr, value)
        elif old != value:
            what = {"sorabench.recipes": "the drawn recipes (sweep.tune)",
                    "sorabench.picks": "the tuned picks (the tuning study changed since this study started)",
                    "sorabench.protocol_hash": "the protocol (sweep.fixed, the command line's overrides, "
                                               "sweep.protocol, sweep.objectives or the recipes)"}[attr]
            raise ConfigError(f"study {study.study_name!r}: {what} differ from what it started with "
                              f"({str(old)[:120]} vs {str(value)[:120]}); its finished trials would mix two protocols: "
                              "keep the sweep as it was, or start a new study with study=<name>")
    return digest


def deviations(sweep: dict, max_steps: int) -> list[str]:
    """Where the sweep runs something other than its declared protocol (`protocol.budget` against the trials'
    trainer.max_steps): printed at start, tagged on the parent run and printed in the report's header. Not refused:
    a smoke run of a declared sweep at a tiny budget is legitimate, as long as its numbers say what they are."""
    declared = sweep.get("protocol") or {}
    if "budget" in declared and int(declared["budget"]) != int(max_steps):
        return [f"budget: {declared['budget']} steps declared, {max_steps} run"]
    return []


def tuned_key(sweep: dict) -> str:
    """The grid key each pick belongs to (`tuned_from.per`, the strategy by default)."""
    return {**TUNED_FROM_DEFAULTS, **(sweep.get("tuned_from") or {})}["per"]


def picks_tags(sweep: dict) -> dict[str, str]:
    """The study's parent-run tags of a tuned sweep: where its picks came from and each pick."""
    picks = sweep.get("picks")
    if not picks:
        return {}
    tags = {"sorabench.tuned_from": str((sweep.get("tuned_from") or {}).get("study"))}
    tags.update({f"sorabench.pick.{s}": f"{' '.join(p['overrides'])} (val {p['value']:.4g}, {p['trials']} trials)"
                 for s, p in picks.items()})
    return tags


def recipe_tags(values: dict, sweep: dict) -> dict[str, str]:
    """The run tags of a cell's recipe: which one, and for a tuned cell its pick and the tuning budget."""
    recipe = values.get(RECIPE)
    if recipe is None:
        return {}
    tags = {"sorabench.recipe": str(recipe)}
    if recipe == TUNED:
        pick = (sweep.get("picks") or {}).get(str(values.get(tuned_key(sweep))), {})
        tags.update({"sorabench.tuned_overrides": " ".join(pick.get("overrides", [])),
                     "sorabench.tuned_value": f"{pick.get('value', float('nan')):.4g}",
                     "sorabench.tuning_trials": str(pick.get("trials", "?"))})
    elif recipe != SHARED:
        tags["sorabench.recipe_overrides"] = " ".join((sweep.get("recipes") or {}).get(recipe, []))
    return tags
