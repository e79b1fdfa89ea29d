"""The report's figures, drawn on matplotlib's Agg canvas (no display needed): learning curves, the guidance axis
and the Pareto front, each a PNG beside report.md."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sorabench.report.formatting import arrow
from sorabench.report.guidance import GUIDANCE_KEY, GUIDANCE_PLOTS
from sorabench.report.stats import aggregate_history, finite

CURVE_METRICS = ("val/loss", "train/loss")  # plotted whenever logged; eval/* only with more than one point


def curve_metrics(metrics: list[str]) -> list[str]:
    """The metrics whose history may be drawn: the losses, and every eval/* metric but the instrument's references
    (chance, real clips, noise, the VAE's ceiling) and the guidance axis (it has a figure of its own)."""
    curves = [m for m in CURVE_METRICS if m in metrics]
    reference = re.compile(r"eval/(chance|real|noise|ceiling)_")
    return curves + [m for m in metrics if m.startswith("eval/") and not reference.match(m)
                     and not GUIDANCE_KEY.fullmatch(m)]


def plot_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") + ".png"


def new_plot():
    """A figure and its axes on the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_history(agg: pd.DataFrame, metric: str, path: Path, order=None, by: str = "strategy") -> Path:
    """Mean over seeds per strategy against the training step, with a 95% CI band (Student t over seeds)."""
    fig, ax = new_plot()
    names = [s for s in (order if order is not None else sorted(agg[by].unique())) if s in set(agg[by])]
    for name in names:
        g = agg[agg[by] == name].sort_values("step")
        runs = int(g["n"].max())
        (line,) = ax.plot(g["step"], g["mean"], marker="o" if len(g) < 20 else None, ms=3, label=f"{name} (n={runs})")
        if runs > 1:
            band = g["ci95"].fillna(0.0) if "ci95" in g else None
            low, high = (g["mean"] - band, g["mean"] + band) if band is not None else (g["min"], g["max"])
            ax.fill_between(g["step"], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return save_plot(fig, ax, path, "training step", metric, f"{metric}: mean over seeds, band = 95% CI")


def plot_guidance(g: pd.DataFrame, metric: str, path: Path, default: float = math.nan, order=None,
                  by: str = "strategy") -> Path:
    """`eval/cfg*/<metric>` against the guidance scale, one line per strategy: mean over seeds ± 95% CI."""
    fig, ax = new_plot()
    d = g[(g.prefix == "eval") & (g.metric == metric)]
    names = [s for s in (order if order is not None else sorted(set(d[by]))) if s in set(d[by])]
    for i, name in enumerate(names):
        r = d[d[by] == name].sort_values("scale")
        x = r["scale"].to_numpy() * (1 + 0.012 * (i - (len(names) - 1) / 2))  # a small dodge: CIs stay readable
        ax.errorbar(x, r["mean"], yerr=r["ci95"].fillna(0).to_numpy(), marker="o", ms=4, capsize=3,
                    label=f"{name} (n={int(r['n'].max())})")
    if finite(default):
        ax.axvline(default, color="grey", ls=":", lw=1, label=f"shared default ({default:g})")
    return save_plot(fig, ax, path, "classifier-free guidance scale", f"eval/{metric}",
                     f"eval/{metric} vs guidance: mean over seeds, bars = 95% CI")


def plot_pareto(runs: pd.DataFrame, front: pd.Series, objectives: list[tuple[str, str]], path: Path,
                by: str = "strategy") -> Path:
    """Every completed run on the two objectives, one colour per report row; the non-dominated runs joined by a line."""
    (x, dx), (y, dy) = objectives
    fig, ax = new_plot()
    for name, g in runs.groupby(by, sort=True):
        ax.scatter(pd.to_numeric(g[x], errors="coerce"), pd.to_numeric(g[y], errors="coerce"), s=18, label=str(name))
    f = runs[front].assign(_x=lambda d: pd.to_numeric(d[x]), _y=lambda d: pd.to_numeric(d[y])).sort_values("_x")
    ax.plot(f["_x"], f["_y"], color="black", lw=1, marker="o", mfc="none", ms=9, label="Pareto front")
    return save_plot(fig, ax, path, f"{x} ({arrow(dx)})", f"{y} ({arrow(dy)})",
                     f"{x} vs {y}: {int(front.sum())} non-dominated of {len(runs)} runs")


@dataclass
class Figures:
    """File names (in the report's folder) of the figures drawn: learning curves and guidance axis by metric."""

    curves: dict[str, str] = field(default_factory=dict)
    guidance: dict[str, str] = field(default_factory=dict)
    pareto: str | None = None


def draw_figures(histories: dict[str, pd.DataFrame], analysis, out_dir: Path, by: str = "strategy") -> Figures:
    """Every figure of one report (`analysis`: a sorabench.report.analysis.Analysis): a learning curve per metric
    history with more than one point (losses always), the guidance axis, and the Pareto front of two objectives."""
    a, figures = analysis, Figures()
    for m, history in histories.items():
        if m not in CURVE_METRICS and history.groupby("run_id").size().max() < 2:
            continue
        agg = aggregate_history(history, by=by)
        figures.curves[m] = plot_history(agg, m, out_dir / plot_name(m), order=a.order, by=by).name
    for m in GUIDANCE_PLOTS:
        if ((a.guidance.prefix == "eval") & (a.guidance.metric == m)).any():
            figures.guidance[m] = plot_guidance(a.guidance, m, out_dir / f"guidance_{m}.png", a.shared_scale,
                                                order=a.order, by=by).name
    if a.front is not None:
        figures.pareto = plot_pareto(a.runs, a.front, a.objectives, out_dir / "pareto.png", by=by).name
    return figures
