"""Equal tuning budget per strategy (sorabench.sweep.tuning): the same drawn recipes for every strategy, scored on
val, each strategy's best (recipe, guidance scale) carried to the final split beside the shared recipe; unequal
budgets, changed recipes and a declared protocol the sweep does not run are refused."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from sorabench.config import ConfigError, compose_config, to_container
from sorabench.sweep.run import run_sweep
from sorabench.sweep.tuning import draw_recipes, select_recipes
from tests.conftest import replace_training

TWO = "sweep.params.conditioning.choices=[adaln_zero,in_context]"


class FakeTrain:
    """Stands in for `train`: remembers each trial's config and returns guidance-axis scores whose best is known:
    adaLN-Zero peaks at the largest lr and guidance 2, in-context at the smallest lr and guidance 4."""

    def __init__(self):
        self.configs = []

    def __call__(self, cfg, parent_run_id=None, callbacks=(), tags=None, trial=None, **kwargs):
        self.configs.append(cfg)
        lr, name = float(cfg.optim.lr), str(cfg.conditioning.name)
        best_scale = 2.0 if name == "adaln_zero" else 4.0
        sign = 1.0 if name == "adaln_zero" else -1.0
        metrics = {"eval/acc_all": 0.5, "eval/fvd": 10.0}
        for s in (1.0, 2.0, 4.0):
            metrics[f"eval/cfg{s:g}/acc_all"] = 0.5 + sign * lr * 10 - abs(s - best_scale) * 0.01
        return {"run_id": None, "metrics": metrics}


@pytest.fixture
def fake(monkeypatch):
    return replace_training(monkeypatch, FakeTrain())


def sweep_cfg(tmp_path, sweep, *overrides):
    return compose_config("sweep", [f"sweep={sweep}", f"outputs={tmp_path}", "workers=1", "report=false",
                                    "heartbeat_interval=1", "mlflow.enabled=false", *overrides], command="sweep")


def test_every_strategy_is_tuned_on_the_same_recipes_and_its_best_runs_beside_the_shared_one(tmp_path, fake):
    assert run_sweep(sweep_cfg(tmp_path, "conditioning_tune", TWO, "sweep.tune.trials=3")) == 0
    space = to_container(compose_config("sweep", ["sweep=conditioning_tune"], command="sweep").sweep.tune.space)
    recipes = draw_recipes({"trials": 3, "seed": 0, "space": space})
    tuned_on = {}
    for cfg in fake.configs:
        assert cfg.metrics.real_split == "val"  # selection on val only
        tuned_on.setdefault(str(cfg.conditioning.name), []).append((float(cfg.optim.lr), int(cfg.optim.warmup_steps)))
    lrs = [float(next(o for o in r if o.startswith("optim.lr=")).split("=")[1]) for r in recipes.values()]
    assert sorted(tuned_on["adaln_zero"]) == sorted(tuned_on["in_context"])  # the same candidate recipes
    assert sorted(lr for lr, _ in tuned_on["adaln_zero"]) == sorted(lrs)

    fake.configs.clear()
    assert run_sweep(sweep_cfg(tmp_path, "conditioning_ablation_tuned", TWO, "sweep.seeds=[0]")) == 0
    got = {(str(c.conditioning.name), float(c.optim.lr), float(c.metrics.cfg)) for c in fake.configs}
    assert all(c.metrics.real_split == "final" for c in fake.configs)
    assert ("adaln_zero", 4e-3, 2.0) in got and ("in_context", 4e-3, 2.0) in got  # the shared recipe
    assert ("adaln_zero", max(lrs), 2.0) in got  # each strategy's own best lr and guidance scale
    assert ("in_context", min(lrs), 4.0) in got
    assert len(got) == 4


def test_a_changed_recipe_draw_is_refused_for_an_existing_study(tmp_path, fake):
    assert run_sweep(sweep_cfg(tmp_path, "conditioning_tune", TWO, "sweep.tune.trials=2")) == 0
    with pytest.raises(ConfigError, match="drawn recipes"):
        run_sweep(sweep_cfg(tmp_path, "conditioning_tune", TWO, "sweep.tune.trials=2", "sweep.tune.seed=1"))


def test_a_run_at_another_budget_than_declared_says_so_at_start_and_in_the_report(tmp_path, fake, capsys):
    import mlflow

    cfg = sweep_cfg(tmp_path, "conditioning_ablation", "sweep.protocol.budget=1400", "sweep.seeds=[0]",
                    "sweep.params.conditioning.choices=[adaln_zero]", "mlflow.enabled=true")
    assert run_sweep(cfg) == 0
    assert "deviates from its declared protocol: budget: 1400 steps declared, 1500 run" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name(cfg.study).experiment_id],
                                filter_string="tags.`sorabench.role` = 'study'")[0]
    assert parent.data.tags["sorabench.protocol_deviations"] == "budget: 1400 steps declared, 1500 run"
    assert len(parent.data.tags["sorabench.protocol_hash"]) == 12


def test_the_final_sweep_needs_a_finished_tuning_study(tmp_path, fake):
    with pytest.raises(ConfigError, match="no such study"):
        run_sweep(sweep_cfg(tmp_path, "conditioning_ablation_tuned", TWO))


def trial(strategy, recipe, scores):
    return {"values": {"conditioning": strategy, "recipe": recipe, "seed": 100},
            "metrics": {f"eval/cfg{s:g}/acc_all": v for s, v in scores.items()}}


def test_select_refuses_unequal_budgets_and_breaks_ties_towards_less_guidance():
    recipes = {"r0": ["optim.lr=0.001"], "r1": ["optim.lr=0.004"]}
    trials = [trial("a", "r0", {1: 0.5, 2: 0.5}), trial("a", "r1", {1: 0.4, 2: 0.3}), trial("b", "r0", {1: 0.2})]
    with pytest.raises(ConfigError, match="differ"):
        select_recipes(trials, "conditioning", "acc_all", "maximize", [1.0, 2.0], recipes)
    trials.append(trial("b", "r1", {1: 0.1, 2: math.nan}))
    picks = select_recipes(trials, "conditioning", "acc_all", "maximize", [1.0, 2.0], recipes)
    assert picks["a"]["recipe"] == "r0" and picks["a"]["guidance"] == 1.0  # a tie at 0.5: the smaller scale
    assert picks["a"]["overrides"] == ["optim.lr=0.001", "metrics.cfg=1", "sample.guidance_scale=1"]
    assert picks["b"]["recipe"] == "r0" and picks["b"]["trials"] == 2


def test_draws_are_reproducible_and_within_the_space():
    tune = {"trials": 5, "seed": 3, "space": {"optim.lr": {"low": 1e-3, "high": 8e-3, "log": True},
                                              "optim.warmup_steps": {"choices": [50, 200]}}}
    a, b = draw_recipes(tune), draw_recipes(tune)
    assert a == b and len(a) == 5
    for overrides in a.values():
        lr = float(overrides[0].split("=")[1])
        assert overrides[0].startswith("optim.lr=") and 1e-3 <= lr <= 8e-3
        assert overrides[1] in ("optim.warmup_steps=50", "optim.warmup_steps=200")
    assert draw_recipes({**tune, "seed": 4}) != a


def test_the_guidance_axis_carries_the_binding_headline():
    # a binding tuning sweep selects on eval/cfg<s>/bind_all: the axis must log it where the run scores binding
    from sorabench.metrics.evaluate import _axis_scores

    scored = {"eval/fvd": 1.0, "eval/chance_shape": 0.3, "eval/acc_shape": 0.5, "eval/bind_all": 0.25,
              "eval/bind_twins": 0.1, "eval/bind_object": 0.4, "eval/bind_swap_share": 0.6}
    axis = _axis_scores(scored, 2.0, "eval")
    assert axis["eval/cfg2/bind_all"] == 0.25 and axis["eval/cfg2/bind_twins"] == 0.1
    assert "eval/cfg2/bind_swap_share" not in axis and axis["eval/cfg2/acc_shape"] == 0.5
