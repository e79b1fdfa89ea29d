"""Binding: does every object of a multi-object prompt show *its own* attributes? (`data.num_objects` 2 or 3)

The instrument follows GenEval's recipe for images (Ghosh et al. 2023: find each object the prompt names, then
classify attributes on that object alone) on `shapes`, whose objects are named by their colours - distinct within
a clip, on a plain background:

    layer_c(x) = a_c(x) · rgb_c   where the pixel's colour is nearest (in hue) to palette colour c, else background
    a_c(x)     = clamp(<x - bg, rgb_c - bg> / |rgb_c - bg|², 0, 1)      (the renderer's coverage, inverted)

is object c drawn alone, exactly as the single-object renderer would draw it (up to what another object hides),
and an evaluator trained on exactly such layers of the task's real training clips (`ObjectLayers`: every object of
every clip, with the parts the other object hides) reads its colour, shape, size, direction and speed. A colour the
clip does not show gives an empty layer, which reads as no colour it should. The evaluator is checked on the real
clips of the same split (`eval/real_bind_*`): that is the instrument's ceiling on this data, measured, not assumed.

Scores, per generated clip against its prompt's objects (labels (N, K, 5)):
  bind_<attr>   share of the N·K objects whose attribute is read as the prompt binds it;
  bind_object   share of objects with every attribute right;
  bind_all      share of clips with every object fully right (also _seen, _unseen (an unseen description),
                _unseen_pair (seen descriptions, unseen pairing));
  bind_twins    share of swapped-binding twin pairs (clips 2j, 2j+1 of val/test/unseen: the same words, one attribute
                exchanged between two objects) with both clips fully right: a model that ignores which word goes with
                which object can get at most one of each pair;
  bind_count    share of clips showing exactly K objects (`count_objects`: palette colours covering >= MIN_OBJECT_AREA
                of the frame; read without the prompt, so a missing or an extra object both count against it);
  bind_swap_<attr>, bind_wrong_<attr>, bind_swap_share  binding errors (`swap_errors`): an attribute read as the
                value another object of the prompt has, beside all wrong readings and the share of them a uniform
                wrong guess would put on the other object;
  bind_chance_all  the uniform-guess level of bind_all (Π 1/K over attributes, per object, over objects; K = 1 for
                   an attribute the task holds constant).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from sorabench.metrics.alignment import levels
from sorabench.metrics.registry import EvalSetup, register

ATTRS = ("colour", "shape", "size", "direction", "speed")  # label columns (sorabench.data.shapes.ATTRIBUTES)
SWAPPED = ATTRS[1:]  # attributes a model can put on the wrong object (colour names the object: it is found by it)
MIN_HUE_COSINE = 0.9  # a pixel belongs to the palette colour it points at, if it points at one at all
MIN_COVERAGE = 0.05  # below this a pixel is background (the faintest anti-aliasing fringe, noise)
MIN_OBJECT_AREA = 5e-4  # count_objects: a colour whose interior is less of the clip (a small object: ~0.03) is none


def palette() -> tuple[torch.Tensor, torch.Tensor]:
    from sorabench.data.shapes import RGB

    return RGB.clone(), torch.zeros(3)


def colour_coverage(videos: torch.Tensor, background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """videos (B, 3, T, H, W) in [-1, 1] -> (coverage (B, C, T, H, W) in [0, 1], ref (C, 3)): how much of each
    palette colour c each pixel shows (module doc: a_c where the pixel's hue is c's, else 0); ref = rgb_c - bg."""
    rgb, bg = palette()
    if background is not None:
        bg = background
    x = (videos.float() + 1) / 2 - bg.view(1, 3, 1, 1, 1)  # (B, 3, T, H, W), background at 0
    ref = rgb - bg  # (C, 3)
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    cosine = torch.einsum("bcthw,pc->bpthw", x / norm, ref / ref.norm(dim=1, keepdim=True))  # (B, C, T, H, W)
    nearest = torch.nn.functional.one_hot(cosine.argmax(1), len(ref)).permute(0, 4, 1, 2, 3).bool()  # (B, C, T, H, W)
    coverage = (torch.einsum("bcthw,pc->bpthw", x, ref) / (ref * ref).sum(1).view(1, -1, 1, 1, 1)).clamp(0, 1)
    own = nearest & (cosine >= MIN_HUE_COSINE) & (coverage >= MIN_COVERAGE)
    return coverage * own, ref


def colour_layers(videos: torch.Tensor, colours: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """videos (B, 3, T, H, W) in [-1, 1], colours (B, K) palette indices -> (B, K, 3, T, H, W) in [-1, 1]: each
    object's colour layer, drawn alone on the background (module doc)."""
    coverage, ref = colour_coverage(videos, background)
    bg = palette()[1] if background is None else background
    a = coverage.gather(1, colours[:, :, None, None, None].expand(-1, -1, *coverage.shape[2:]))  # (B, K, T, H, W)
    layers = a[:, :, None] * ref[colours][..., None, None, None] + bg.view(1, 1, 3, 1, 1, 1)  # (B, K, 3, T, H, W)
    return layers * 2 - 1


def count_objects(videos: torch.Tensor) -> torch.Tensor:
    """(B,) how many palette colours a clip shows, read without its prompt: a colour counts if its interior - pixels
    at least half covered whose eight neighbours are too - spans at least MIN_OBJECT_AREA of the clip's pixels. The
    interior, not the coverage: where two objects meet, their blended edge is a thin line of a third hue."""
    coverage, _ = colour_coverage(videos)
    b, c, t, h, w = coverage.shape
    solid = (coverage >= 0.5).float().reshape(b * c * t, 1, h, w)
    interior = -torch.nn.functional.max_pool2d(-solid, 3, stride=1, padding=1)  # 3x3 erosion
    return (interior.view(b, c, -1).mean(-1) >= MIN_OBJECT_AREA).sum(1)


class ObjectLayers(torch.utils.data.Dataset):
    """Every object of a multi-object dataset, drawn alone: item j is object j % K of clip j // K - its colour layer
    (`colour_layers`) and its own labels. The binding instrument's evaluator trains on these, so it reads a layer as
    `read_objects` gives it, including the parts another object hides and the fringes it blends into."""

    def __init__(self, clips: torch.utils.data.Dataset):
        self.clips = clips
        self.k = int(clips[0]["labels"].shape[0])

    def __len__(self) -> int:
        return len(self.clips) * self.k

    def __getitem__(self, j: int) -> dict:
        item, k = self.clips[j // self.k], j % self.k
        labels = item["labels"]  # (K, 5)
        layer = colour_layers(item["video"][None], labels[None, k : k + 1, 0])[0, 0]  # this object's layer alone
        return {"video": layer, "labels": labels[k], "caption": item["caption"], "unseen": item["unseen"]}


@torch.no_grad()
def read_objects(evaluator, videos: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """The evaluator's reading (B, K, 5) of each object's attributes, object k found by its colour colours[:, k]."""
    layers = colour_layers(videos, colours)
    b, k = layers.shape[:2]
    logits = evaluator(layers.flatten(0, 1))
    return torch.stack([logits[a].argmax(1) for a in ATTRS], dim=-1).view(b, k, len(ATTRS)).cpu()


def swap_errors(read: torch.Tensor, labels: torch.Tensor, prefix: str = "bind") -> dict[str, float]:
    """Binding errors of readings (N, K, 5) against prompt labels (N, K, 5), per attribute a of SWAPPED (colour names
    the object, so it cannot move): over the objects whose value of a differs from another object's in the prompt -
    bind_wrong_<a>  share read wrong;
    bind_swap_<a>   share read as another object's value (the attribute put on the wrong object);
    bind_swap, bind_wrong  the same over all those (object, attribute) cases;
    bind_swap_share        swaps / wrong readings: how many errors are binding errors, against
    bind_swap_share_chance the share a wrong reading drawn uniformly from the other values would give.
    An attribute the prompts hold constant (or equal on every object) has no cases and no key."""
    from sorabench.data.shapes import ATTRIBUTES

    n = len(read)
    labels = labels[:n].long()
    out, totals = {}, torch.zeros(4, dtype=torch.float64)  # cases, wrong, swapped, chance swaps among the wrong
    for i, attr in enumerate(ATTRS):
        if attr not in SWAPPED:
            continue
        value, got = labels[..., i], read[..., i]  # (N, K)
        other = value[:, None, :] != value[:, :, None]  # (N, K, K): object j's value differs from object k's
        cases = other.any(-1)  # (N, K)
        if not bool(cases.any()):
            continue
        wrong = got != value
        swapped = (other & (got[:, :, None] == value[:, None, :])).any(-1)  # read as another object's value
        distinct = torch.tensor([len(set(v) - {v[k]}) for v in value.tolist() for k in range(len(v))]).view_as(value)
        chance = distinct.double() / (len(ATTRIBUTES[attr]) - 1)  # P(a uniform wrong guess hits another's value)
        out[f"{prefix}_wrong_{attr}"] = float(wrong[cases].double().mean())
        out[f"{prefix}_swap_{attr}"] = float(swapped[cases].double().mean())
        totals += torch.stack([cases.sum(), (wrong & cases).sum(), (swapped & cases).sum(),
                               chance[wrong & cases].sum()]).double()
    if totals[0] > 0:
        out[f"{prefix}_wrong"] = float(totals[1] / totals[0])
        out[f"{prefix}_swap"] = float(totals[2] / totals[0])
    if totals[1] > 0:
        out[f"{prefix}_swap_share"] = float(totals[2] / totals[1])
        out[f"{prefix}_swap_share_chance"] = float(totals[3] / totals[1])
    return out


def binding_scores(read: torch.Tensor, labels: torch.Tensor, unseen: torch.Tensor | None = None,
                   unseen_pair: torch.Tensor | None = None, prefix: str = "bind",
                   counts: torch.Tensor | None = None) -> dict[str, float]:
    """Scores of readings (N, K, 5) against prompt labels (N, K, 5) (module doc), with `swap_errors` and, given
    `count_objects`' counts (N,), bind_count; NaN-free (empty subsets left out)."""
    from sorabench.data.shapes import ATTRIBUTES

    n = len(read)
    labels = labels[:n].long()
    correct = read == labels  # (N, K, 5)
    obj = correct.all(-1)  # (N, K)
    clip = obj.all(-1)  # (N,)
    out = {f"{prefix}_{a}": float(correct[..., i].double().mean()) for i, a in enumerate(ATTRS)}
    out[f"{prefix}_object"] = float(obj.double().mean())
    out[f"{prefix}_all"] = float(clip.double().mean())
    subsets = {}
    if unseen is not None:
        unseen = unseen[:n].bool()
        pair = unseen_pair[:n].bool() if unseen_pair is not None else torch.zeros(n, dtype=torch.bool)
        subsets = {"seen": ~unseen & ~pair, "unseen": unseen, "unseen_pair": pair}
    for name, mask in subsets.items():
        if bool(mask.any()):
            out[f"{prefix}_all_{name}"] = float(clip[mask].double().mean())
    if n >= 2:
        pairs = clip[: n - n % 2].view(-1, 2)
        out[f"{prefix}_twins"] = float(pairs.all(1).double().mean())
    out.update(swap_errors(read, labels, prefix))
    if counts is not None:
        out[f"{prefix}_count"] = float((counts[:n] == labels.shape[1]).double().mean())
    k = labels.shape[1]
    out[f"{prefix}_chance_all"] = math.prod(1.0 / levels(labels[..., i], len(ATTRIBUTES[a]))
                                            for i, a in enumerate(ATTRS)) ** k
    return out


@register("binding")
class Binding(Metric):
    """Binding as a metric (module doc): every generated clip, in prompt order, read object by object. Applies only
    to multi-object prompts (labels (N, K, 5)); real clips are not read (their scores are `reference_points`')."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    needs_real = False

    def __init__(self, evaluator, labels: torch.Tensor, unseen=None, unseen_pair=None, **kwargs):
        super().__init__(**kwargs)
        self.evaluator, self.labels, self.unseen, self.unseen_pair = evaluator, labels, unseen, unseen_pair
        self.read: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []

    @classmethod
    def from_setup(cls, setup: EvalSetup) -> Binding | None:
        labels = setup.labels
        if setup.evaluator is None or labels is None or labels.dim() != 3:
            return None  # single-object prompts: `alignment` scores them
        return cls(setup.evaluator, labels, setup.unseen, (setup.extra or {}).get("unseen_pair"))

    def update(self, videos: torch.Tensor, real: bool) -> None:
        if not real:
            start = sum(len(r) for r in self.read)
            self.read.append(read_objects(self.evaluator, videos, self.labels[start : start + len(videos), :, 0]))
            self.counts.append(count_objects(videos.cpu()))

    def compute(self) -> dict[str, float]:
        return binding_scores(torch.cat(self.read), self.labels, self.unseen, self.unseen_pair,
                              counts=torch.cat(self.counts))

    def reset(self) -> None:
        super().reset()
        self.read, self.counts = [], []

    @staticmethod
    def ranked_keys(keys: list[str]) -> list[str]:
        # errors are read beside the scores, not ranked (lower is better, and they are shares of cases, not clips)
        return [k for k in keys if k.startswith("bind_") and not any(w in k for w in ("chance", "wrong", "swap"))]
