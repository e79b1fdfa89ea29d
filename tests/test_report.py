import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sorabench.commands.report import main
from sorabench.config import ConfigError, compose_config
from sorabench.report.attributes import composition
from sorabench.report.reading import reading
from sorabench.report.stats import (
    ALPHA,
    aggregate_history,
    holm,
    holm_across,
    mean_ci95,
    metric_direction,
    min_mannwhitney_p,
    pairwise_tests,
    rank_strategies,
    summarise,
)

# ------------------------------------------------------------------------------------------- pure statistics


def synthetic_runs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "strategy": ["a", "a", "a", "a", "b", "b", "b", "c"],
            "seed": [0, 1, 2, 3, 0, 1, 2, 0],
            "eval/fvd": [1.0, 2.0, 3.0, 4.0, 10.0, 12.0, 17.0, 5.0],
            "eval/acc_all": [0.5, 0.6, np.nan, 0.7, 0.1, 0.2, 0.15, 0.3],
        }
    )


def test_mean_ci95_matches_hand_computed_t_interval():
    mean, ci, n = mean_ci95([1.0, 2.0, 3.0, 4.0])
    # s = sqrt(5/3) = 1.290994, t_{0.975,3} = 3.182446 -> 3.182446 * 1.290994 / 2
    assert (mean, n) == (2.5, 4) and ci == pytest.approx(2.054260, abs=1e-5)
    x = np.array([10.0, 12.0, 17.0])
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean_ci95(x)[1] == pytest.approx((hi - lo) / 2)
    assert mean_ci95([5.0])[0] == 5.0 and math.isnan(mean_ci95([5.0])[1]) and mean_ci95([5.0])[2] == 1
    assert math.isnan(mean_ci95([])[0]) and mean_ci95([np.nan, None])[2] == 0
    assert mean_ci95([3.2, 3.2, 3.2]) == (3.2, 0.0, 3)  # a constant: no rounding noise in the interval


def test_summarise_means_intervals_and_missing_values():
    s = summarise(synthetic_runs(), ["eval/fvd", "eval/acc_all"])
    assert list(s.index) == ["a", "b", "c"] and s.loc["a", "n"] == 4 and s.loc["a", "seeds"] == "0;1;2;3"
    assert s.loc["b", "eval/fvd_mean"] == pytest.approx(13.0)
    assert s.loc["b", "eval/fvd_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std([10, 12, 17], ddof=1) / 3**0.5)
    assert s.loc["a", "eval/acc_all_n"] == 3 and s.loc["a", "eval/acc_all_mean"] == pytest.approx(0.6)
    assert s.loc["c", "eval/fvd_n"] == 1 and math.isnan(s.loc["c", "eval/fvd_ci95"])


def test_direction_and_ranking():
    assert metric_direction("eval/fvd") == "minimize" and metric_direction("val/loss") == "minimize"
    assert metric_direction("eval/acc_all") == "maximize" and metric_direction("eval/acc_colour_unseen") == "maximize"
    assert metric_direction("eval/fvd", "maximize") == "maximize"
    with pytest.raises(ConfigError, match="direction"):
        metric_direction("eval/fvd", "down")
    s = summarise(synthetic_runs(), ["eval/fvd", "eval/acc_all"])
    assert list(rank_strategies(s, "eval/fvd", "minimize").index) == ["a", "c", "b"]
    ranked = rank_strategies(s, "eval/acc_all", "maximize")
    assert list(ranked.index) == ["a", "c", "b"] and list(ranked["rank"]) == [1, 2, 3]


def test_pairwise_p_values_match_scipy():
    runs = synthetic_runs()
    t = pairwise_tests(runs, "eval/fvd", order=["a", "b", "c"])
    assert list(zip(t.a, t.b)) == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = t.iloc[0]
    x, y = [1.0, 2.0, 3.0, 4.0], [10.0, 12.0, 17.0]
    welch = stats.ttest_ind(x, y, equal_var=False)
    mwu = stats.mannwhitneyu(x, y, alternative="two-sided")
    assert ab.welch_p == pytest.approx(welch.pvalue) and ab.welch_t == pytest.approx(welch.statistic)
    assert ab.mwu_p == pytest.approx(mwu.pvalue) and ab.mwu_u == pytest.approx(mwu.statistic)
    assert ab["diff"] == pytest.approx(2.5 - 13.0) and "small n" in ab.note
    assert "cannot reach" in ab.note  # 4 vs 3: the smallest exact two-sided p is 2/35 > 0.05
    # A tie within a strategy keeps the exact test (scipy's default approximates: p = 0.077 < its floor of 0.1)
    tied = pd.DataFrame({"strategy": ["a"] * 3 + ["b"] * 3, "m": [0.73, 0.70, 0.79, 0.31, 0.14, 0.14]})
    assert pairwise_tests(tied, "m").iloc[0].mwu_p == pytest.approx(0.1)
    # c has one run: not tested, and it does not count in the Holm adjustment
    assert t.iloc[1:].welch_p.isna().all() and "at least 2 runs" in t.iloc[2].note
    assert ab.welch_p_holm == pytest.approx(ab.welch_p)
    acc = pairwise_tests(runs, "eval/acc_all", order=["a", "b"]).iloc[0]  # the NaN of a is dropped
    expected = stats.ttest_ind([0.5, 0.6, 0.7], [0.1, 0.2, 0.15], equal_var=False).pvalue
    assert acc.n_a == 3 and acc.welch_p == pytest.approx(expected)
    # Two constants (the binding grid: 0.0039 on every seed against 0 on every seed): scipy says t = inf, p = 0;
    # that is no evidence, so Welch is left undefined and only the exact Mann-Whitney speaks (p = 0.1 at 3 vs 3)
    const = pd.DataFrame({"strategy": ["a"] * 3 + ["b"] * 3, "m": [0.0039] * 3 + [0.0] * 3})
    row = pairwise_tests(const, "m").iloc[0]
    assert math.isnan(row.welch_p) and "Welch undefined" in row.note and row.mwu_p == pytest.approx(0.1)


def test_holm_and_mannwhitney_floor():
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    out = holm([0.2, np.nan])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1])
    assert min_mannwhitney_p(3, 3) == pytest.approx(0.1) and min_mannwhitney_p(5, 5) < 0.05


def test_composition_gap_is_paired_and_states_chance():
    runs = pd.DataFrame(
        {
            "strategy": ["a", "a", "a"],
            "eval/acc_all_seen": [0.5, 0.6, 0.7],
            "eval/acc_all_unseen": [0.3, 0.5, 0.4],
            "eval/chance_all": [1 / 288] * 3,
            "eval/acc_colour_seen": [0.9, 0.9, 0.9],
            "eval/acc_colour_unseen": [0.8, 0.8, 0.8],
            "eval/acc_shape_seen": [1.0, 1.0, 1.0],  # no unseen counterpart: left out
        }
    )
    c = composition(runs)
    assert list(c.attribute) == ["all", "colour"]
    row = c.iloc[0]
    assert row.chance == pytest.approx(1 / 288) and row.seen_mean == pytest.approx(0.6)
    assert row.gap_mean == pytest.approx(0.2) and row.gap_ci95 == pytest.approx(mean_ci95([0.2, 0.1, 0.3])[1])
    assert math.isnan(c.iloc[1].chance)


def test_attributes_follow_the_logged_label_schema():
    from sorabench.report.attributes import attribute_order

    found = ["speed", "all", "colour", "texture"]
    assert attribute_order(found) == ["all", "colour", "speed", "texture"]  # no schema logged: by name
    runs = pd.DataFrame({"tags.eval.attributes": ["speed,colour", None]})
    assert attribute_order(found, runs) == ["all", "speed", "colour", "texture"]  # the dataset's own order first


def test_aggregate_history_mean_band_and_resumed_duplicates():
    h = pd.DataFrame(
        {
            "strategy": ["a"] * 5,
            "run_id": ["r1", "r1", "r2", "r2", "r1"],
            "step": [0, 10, 0, 10, 10],
            "timestamp": [1, 2, 1, 2, 3],  # r1 logged step 10 twice (resume): the later value wins
            "value": [1.0, 99.0, 3.0, 4.0, 2.0],
        }
    )
    agg = aggregate_history(h).set_index("step")
    assert agg.loc[0, "mean"] == 2.0 and agg.loc[10, "mean"] == 3.0
    assert (agg.loc[10, "min"], agg.loc[10, "max"], agg.loc[10, "n"]) == (2.0, 4.0, 2)
    assert agg.loc[10, "ci95"] == pytest.approx(mean_ci95([2.0, 4.0])[1])  # the learning curves' band


def test_power_analysis_matches_the_textbook_and_simulation():
    from scipy import stats

    from sorabench.report.stats import power_analysis

    # d = 1 (diff 1, sd 1): a two-sided two-sample t-test needs 17 per group for 80% power at 0.05 (Cohen 1988).
    runs = pd.DataFrame({"strategy": ["a"] * 3 + ["b"] * 3, "m": [1.0, 2.0, 3.0, 0.0, 1.0, 2.0]})
    p = power_analysis(runs, "m", "a", "b")
    assert p["cohens_d"] == pytest.approx(1.0) and p["seeds_needed"] == 17
    # The power it reports at n = 3 is what a simulation of that test finds.
    rng = np.random.default_rng(0)
    hits = [stats.ttest_ind(rng.normal(1, 1, 3), rng.normal(0, 1, 3)).pvalue < 0.05 for _ in range(4000)]
    assert p["power_at_n"] == pytest.approx(np.mean(hits), abs=0.02)
    # A larger effect needs fewer seeds; one run per side cannot be analysed.
    big = power_analysis(runs.assign(m=runs.m * 3 - (runs.strategy == "b") * 3), "m", "a", "b")
    assert big["seeds_needed"] < 17
    assert math.isnan(power_analysis(runs.iloc[[0, 3]], "m", "a", "b")["seeds_needed"])
    # A huge effect (scipy's noncentral t gives NaN in the lower tail there): power ~1, two seeds suffice.
    huge = power_analysis(pd.DataFrame({"strategy": ["a"] * 3 + ["b"] * 3,
                                        "m": [0.087, 0.088, 0.090, 0.015, 0.018, 0.021]}), "m", "a", "b")
    assert huge["cohens_d"] > 9 and huge["power_at_n"] > 0.99 and huge["seeds_needed"] == 2


def test_power_is_that_of_the_reports_own_decision_welch_at_holms_level():
    from scipy import stats

    from sorabench.report.stats import headline_power, power_analysis, rank_strategies, summarise

    # a learns on every seed (tight), b on one seed of three (wide): Student's pooled test would overstate power
    runs = pd.DataFrame({"strategy": ["a"] * 3 + ["b"] * 3, "m": [0.83, 0.84, 0.86, 0.52, 0.16, 0.18]})
    p = power_analysis(runs, "m", "a", "b", alpha=0.05 / 6)
    # the reported power is what a simulation of Welch's test at that level finds, at the observed means and sds
    sd_a, sd_b = runs.m[:3].std(), runs.m[3:].std()
    rng = np.random.default_rng(0)
    hits = [stats.ttest_ind(rng.normal(0.843, sd_a, 3), rng.normal(0.287, sd_b, 3), equal_var=False).pvalue
            < 0.05 / 6 for _ in range(4000)]
    assert p["power_at_n"] == pytest.approx(np.mean(hits), abs=0.05)
    at_n = {n: np.mean([stats.ttest_ind(rng.normal(0.843, sd_a, n), rng.normal(0.287, sd_b, n),
                                        equal_var=False).pvalue < 0.05 / 6 for _ in range(2000)])
            for n in (p["seeds_needed"] - 1, p["seeds_needed"])}
    assert at_n[p["seeds_needed"] - 1] < 0.8 + 0.04 and at_n[p["seeds_needed"]] > 0.8 - 0.04
    # the stricter level needs more seeds than plain 0.05, and the headline table uses alpha / family
    assert p["seeds_needed"] > power_analysis(runs, "m", "a", "b")["seeds_needed"]
    summary = rank_strategies(summarise(runs, ["m"]), "m", "maximize")
    table = headline_power(runs, summary, ["m"], family=6)
    assert table.alpha.iloc[0] == pytest.approx(0.05 / 6) and table.seeds_needed.iloc[0] == p["seeds_needed"]


def test_reading_names_best_significance_and_chance():
    runs = pd.DataFrame(
        {
            "strategy": ["x"] * 3 + ["y"] * 3,
            "eval/fvd": [10.0, 11.0, 12.0, 30.0, 31.0, 32.0],
            "eval/acc_all": [0.3, 0.31, 0.32, 0.1, 0.1, 0.1],
            "eval/chance_all": [0.01] * 6,
        }
    )
    s = rank_strategies(summarise(runs, ["eval/fvd", "eval/acc_all", "eval/chance_all"]), "eval/fvd", "minimize")
    text = reading(s, pairwise_tests(runs, "eval/fvd", order=list(s.index)), "eval/fvd", "minimize")
    assert "best strategy is x" in text and "runner-up is y" in text and "is significant at p<0.05" in text
    assert "31× chance" in text and "\n" not in text


def test_headline_significance_uses_holm_over_both_tested_metrics():
    # FVD differs at raw p≈0.03 (significant alone), acc_all not at all: adjusted over both metrics' pairs, the
    # headline FVD difference must no longer be called significant.
    runs = pd.DataFrame(
        {
            "strategy": ["x"] * 3 + ["y"] * 3 + ["z"] * 3,
            "eval/fvd": [10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 40.0, 42.0, 44.0],
            "eval/acc_all": [0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.31],
        }
    )
    s = rank_strategies(summarise(runs, ["eval/fvd", "eval/acc_all"]), "eval/fvd", "minimize")
    order = list(s.index)
    raw = {m: pairwise_tests(runs, m, order=order) for m in ("eval/fvd", "eval/acc_all")}
    xy = raw["eval/fvd"].iloc[0]
    assert (xy.a, xy.b) == ("x", "y") and 0.01 < xy.welch_p < ALPHA
    adjusted = holm_across(raw)
    every = np.concatenate([t.welch_p.to_numpy() for t in raw.values()])
    assert adjusted["eval/fvd"].welch_p_holm.iloc[0] == pytest.approx(holm(every)[0])
    assert adjusted["eval/fvd"].welch_p_holm.iloc[0] > ALPHA
    assert "not significant" in reading(s, adjusted["eval/fvd"], "eval/fvd", "minimize")
    assert "is significant" in reading(s, raw["eval/fvd"].assign(welch_p_holm=xy.welch_p), "eval/fvd", "minimize")


# ------------------------------------------------------------------------------------------------ end to end

STUDY = "abl"
SEEDS = (0, 1, 2)
FVD = {"cross_attention": [100.0, 110.0, 120.0], "in_context": [140.0, 150.0, 160.0]}
ACC = {"cross_attention": [0.30, 0.32, 0.34], "in_context": [0.10, 0.12, 0.14]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store for the module: a study parent, 2 strategies x 3 seeds, a failed and a pruned trial,
    plus an experiment with only a failed run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    outputs = tmp_path_factory.mktemp("outputs")
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    exp = client.create_experiment(STUDY, artifact_location=str(outputs / "mlartifacts"))
    parent = client.create_run(exp, run_name=STUDY, tags={"sorabench.role": "study", "sorabench.study": STUDY})
    pid = parent.info.run_id
    now = int(time.time() * 1000)
    trial = 0

    def child(strategy, seed, state, metrics, reason=None):
        nonlocal trial
        tags = {"mlflow.parentRunId": pid, "sorabench.strategy": strategy, "optuna.trial_number": str(trial),
                "optuna.state": state}
        if reason:
            tags["failure_reason"] = reason
        run = client.create_run(exp, run_name=f"trial_{trial}", tags=tags)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now + step, step) for k, points in metrics.items() for step, v in points],
            params=[Param("seed", str(seed)), Param("conditioning.name", strategy)],
        )
        client.set_terminated(run.info.run_id, "FINISHED" if state == "COMPLETE" else "FAILED")
        trial += 1

    for strategy in FVD:
        for i, seed in enumerate(SEEDS):
            fvd, acc = FVD[strategy][i], ACC[strategy][i]
            child(strategy, seed, "COMPLETE", {
                "val/loss": [(0, 1.0 + i), (10, 0.5 + i), (20, 0.25 + i)],
                "train/loss": [(s, 1.0 / (s + 1)) for s in range(0, 21, 5)],
                "eval/fvd": [(10, fvd * 2), (20, fvd)],
                "eval/acc_all": [(20, acc)],
                "eval/acc_all_seen": [(20, acc + 0.05)],
                "eval/acc_all_unseen": [(20, acc - 0.05)],
                "eval/chance_all": [(20, 1 / 288)],
                "model/params": [(0, 12.5e6)],
                "model/gflops": [(0, 3.2)],
            })
    child("cross_attention", 3, "FAIL", {"eval/fvd": [(20, 1.0)]}, reason="CUDA out of memory")
    child("in_context", 3, "PRUNED", {"val/loss": [(0, 9.0)]}, reason="pruned at step 0")
    lonely = client.create_experiment("only_failures", artifact_location=str(outputs / "mlartifacts2"))
    run = client.create_run(lonely, tags={"optuna.state": "FAIL", "failure_reason": "nan loss"})
    client.set_terminated(run.info.run_id, "FAILED")
    plain = client.create_experiment("plain", artifact_location=str(outputs / "mlartifacts3"))
    for seed, fvd in ((0, 5.0), (1, 7.0)):  # no parent run, no optuna tags: the MLflow status decides
        run = client.create_run(plain)
        client.log_batch(run.info.run_id, metrics=[Metric("eval/fvd", fvd, now, 0)],
                         params=[Param("seed", str(seed)), Param("conditioning.name", "adaln_zero")])
        client.set_terminated(run.info.run_id, "FINISHED")
    return outputs, client, pid


def report_cfg(outputs, *overrides):
    return compose_config("report", [f"outputs={outputs}", *overrides], command="report")


def test_end_to_end_report(store, capsys):
    outputs, client, pid = store
    cfg = report_cfg(outputs, f"study={STUDY}", "name=e2e")
    assert main(cfg) == 0
    out_dir = outputs / "report" / "e2e"
    for f in ("report.md", "summary.csv", "pairwise.csv", "runs.csv", "val_loss.png", "eval_fvd.png"):
        assert (out_dir / f).stat().st_size > 0, f
    assert not (out_dir / "eval_acc_all.png").exists()  # a single point is no curve

    summary = pd.read_csv(out_dir / "summary.csv").set_index("strategy")
    assert list(summary.index) == ["cross_attention", "in_context"]  # lower FVD first
    assert summary.loc["cross_attention", "eval/fvd_mean"] == pytest.approx(110.0)  # the failed run's 1.0 left out
    assert summary.loc["in_context", "eval/fvd_mean"] == pytest.approx(150.0)
    assert summary.loc["cross_attention", "eval/fvd_ci95"] == pytest.approx(mean_ci95([100, 110, 120])[1])
    assert summary.loc["in_context", "eval/acc_all_mean"] == pytest.approx(0.12)
    assert (summary["n"] == 3).all() and summary.loc["in_context", "model/params_mean"] == 12.5e6

    runs = pd.read_csv(out_dir / "runs.csv")
    assert len(runs) == 8 and set(runs.state) == {"COMPLETE", "FAIL", "PRUNED"}
    pair = pd.read_csv(out_dir / "pairwise.csv")
    fvd = pair[pair.metric == "eval/fvd"].iloc[0]
    expected = stats.ttest_ind(FVD["cross_attention"], FVD["in_context"], equal_var=False)
    assert fvd.welch_p == pytest.approx(expected.pvalue) and fvd.mwu_p == pytest.approx(0.1)

    md = (out_dir / "report.md").read_text()
    assert "CUDA out of memory" in md and "PRUNED" in md and "110 ± " in md and "![val/loss](val_loss.png)" in md
    assert "best strategy is cross_attention" in md and "Mann–Whitney cannot reach" in md
    assert "0.00347" in md  # chance of all attributes, stated
    assert "cross_attention" in capsys.readouterr().out
    # a report named other than its study is kept apart from the sweep's own (`report/`) in the parent run
    logged = {a.path for a in client.list_artifacts(pid, "reports/e2e")}
    assert {"reports/e2e/report.md", "reports/e2e/summary.csv", "reports/e2e/val_loss.png"} <= logged


def test_the_sweeps_own_report_logs_per_strategy_means_and_later_reports_keep_apart(store, capsys):
    outputs, client, pid = store
    assert main(report_cfg(outputs, f"study={STUDY}", f"name={STUDY}")) == 0  # what a sweep runs at its end
    own = {a.path for a in client.list_artifacts(pid, "report")}
    assert {"report/report.md", "report/summary.csv"} <= own
    before = (outputs / "report" / STUDY / "report.md").read_text()
    metrics = client.get_run(pid).data.metrics
    assert metrics["summary/cross_attention/eval/fvd"] == pytest.approx(110.0)  # the mean over the 3 seeds
    assert metrics["summary/in_context/eval/acc_all"] == pytest.approx(0.12)
    assert main(report_cfg(outputs, f"study={STUDY}", "name=recheck", "metric=eval/acc_all")) == 0
    assert {a.path for a in client.list_artifacts(pid, "report")} == own
    assert {"reports/recheck/report.md"} <= {a.path for a in client.list_artifacts(pid, "reports/recheck")}
    local = client.download_artifacts(pid, "report/report.md", str(outputs / "dl"))
    assert open(local).read().split("generated:")[0] == before.split("generated:")[0]  # not overwritten
    assert client.get_run(pid).data.metrics == metrics  # a recheck logs no summary metrics


def test_accuracy_headline_maximizes(store, capsys):
    outputs, _, _ = store
    assert main(report_cfg(outputs, f"experiment={STUDY}", "metric=eval/acc_all", "name=acc")) == 0
    summary = pd.read_csv(outputs / "report" / "acc" / "summary.csv")
    assert list(summary.strategy) == ["cross_attention", "in_context"] and list(summary["rank"]) == [1, 2]


def test_experiment_without_parent_run(store, capsys):
    outputs, _, _ = store
    assert main(report_cfg(outputs, "experiment=plain", "name=plain")) == 0
    summary = pd.read_csv(outputs / "report" / "plain" / "summary.csv")
    assert list(summary.strategy) == ["adaln_zero"] and summary["n"][0] == 2 and summary["eval/fvd_mean"][0] == 6.0
    md = (outputs / "report" / "plain" / "report.md").read_text()
    assert "only strategy" in md and "parent run: none" in md


def test_unknown_experiment_is_config_error(store):
    outputs, _, _ = store
    with pytest.raises(ConfigError, match=r"study='nope'.*existing experiments: .*abl"):
        main(report_cfg(outputs, "study=nope"))


def test_cli_errors_are_one_line_exit_2(store, capsys):
    from sorabench.cli import main as cli

    outputs, _, _ = store
    assert cli(["report", f"outputs={outputs}", "experiment=only_failures"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no completed runs" in err and "1 FAIL" in err and len(err.splitlines()) == 1
    assert cli(["report", f"outputs={outputs}"]) == 2
    assert "study=<name>" in capsys.readouterr().err
    assert cli(["report", f"outputs={outputs}", f"study={STUDY}", "metric=eval/nope"]) == 2
    assert "eval/nope" in capsys.readouterr().err


def test_missing_store_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no MLflow database"):
        main(report_cfg(tmp_path, "study=x"))


def test_budget_line_states_the_budget():
    from sorabench.report.markdown import budget_line

    flops = pd.DataFrame({"params.budget": ["flops", "flops"], "params.budget_reference": ["adaln_zero"] * 2,
                          "params.trainer.max_steps": ["1200", "800"]})
    assert "equal FLOPs" in budget_line(flops) and "adaln_zero" in budget_line(flops) and "800, 1200" in budget_line(flops)
    assert "equal steps" in budget_line(pd.DataFrame({"params.trainer.max_steps": ["5"]}))
    assert "MIXED" in budget_line(pd.DataFrame({"params.budget": ["flops", "steps"]}))


# ------------------------------------------------------------------------------- group_by and the Pareto front


def test_group_labels_keep_configurations_apart():
    from sorabench.report.runs import group_keys, group_labels

    runs = pd.DataFrame({"strategy": ["a", "a", "b"], "params.optim.lr": ["0.001", "0.002", "0.001"]})
    assert list(group_labels(runs, ["strategy"])) == ["a", "a", "b"]
    assert list(group_labels(runs, group_keys("optim.lr"))) == ["optim.lr=0.001", "optim.lr=0.002", "optim.lr=0.001"]
    assert list(group_labels(runs, ["strategy", "optim.lr"])) == ["a, optim.lr=0.001", "a, optim.lr=0.002",
                                                                  "b, optim.lr=0.001"]
    with pytest.raises(ConfigError, match=r"group_by='dit.width'.*logged: optim.lr"):
        group_labels(runs, ["dit.width"])


def test_pareto_front_is_the_non_dominated_runs():
    from sorabench.report.stats import pareto_front

    runs = pd.DataFrame({"fvd": [10.0, 8.0, 12.0, 8.0, 5.0, np.nan], "gflops": [1.0, 2.0, 1.5, 3.0, 9.0, 0.1]})
    front = pareto_front(runs, [("fvd", "minimize"), ("gflops", "minimize")])
    # 2 dominates 1.5-at-12 (index 2) and 3-at-8 (index 3); the NaN run is never on the front
    assert list(front) == [True, True, False, False, True, False]
    assert list(pareto_front(runs, [("fvd", "maximize"), ("gflops", "minimize")])) == [
        True, False, True, False, False, False]


SEARCH = "search"


@pytest.fixture(scope="module")
def search_store(tmp_path_factory):
    """A two-objective search (as conf/sweep/fvd_vs_gflops.yaml): 2 strategies x 2 widths, one seed each, plus one
    more seed of one configuration."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    outputs = tmp_path_factory.mktemp("outputs")
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    exp = client.create_experiment(SEARCH, artifact_location=str(outputs / "mlartifacts"))
    sweep_yaml = ("name: fvd_vs_gflops\nmode: search\nobjectives:\n  - {metric: eval/fvd, direction: minimize}\n"
                  "  - {metric: model/gflops, direction: minimize}\n")
    pid = client.create_run(exp, tags={"sorabench.role": "study", "sorabench.study": SEARCH,
                                       "sweep_yaml": sweep_yaml}).info.run_id
    now = int(time.time() * 1000)
    cells = [("in_context", 96, 0, 150.0, 1.0), ("in_context", 192, 0, 100.0, 4.0), ("adaln_zero", 96, 0, 120.0, 1.1),
             ("adaln_zero", 192, 0, 130.0, 4.5), ("adaln_zero", 96, 1, 110.0, 1.1)]
    for trial, (strategy, width, seed, fvd, gflops) in enumerate(cells):
        tags = {"mlflow.parentRunId": pid, "sorabench.strategy": strategy, "optuna.trial_number": str(trial),
                "optuna.state": "COMPLETE"}
        run = client.create_run(exp, run_name=f"trial_{trial}", tags=tags)
        client.log_batch(run.info.run_id,
                         metrics=[Metric("eval/fvd", fvd, now, 20), Metric("model/gflops", gflops, now, 0)],
                         params=[Param("seed", str(seed)), Param("conditioning.name", strategy),
                                 Param("dit.width", str(width))])
        client.set_terminated(run.info.run_id, "FINISHED")
    tags = {"mlflow.parentRunId": pid, "sorabench.strategy": "in_context", "optuna.trial_number": str(len(cells)),
            "optuna.state": "FAIL", "failure_reason": "boom"}
    run = client.create_run(exp, run_name=f"trial_{len(cells)}", tags=tags)
    client.log_batch(run.info.run_id, params=[Param("seed", "1"), Param("conditioning.name", "in_context"),
                                              Param("dit.width", "96")])
    client.set_terminated(run.info.run_id, "FAILED")
    return outputs


def test_report_groups_by_a_config_key_and_draws_the_pareto_front(search_store, capsys):
    outputs = search_store
    assert main(report_cfg(outputs, f"study={SEARCH}", "name=pooled")) == 0
    pooled = pd.read_csv(outputs / "report" / "pooled" / "summary.csv")
    assert sorted(pooled.strategy) == ["adaln_zero", "in_context"]  # the default: widths pooled per strategy

    assert main(report_cfg(outputs, f"study={SEARCH}", "name=grouped", "group_by=[strategy,dit.width]")) == 0
    out_dir = outputs / "report" / "grouped"
    summary = pd.read_csv(out_dir / "summary.csv").set_index("group")  # the row label has a column of its own
    assert sorted(summary.index) == ["adaln_zero, dit.width=192", "adaln_zero, dit.width=96",
                                     "in_context, dit.width=192", "in_context, dit.width=96"]
    assert summary.loc["adaln_zero, dit.width=96", "n"] == 2
    assert summary.loc["adaln_zero, dit.width=96", "eval/fvd_mean"] == pytest.approx(115.0)
    assert list(summary.index)[0] == "in_context, dit.width=192"  # ranked by eval/fvd
    md = (out_dir / "report.md").read_text()
    assert "## Rows (group_by: strategy × dit.width), ranked by eval/fvd" in md
    assert "| rank | strategy × dit.width |" in md

    # Pareto front over runs: fvd 150 @ 1.0, 110 @ 1.1 and 100 @ 4.0 are non-dominated; 120 @ 1.1 and 130 @ 4.5 are not
    front = md.split("## Pareto front", 1)[1].split("![Pareto front](pareto.png)", 1)[0]
    # table cells, not substrings: the rows carry MLflow run ids, random hex that may contain "120" or "130"
    assert "| 150 |" in front and "| 110 |" in front and "| 100 |" in front
    assert "| 120 |" not in front and "| 130 |" not in front
    assert (out_dir / "pareto.png").is_file()
    runs = pd.read_csv(out_dir / "runs.csv")
    assert set(runs.strategy) == {"adaln_zero", "in_context"} and "in_context, dit.width=96" in set(runs.group)
    capsys.readouterr()


def test_group_by_keeps_each_runs_strategy(search_store, capsys):
    # The row label (here the width alone) goes to its own column: `strategy` still names each run's conditioning,
    # so the failed run is listed under its strategy, not under its row label.
    outputs = search_store
    assert main(report_cfg(outputs, f"study={SEARCH}", "name=width", "group_by=dit.width")) == 0
    out_dir = outputs / "report" / "width"
    summary = pd.read_csv(out_dir / "summary.csv")
    assert "strategy" not in summary and sorted(summary.group) == ["dit.width=192", "dit.width=96"]
    md = (out_dir / "report.md").read_text()
    failed = md.split("## Failed, pruned and unfinished runs")[1].split("##")[0]
    assert "| in_context | 1 | FAIL | boom |" in failed and "dit.width=96" not in failed
    assert "| rank | dit.width | n |" in md
    out = capsys.readouterr().out  # the terminal's table: the same rows
    assert out.startswith("dit.width by eval/fvd") and "dit.width=96" in out and "dit.width=192" in out


def test_group_by_a_key_no_run_logged_is_one_line(search_store, capsys):
    from sorabench.cli import main as cli

    assert cli(["report", f"outputs={search_store}", f"study={SEARCH}", "group_by=optim.lr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "group_by='optim.lr'" in err and "dit.width" in err and len(err.splitlines()) == 1


def test_mann_whitney_is_exact_with_ties():
    import itertools

    from sorabench.report.stats import mannwhitney_exact

    x, y = np.array([0.2, 0.2, 0.3]), np.array([0.1, 0.1, 0.2])  # seeds at the same accuracy tie
    pooled = np.concatenate([x, y])

    def u(a, b):
        return sum((ai > bi) + 0.5 * (ai == bi) for ai in a for bi in b)

    observed = u(x, y)
    us = [u(pooled[list(i)], np.delete(pooled, list(i))) for i in itertools.combinations(range(6), 3)]
    mean = np.mean(us)
    p = np.mean([abs(v - mean) >= abs(observed - mean) - 1e-12 for v in us])  # every split, ties kept
    got_u, got_p = mannwhitney_exact(x, y)
    assert got_u == observed and got_p == pytest.approx(p)
    assert got_p != pytest.approx(stats.mannwhitneyu(x, y, method="exact").pvalue)  # scipy's ignores the ties
    assert mannwhitney_exact(np.array([1.0, 2, 3]), np.array([4.0, 5, 6]))[1] == pytest.approx(0.1)  # the floor


def test_accuracy_intervals_stay_inside_zero_and_one():
    from sorabench.report.formatting import fmt_ci, metric_bounds

    assert metric_bounds("eval/acc_all") == (0.0, 1.0) and metric_bounds("eval/fvd") is None
    assert fmt_ci(0.198, 0.25, metric_bounds("eval/acc_all")) == "0.198 [0, 0.45]"
    assert fmt_ci(0.5, 0.1, (0.0, 1.0)) == "0.5 ± 0.1" and fmt_ci(-3.0, 5.0) == "-3 ± 5"


def test_equivalence_needs_tost_inside_the_declared_margin():
    from statsmodels.stats.weightstats import ttost_ind

    from sorabench.report.stats import equivalence_tests

    runs = pd.DataFrame({"strategy": ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
                         "m": [0.90, 0.91, 0.92, 0.91, 0.91, 0.90, 0.92, 0.92, 0.60, 0.80, 0.70, 0.90]})
    eq = equivalence_tests(runs, "m", margin=0.05).set_index(["a", "b"])
    assert eq.loc[("a", "b"), "equivalent"]  # 0.01 apart, tight: inside ±0.05
    a, b = runs.m[:4].to_numpy(), runs.m[4:8].to_numpy()
    assert eq.loc[("a", "b"), "tost_p"] == pytest.approx(ttost_ind(a, b, -0.05, 0.05, usevar="unequal")[0])
    assert eq.loc[("a", "b"), "ci90_low"] > -0.05 and eq.loc[("a", "b"), "ci90_high"] < 0.05
    assert not eq.loc[("a", "c"), "equivalent"]  # far apart and noisy: not shown equivalent
    assert eq.loc[("a", "c"), "seeds_for_margin"] > eq.loc[("a", "b"), "seeds_for_margin"]  # c's spread costs seeds


def test_runs_of_different_protocols_are_never_pooled():
    from sorabench.report.runs import check_protocols

    runs = pd.DataFrame({"strategy": ["a", "b"], "tags.eval.protocol.n_generated": ["256", "512"],
                         "params.trainer.precision": ["32-true", "32-true"]})
    with pytest.raises(ConfigError, match=r"eval protocol n_generated: .*'256' \(1 runs\), '512' \(1 runs\)"):
        check_protocols(runs, ["strategy"])
    same = runs.assign(**{"tags.eval.protocol.n_generated": ["256", "256"]})
    assert check_protocols(same, ["strategy"]) == check_protocols(same.iloc[::-1], ["strategy"]) != "none logged"
    mixed = same.assign(**{"params.trainer.precision": ["32-true", "bf16-mixed"],
                           "tags.eval.protocol.precision": ["32-true", "bf16-mixed"]})  # as evaluate tags it
    with pytest.raises(ConfigError, match="precision"):
        check_protocols(mixed, ["strategy"])
    assert check_protocols(mixed, ["strategy", "trainer.precision"])  # rows kept apart by it on purpose


def test_data_seed_replicates_pool_only_where_the_split_differs_as_they_do():
    """A sweep's `replicates: [data.seed]` draws the held-out compositions again: the real split's tag then differs
    between data seeds and the runs are pooled; a split that differs within one data seed is still refused. Each
    run's replicate label names both seeds, and the per-seed table has one column per replicate."""
    from sorabench.report.markdown import per_seed_section
    from sorabench.report.runs import check_protocols, replicate_labels

    runs = pd.DataFrame({"strategy": ["a", "a", "b", "b"], "seed": [0, 0, 0, 0], "params.data.seed": ["0", "1", "0", "1"],
                         "tags.eval.protocol.real_split": ["shapes:x/final", "shapes:y/final"] * 2, "m": [1, 2, 3, 4]})
    with pytest.raises(ConfigError, match="real_split"):
        check_protocols(runs, ["strategy"])  # not declared: refused as before
    assert check_protocols(runs, ["strategy"], replicates=("data.seed",))
    other = runs.assign(**{"tags.eval.protocol.real_split": ["shapes:x/final", "shapes:y/final", "shapes:z/final",
                                                             "shapes:y/final"]})
    with pytest.raises(ConfigError, match="real_split"):  # b's data.seed 0 split is not a's: another data config
        check_protocols(other, ["strategy"], replicates=("data.seed",))
    labelled = runs.assign(replicate=replicate_labels(runs, ("data.seed",)))
    assert list(labelled.replicate[:2]) == ["seed 0, data.seed 0", "seed 0, data.seed 1"]
    md = "\n".join(per_seed_section(labelled, ["m"], ["a", "b"]))
    assert "| strategy | metric | seed 0, data.seed 0 | seed 0, data.seed 1 |" in md and "| b | m | 3 | 4 |" in md


def test_report_prints_the_equivalence_test_at_declared_margins(store, capsys):
    outputs, _, _ = store
    assert main(report_cfg(outputs, f"study={STUDY}", "name=eq", 'margins=["eval/acc_all:0.5","eval/fvd:1.0"]')) == 0
    md = (outputs / "report" / "eq" / "report.md").read_text()
    assert "## Equivalence (TOST at the declared margins)" in md and "power now" not in md
    eq = pd.read_csv(outputs / "report" / "eq" / "equivalence.csv").set_index("metric")
    assert bool(eq.loc["eval/acc_all", "equivalent"])  # 0.2 apart, tight, inside ±0.5
    assert not bool(eq.loc["eval/fvd", "equivalent"])  # 40 apart: not within ±1
    assert "evaluation protocol: `none logged`" in md
    assert "Equivalence within the declared ±1 on eval/fvd is not shown" in md
    with pytest.raises(ConfigError, match="margins.eval/fvd='x': must be a number"):
        main(report_cfg(outputs, f"study={STUDY}", "name=eq2", 'margins=["eval/fvd:x"]'))


def test_binding_tables_hold_the_strategies_the_instrument_and_the_swap_errors():
    from sorabench.report import attributes, markdown

    runs = pd.DataFrame({
        "strategy": ["a", "a", "b"],
        "eval/bind_all": [0.2, 0.4, 0.1], "eval/bind_twins": [0.1, 0.1, 0.0], "eval/bind_count": [0.9, 1.0, 0.8],
        "eval/bind_shape": [0.5, 0.7, 0.4], "eval/bind_chance_all": [1e-3] * 3,
        "eval/real_bind_all": [0.97] * 3, "eval/ceiling_bind_all": [0.9] * 3, "eval/noise_bind_all": [0.0] * 3,
        "eval/bind_wrong_shape": [0.5, 0.3, 0.6], "eval/bind_swap_shape": [0.2, 0.2, 0.5],
        "eval/bind_swap_share": [0.4, 0.6, 0.8], "eval/bind_swap_share_chance": [0.5] * 3,
    })
    scores, errors = attributes.binding_tables(runs, order=["b", "a"])
    assert list(scores.strategy[:2]) == ["b", "a"] and scores.n.tolist()[:2] == [1, 2]
    assert scores.loc[1, "all"] == "0.3 [0, 1]" and scores.loc[0, "all"] == "0.1"  # the 95% CI, cut to [0, 1]
    assert list(scores.strategy[2:]) == [*attributes.REFERENCE_SOURCES.values(), "chance (uniform guess)"]
    assert scores.iloc[2]["all"] == "0.97" and scores.iloc[-1]["all"] == "0.001"
    assert errors.loc[0, "shape"] == "0.6 / 0.5" and errors.loc[1, "swap_share"].startswith("0.5 ")
    md = "\n".join(markdown.binding_section(scores, errors))
    assert "## Binding" in md and "shape wrong / swap" in md and "| b | 1 |" in md
    assert attributes.binding_tables(runs.drop(columns="eval/bind_all"))[0].empty


def test_a_tuned_study_is_ranked_per_recipe_side_by_side(tmp_path, capsys):
    # shared: a ahead of b; tuned (each at its own recipe and guidance scale): b ahead of a. Never pooled.
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("tuned", artifact_location=str(tmp_path / "art"))
    pid = client.create_run(exp, tags={"sorabench.role": "study", "sorabench.study": "tuned",
                                       "sorabench.protocol_hash": "abc123def456"}).info.run_id
    acc = {("a", "shared"): [0.6, 0.62, 0.64], ("b", "shared"): [0.2, 0.22, 0.24],
           ("a", "tuned"): [0.65, 0.66, 0.67], ("b", "tuned"): [0.8, 0.82, 0.84]}
    trial = 0
    for (strategy, recipe), values in acc.items():
        for seed, v in enumerate(values):
            tags = {"mlflow.parentRunId": pid, "sorabench.strategy": strategy, "optuna.state": "COMPLETE",
                    "optuna.trial_number": str(trial), "sorabench.recipe": recipe,
                    "eval.protocol.cfg": "2.0" if recipe == "shared" or strategy == "a" else "4.0"}
            if recipe == "tuned":
                tags.update({"sorabench.tuned_overrides": f"optim.lr=0.00{trial % 2 + 1} metrics.cfg=4",
                             "sorabench.tuned_value": "0.7", "sorabench.tuning_trials": "3"})
            run = client.create_run(exp, tags=tags)
            client.log_batch(run.info.run_id, metrics=[Metric("eval/acc_all", v, 0, 10)],
                             params=[Param("seed", str(seed))])
            client.set_terminated(run.info.run_id, "FINISHED")
            trial += 1
    assert main(report_cfg(tmp_path, "study=tuned", "name=tuned", "metric=eval/acc_all")) == 0
    out = tmp_path / "report" / "tuned"
    md = (out / "report.md").read_text()
    assert "## Shared recipe vs each strategy's own tuned recipe" in md and "abc123def456" in md
    shared = pd.read_csv(out / "shared" / "summary.csv").set_index("strategy")
    tuned = pd.read_csv(out / "tuned" / "summary.csv").set_index("strategy")
    assert list(shared.index) == ["a", "b"] and list(tuned.index) == ["b", "a"]  # each recipe ranked on its own
    assert shared.loc["b", "eval/acc_all_mean"] == pytest.approx(0.22)
    assert tuned.loc["b", "eval/acc_all_mean"] == pytest.approx(0.82)
    assert "`shared`: ranking a > b" in md and "`tuned`: ranking b > a" in md
    per_seed = (out / "tuned" / "report.md").read_text().split("## Per seed")[1]
    assert "| b | eval/acc_all | 0.8 | 0.82 | 0.84 |" in per_seed  # every run's value, seed by seed
    printed = capsys.readouterr().out
    assert "wrote report.md, summary.csv" in printed and f"to {out / 'tuned'}" in printed  # each recipe's files


def test_the_declared_tested_metrics_are_the_holm_family():
    """`protocol.tested` is pre-registered: every metric it names is tested pairwise (one Holm family), not only the
    headline; a study that declared nothing gets the default set."""
    from sorabench.report.analysis import analyse

    runs = pd.DataFrame({"strategy": ["a"] * 3 + ["b"] * 3, "eval/acc_all": [0.5, 0.6, 0.55, 0.2, 0.25, 0.3],
                         "eval/fvd": [50.0, 55.0, 52.0, 90.0, 95.0, 99.0], "seed": [0, 1, 2] * 2})
    declared = analyse(runs, ["eval/acc_all", "eval/fvd"], "eval/acc_all", "auto",
                       declared={"tested": ["eval/acc_all", "eval/fvd"]})
    assert set(declared.tests) == {"eval/acc_all", "eval/fvd"}
    assert set(analyse(runs, ["eval/acc_all", "eval/fvd"], "eval/acc_all", "auto").tests) == {"eval/acc_all"}


def test_steps_to_threshold_per_seed_with_censoring_and_resumed_steps():
    """The first evaluated step at or beyond the level, in the metric's better direction; a step logged twice by a
    resumed run counts its latest value; a run that never reached the level is censored at its last step."""
    from sorabench.report.thresholds import steps_to_threshold, threshold_section

    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "seed": [0, 1, 0], "strategy": ["x", "x", "y"]})
    acc = pd.DataFrame([("x", "a", 100, 1, 0.5), ("x", "a", 200, 2, 0.95), ("x", "a", 300, 3, 0.8),
                        ("x", "b", 100, 4, 0.95), ("x", "b", 100, 5, 0.2),  # resumed: step 100 re-logged at 0.2
                        ("x", "b", 200, 6, 0.91), ("y", "c", 100, 7, 0.3), ("y", "c", 300, 8, 0.6)],
                       columns=["strategy", "run_id", "step", "timestamp", "value"])
    fvd = acc.assign(value=[300, 90, 80, 50, 500, 120, 400, 99])
    table = steps_to_threshold({"eval/acc_direction": acc, "eval/fvd": fvd}, runs,
                               {"eval/acc_direction": 0.9, "eval/fvd": 100})
    step = {(r.run_id, r.metric): r.step for r in table.itertuples()}
    assert step[("a", "eval/acc_direction")] == 200 and step[("b", "eval/acc_direction")] == 200
    assert np.isnan(step[("c", "eval/acc_direction")])
    assert set(table[table.run_id == "c"].last_step) == {300}
    assert step[("a", "eval/fvd")] == 200 and np.isnan(step[("b", "eval/fvd")]) and step[("c", "eval/fvd")] == 300
    md = "\n".join(threshold_section(table, ["x", "y"]))
    assert "| x | eval/acc_direction >= 0.9 | 200 | 200 | 2/2 | 200 |" in md
    assert "| y | eval/acc_direction >= 0.9 | not by 300 | - | 0/1 | - |" in md
    assert "| x | eval/fvd <= 100 | 200 | not by 200 | 1/2 | - |" in md


def test_report_prints_steps_to_declared_thresholds(store):
    outputs, _, _ = store
    levels = 'thresholds=["eval/fvd:200","eval/acc_all:0.32"]'
    assert main(report_cfg(outputs, f"study={STUDY}", "name=thr", levels)) == 0
    md = (outputs / "report" / "thr" / "report.md").read_text()
    assert "## Steps to threshold" in md
    assert "| cross_attention | eval/fvd <= 200 | 10 | 20 | 20 | 3/3 | 20 |" in md
    assert "| in_context | eval/fvd <= 200 | 20 | 20 | 20 | 3/3 | 20 |" in md
    assert "| cross_attention | eval/acc_all >= 0.32 | not by 20 | 20 | 20 | 2/3 | 20 |" in md
    assert "| in_context | eval/acc_all >= 0.32 | not by 20 | not by 20 | not by 20 | 0/3 | - |" in md
    steps = pd.read_csv(outputs / "report" / "thr" / "thresholds.csv")
    assert len(steps) == 12 and set(steps.columns) >= {"strategy", "seed", "metric", "level", "step", "last_step"}
    with pytest.raises(ConfigError, match="thresholds.eval/fvd='x': must be a number"):
        main(report_cfg(outputs, f"study={STUDY}", "name=thr2", 'thresholds=["eval/fvd:x"]'))


def test_a_misspelt_group_by_key_is_named_before_any_protocol_check(tmp_path):
    """Runs kept apart on purpose by a grid axis (precision) and a typo in that key: the error names the typo, not
    the protocol field the runs differ on (which the right key would have allowed)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("px", artifact_location=str(tmp_path / "mlartifacts"))
    pid = client.create_run(exp, run_name="px", tags={"sorabench.role": "study", "sorabench.study": "px"}).info.run_id
    for i, precision in enumerate(["32-true", "bf16-mixed"]):
        run = client.create_run(exp, tags={"mlflow.parentRunId": pid, "sorabench.strategy": "a", "optuna.state":
                                           "COMPLETE", "optuna.trial_number": str(i),
                                           "eval.protocol.precision": precision})
        client.log_batch(run.info.run_id, metrics=[Metric("eval/fvd", 10.0 + i, 0, 0)],
                         params=[Param("seed", "0"), Param("trainer.precision", precision)])
        client.set_terminated(run.info.run_id, "FINISHED")
    assert main(report_cfg(tmp_path, "study=px", "group_by=[strategy,trainer.precision]")) == 0
    with pytest.raises(ConfigError, match=r"group_by='trainer.precison': no run logged this config key"):
        main(report_cfg(tmp_path, "study=px", "group_by=[strategy,trainer.precison]"))
