"""Numbers as the report writes them, markdown tables, and the ranked table's rows (shared by report.md and the
terminal, so both show the same cells)."""

from __future__ import annotations

import pandas as pd

from sorabench.report.stats import finite, metric_direction

KEY_METRICS = ("eval/fvd", "eval/fid", "eval/kid", "eval/acc_all", "val/loss", "train/loss", "time/train_seconds")
PARAMS, GFLOPS = "model/params", "model/gflops"


def fmt(x, digits: int = 4) -> str:
    return f"{float(x):.{digits}g}" if finite(x) else "–"


def fmt_ci(mean, ci, bounds: tuple[float, float] | None = None) -> str:
    """'mean ± ci'; 'mean ± n/a' with a single run; '–' without any. A metric with `bounds` (an accuracy: [0, 1])
    whose interval crosses one shows the interval cut to them, 'mean [low, high]', not a range it cannot take."""
    if not finite(mean):
        return "–"
    if not finite(ci):
        return f"{fmt(mean)} ± n/a"
    if bounds is not None and (mean - ci < bounds[0] or mean + ci > bounds[1]):
        return f"{fmt(mean)} [{fmt(max(bounds[0], mean - ci), 2)}, {fmt(min(bounds[1], mean + ci), 2)}]"
    return f"{fmt(mean)} ± {fmt(ci, 2) if ci > 1e-9 * max(abs(float(mean)), 1e-12) else '0'}"


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range a metric can take, where it has one: accuracies (eval/acc_*, eval/*_acc_*) and binding scores
    (eval/bind_*, eval/*_bind_*: shares of objects, clips or twin pairs) lie in [0, 1]."""
    base = str(metric).rsplit("/", 1)[-1]
    shares = ("acc", "chance", "bind")
    return (0.0, 1.0) if base.startswith(shares) or "_acc_" in base or "_bind_" in base else None


def fmt_p(p) -> str:
    if not finite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_params(p) -> str:
    return f"{float(p) / 1e6:.2f}M" if finite(p) else "–"


def arrow(direction: str) -> str:
    return "↓" if direction == "minimize" else "↑"


def md_table(headers, rows) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ").strip() or " "

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_cell(summary: pd.DataFrame, strategy, metric: str) -> str:
    """One row's mean ± 95% CI of `metric`, with (n=k) where fewer of its runs logged the metric."""
    row = summary.loc[strategy]
    text = fmt_ci(row.get(f"{metric}_mean"), row.get(f"{metric}_ci95"), metric_bounds(metric))
    k = row.get(f"{metric}_n")
    if finite(k) and 0 < int(k) < int(row["n"]):
        text += f" (n={int(k)})"
    return text


def ranked_rows(summary: pd.DataFrame, metric: str, direction: str, row: str = "strategy"
                ) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the ranked table: rank, the row label, n, the headline metric then the other key metrics
    the runs logged (mean ± 95% CI, an arrow for the better direction), parameters and GFLOPs. `summary` ranked."""
    key = [metric] + [m for m in KEY_METRICS if m != metric and f"{m}_mean" in summary]
    arrows = [arrow(direction if m == metric else metric_direction(m)) for m in key]
    headers = ["rank", row, "n", *[f"{m} {a}" for m, a in zip(key, arrows)], "params", "GFLOPs"]
    rows = [
        [fmt(summary.loc[s, "rank"], 3), str(s), str(int(summary.loc[s, "n"])),
         *[summary_cell(summary, s, m) for m in key],
         fmt_params(summary.loc[s].get(f"{PARAMS}_mean")), fmt(summary.loc[s].get(f"{GFLOPS}_mean"), 3)]
        for s in summary.index
    ]
    return headers, rows
