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
MIN_HUE_COSINE = 0.9  # a pixel belongs to the palette colour it points at, if it points at one at all
MIN_COVERAGE = 0.05  # below this a pixel is background (the faintest anti-aliasing fringe, noise)


def palette() -> tuple[torch.Tensor, torch.Tensor]:
    from sorabench.data.shapes import RGB

    return RGB.clone(), torch.zeros(3)


def colour_layers(videos: torch.Tensor, colours: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """videos (B, 3, T, H, W) in [-1, 1], colours (B, K) palette indices -> (B, K, 3, T, H, W) in [-1, 1]: each
    object's colour layer, drawn alone on the background (module doc)."""
    rgb, bg = palette()
    if background is not None:
        bg = background
    x = (videos.float() + 1) / 2 - bg.view(1, 3, 1, 1, 1)  # (B, 3, T, H, W), background at 0
    ref = rgb - bg  # (C, 3)
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    cosine = torch.einsum("bcthw,pc->bpthw", x / norm, ref / ref.norm(dim=1, keepdim=True))  # (B, C, T, H, W)
    nearest = cosine.argmax(1)  # (B, T, H, W)
    layers = []
    for k in range(colours.shape[1]):
        c = colours[:, k]  # (B,)
        r = ref[c].view(-1, 3, 1, 1, 1)  # (B, 3, 1, 1, 1)
        coverage = ((x * r).sum(1) / (r * r).sum(1)).clamp(0, 1)  # (B, T, H, W)
        own = (nearest == c.view(-1, 1, 1, 1)) & (cosine.gather(1, c.view(-1, 1, 1, 1, 1).expand(-1, 1, *x.shape[2:]))
                                                   .squeeze(1) >= MIN_HUE_COSINE) & (coverage >= MIN_COVERAGE)
        layer = (coverage * own)[:, None] * r + bg.view(1, 3, 1, 1, 1)
        layers.append(layer * 2 - 1)
    return torch.stack(layers, dim=1)


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


def binding_scores(read: torch.Tensor, labels: torch.Tensor, unseen: torch.Tensor | None = None,
                   unseen_pair: torch.Tensor | None = None, prefix: str = "bind") -> dict[str, float]:
    """Scores of readings (N, K, 5) against prompt labels (N, K, 5) (module doc); NaN-free (empty subsets left out)."""
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

    def compute(self) -> dict[str, float]:
        return binding_scores(torch.cat(self.read), self.labels, self.unseen, self.unseen_pair)

    def reset(self) -> None:
        super().reset()
        self.read = []

    @staticmethod
    def ranked_keys(keys: list[str]) -> list[str]:
        return [k for k in keys if k.startswith("bind_") and "chance" not in k]
