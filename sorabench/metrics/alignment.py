"""Text–video alignment: does a generated clip show the attributes its caption asked for?

The evaluator's heads read each attribute of a generated clip; accuracy against the prompt's labels measures prompt
following, per attribute and for all attributes at once, separately for seen and held-out (unseen) compositions.

Accuracy alone cannot tell "at chance" from "broken": on blob-like samples a classifier tends to predict one class
for everything, so its accuracy sits at that class's share of the labels (calibration.md). The report therefore
carries what is needed to tell them apart: two chance levels, the confusion matrix, and the distribution and
entropy of the predictions. A near-zero prediction entropy with accuracy near `chance_majority` means the evaluator
sees nothing it recognises; a high entropy with chance accuracy means it sees attributes the prompt did not ask for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

from sorabench.metrics.registry import EvalSetup, register


def _normalised_entropy(shares: torch.Tensor) -> float:
    """Entropy of a distribution over K classes divided by log K: 0 = always the same class, 1 = uniform."""
    k = shares.numel()
    if k < 2:
        return 0.0
    p = shares[shares > 0]
    return float((p * (1.0 / p).log()).sum() / math.log(k))  # Σ p log(1/p): exactly +0.0 for a constant


def _class_shares(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(values, minlength=k).double() / max(values.numel(), 1)


def _majority_share(rows: torch.Tensor) -> float:
    """Share of the most frequent row of `rows` (N, A): the accuracy of always answering that row."""
    if rows.shape[0] == 0:
        return math.nan
    return float(torch.unique(rows, dim=0, return_counts=True)[1].max() / rows.shape[0])


def levels(column: torch.Tensor, k: int) -> int:
    """The values uniform guessing chooses among: K, or 1 for an attribute every prompt gives the same value (one
    the task holds constant, `data.fixed`)."""
    return 1 if bool((column == column.flatten()[0]).all()) else k


def _subset_report(correct: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict:
    """Accuracy and majority-class chance of one subset; correct (n, A) bool, labels (n, A)."""
    n = correct.shape[0]
    acc = {name: float(correct[:, i].double().mean()) if n else math.nan for i, name in enumerate(names)}
    acc["all"] = float(correct.all(1).double().mean()) if n else math.nan
    chance = {name: _majority_share(labels[:, i : i + 1]) for i, name in enumerate(names)}
    chance["all"] = _majority_share(labels)
    return {"n": n, "acc": acc, "chance_majority": chance}


# Over 60 lines only by its docstring, which documents the returned dict every report table reads.
def attribute_accuracy(
    predictions: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    unseen: torch.Tensor,
    attribute_names: Sequence[str],
    num_classes: Mapping[str, int] | None = None,
) -> dict:
    """Per-attribute and all-correct accuracy of predictions against the prompts' labels.

    Args:
        predictions: per attribute, logits (N, K) or predicted class ids (N,).
        labels: (N, A) prompt labels, columns in `attribute_names` order.
        unseen: (N,) bool, True where the prompt's composition was held out of training.
        attribute_names: the attributes to score, in label-column order.
        num_classes: K per attribute; needed only for attributes given as class ids (logits carry K).

    Returns a dict (plain Python numbers and lists; NaN where a subset is empty):
        overall / seen / unseen: {n, acc: {attr..., all}, chance_majority: {attr..., all}}; `chance_majority` is the
            accuracy of always predicting the subset's most frequent label (for `all`: most frequent label tuple).
        chance_uniform: {attr: 1/K, all: Π 1/K}; K = 1 for an attribute every prompt gives one value (`data.fixed`).
        confusion: {attr: K×K counts, rows = prompt label, columns = prediction}, over all clips.
        predictions: {attr: {distribution, entropy, label_distribution, label_entropy, mean_softmax_entropy}};
            entropies are normalised by log K (0 = constant, 1 = uniform); `mean_softmax_entropy` is the mean
            normalised entropy of the per-clip softmax (the evaluator's own uncertainty), None for class ids.
    """
    labels = labels.long().cpu()
    unseen = unseen.bool().cpu()
    names = list(attribute_names)
    if labels.dim() != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels must be (N, {len(names)}) for attributes {names}, got {tuple(labels.shape)}")

    preds, ks, softmax_entropy = [], [], {}
    for name in names:
        p = predictions[name].detach().cpu()
        if p.dim() == 2:
            k = p.shape[1]
            probs = p.double().softmax(1)
            per_clip = -(probs * probs.clamp_min(1e-300).log()).sum(1) / math.log(k) if k > 1 else torch.zeros(len(p))
            softmax_entropy[name] = float(per_clip.mean())
            p = p.argmax(1)
        elif num_classes is not None and name in num_classes:
            k = int(num_classes[name])
            softmax_entropy[name] = None
        else:
            raise ValueError(f"predictions[{name!r}] are class ids: pass num_classes[{name!r}]")
        preds.append(p.long())
        ks.append(k)
    preds = torch.stack(preds, dim=1)  # (N, A)
    guess = [levels(labels[:, i], k) if len(labels) else k for i, k in enumerate(ks)]  # 1 for a fixed attribute
    correct = preds == labels

    report = {
        "overall": _subset_report(correct, labels, names),
        "seen": _subset_report(correct[~unseen], labels[~unseen], names),
        "unseen": _subset_report(correct[unseen], labels[unseen], names),
        "chance_uniform": {name: 1.0 / k for name, k in zip(names, guess)} | {"all": math.prod(1.0 / k for k in guess)},
        "confusion": {},
        "predictions": {},
    }
    for i, (name, k) in enumerate(zip(names, ks)):
        confusion = torch.bincount(labels[:, i] * k + preds[:, i], minlength=k * k).view(k, k)
        report["confusion"][name] = confusion.tolist()
        shares, label_shares = _class_shares(preds[:, i], k), _class_shares(labels[:, i], k)
        report["predictions"][name] = {
            "distribution": shares.tolist(),
            "entropy": _normalised_entropy(shares),
            "label_distribution": label_shares.tolist(),
            "label_entropy": _normalised_entropy(label_shares),
            "mean_softmax_entropy": softmax_entropy[name],
        }
    return report


def alignment_from_logits(logits: dict, labels, unseen, prefix: str = "eval") -> dict[str, float]:
    """Per-attribute and all-correct accuracy of clips vs their prompts' labels (overall, seen, unseen), chance
    levels, and the entropy of the evaluator's predictions (near 0 = it calls everything one class: degenerate),
    from the evaluator's logits of those clips."""
    names = list(logits)  # the evaluator's heads: the label schema it was trained on, in label-column order
    report = attribute_accuracy(logits, labels, unseen, names)
    out = {}
    for attr in [*names, "all"]:
        out[f"{prefix}/acc_{attr}"] = report["overall"]["acc"][attr]
        out[f"{prefix}/acc_{attr}_seen"] = report["seen"]["acc"][attr]
        out[f"{prefix}/acc_{attr}_unseen"] = report["unseen"]["acc"][attr]
        out[f"{prefix}/chance_{attr}"] = report["chance_uniform"][attr]
    for attr in names:
        out[f"{prefix}/pred_entropy_{attr}"] = report["predictions"][attr]["entropy"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


@register("alignment")
class Alignment(Metric):
    """Text-video alignment as a metric: the evaluator reads every generated clip, in prompt order, and `compute()`
    scores its readings against the prompts' labels (`alignment_from_logits`: acc_<attribute>, acc_all, each also
    on seen and unseen compositions, chance levels and prediction entropies). Real clips are not read."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    needs_real = False

    def __init__(self, evaluator: torch.nn.Module, labels: torch.Tensor, unseen: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.evaluator, self.labels, self.unseen = evaluator, labels, unseen
        self.logits: list[dict[str, torch.Tensor]] = []

    @classmethod
    def from_setup(cls, setup: EvalSetup) -> Alignment | None:
        labels = setup.labels
        if setup.evaluator is None or labels is None or labels.dim() != 2 or not labels.shape[1] \
                or not bool((labels >= 0).all()):
            return None  # no attribute labels to follow (a folder, unlabelled prompts), or several objects: `binding`
        return cls(setup.evaluator, labels, setup.unseen)

    def update(self, videos: torch.Tensor, real: bool) -> None:
        if not real:
            with torch.no_grad():
                self.logits.append({k: v.cpu() for k, v in self.evaluator(videos).items()})

    def compute(self) -> dict[str, float]:
        joined = {name: torch.cat([c[name] for c in self.logits]) for name in self.logits[0]}
        n = len(next(iter(joined.values())))
        return {k.removeprefix("eval/"): v for k, v in
                alignment_from_logits(joined, self.labels[:n], self.unseen[:n]).items()}

    def reset(self) -> None:
        super().reset()
        self.logits = []

    @staticmethod
    def ranked_keys(keys: list[str]) -> list[str]:
        return [k for k in keys if k.startswith("acc_")]  # chance levels and entropies are diagnostics

