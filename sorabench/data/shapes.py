"""`shapes`: the built-in captioned video dataset (a text-to-video analogue of Sync-DRAW's captioned Moving-MNIST).

Each clip shows one (optionally two) anti-aliased shapes moving with sub-pixel precision, starting where the path fits
the frame (a path longer than the frame bounces off the walls). `position_range` sets how much the start varies: the
default (0.25) keeps every path near the centre of the range where it fits, so a caption nearly fixes its clip's
trajectory; 1.0 spreads starts over the whole frame (experiments/conditioning_ablation/README.md measures the trade).
Every clip has attribute labels (colour, shape, size, direction, speed) and a caption drawn from several templates
and synonyms, so a text encoder must read words, not ids.

Compositional generalisation: a fixed, seeded set of (colour, shape, direction) triples is held out. The train split
never contains them; val/test mix seen and unseen compositions (flagged per clip); the `unseen` split holds only them.
`num_objects=2` (or 3) is the binding task (`sorabench/data/binding.py`): distinct colours, per-object attributes,
unseen pairings as a second held-out level, swapped-binding twins in val/test/unseen.

Everything is a pure function of (config, split): parameters for all clips are drawn at once from one seeded
torch.Generator, and rendering is vectorised over clips, frames and pixels, so the same seed gives bit-identical
clips and captions in every process and worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from sorabench.config import ConfigError
from sorabench.data.dataset import VideoDataset, register

# Attribute vocabulary, in label order. Other modules (evaluator, alignment) read it from here.
ATTRIBUTES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow", "magenta", "cyan"],
    "shape": ["circle", "square", "triangle"],
    "size": ["small", "large"],
    "direction": ["left", "right", "up", "down"],
    "speed": ["slow", "fast"],
}
ATTRIBUTE_NAMES = list(ATTRIBUTES)
FIXABLE = ("size", "speed")  # `data.fixed` may hold these constant (the rest make the held-out compositions)

RGB = torch.tensor(
    [[1.0, 0.15, 0.15], [0.15, 0.85, 0.2], [0.2, 0.35, 1.0], [1.0, 0.9, 0.1], [0.95, 0.2, 0.95], [0.1, 0.9, 0.95]]
)
# (dx, dy) unit motion per direction, image coordinates (y grows downwards).
DIRECTION_VECTORS = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
# Object radius (pixels) and speed (pixels per frame) at 32x32, scaled with the frame size: the defaults of
# `ShapesConfig.radius` / `ShapesConfig.speed` (conf/data/shapes.yaml), in ATTRIBUTES["size"] / ["speed"] order.
RADIUS = {"small": 4.0, "large": 6.0}
SPEED = {"slow": 1.25, "fast": 2.5}

# Words a caption may use for each attribute value. The first word of each list is the canonical one.
# Every word maps to exactly one value, so a caption can be parsed back into labels (see `parse_caption`).
SYNONYMS: dict[str, dict[str, list[str]]] = {
    "colour": {c: [c] for c in ATTRIBUTES["colour"]},
    "shape": {"circle": ["circle", "disk", "ball"], "square": ["square", "box", "block"], "triangle": ["triangle"]},
    "size": {"small": ["small", "little", "tiny"], "large": ["large", "big"]},
    "direction": {
        "left": ["moving left", "sliding to the left", "heading leftwards"],
        "right": ["moving right", "sliding to the right", "heading rightwards"],
        "up": ["moving up", "rising", "heading upwards"],
        "down": ["moving down", "falling", "heading downwards"],
    },
    "speed": {"slow": ["slowly", "at a slow pace"], "fast": ["quickly", "at a fast pace"]},
}
TEMPLATES = [
    "a {size} {colour} {shape} {direction} {speed}",
    "a {colour} {size} {shape} {direction} {speed}",
    "there is a {size} {colour} {shape} {direction} {speed}",
    "{speed}, a {size} {colour} {shape} is {direction}",
]
# Keyword -> (attribute, value index) for parsing; the keyword is the phrase's distinctive word.
_KEYWORDS = {
    "left": ("direction", 0), "leftwards": ("direction", 0),
    "right": ("direction", 1), "rightwards": ("direction", 1),
    "up": ("direction", 2), "rising": ("direction", 2), "upwards": ("direction", 2),
    "down": ("direction", 3), "falling": ("direction", 3), "downwards": ("direction", 3),
    "slowly": ("speed", 0), "slow": ("speed", 0), "quickly": ("speed", 1), "fast": ("speed", 1),
}  # fmt: skip
for _attr in ("colour", "shape", "size"):
    for _i, _value in enumerate(ATTRIBUTES[_attr]):
        for _word in SYNONYMS[_attr][_value]:
            _KEYWORDS[_word] = (_attr, _i)


@dataclass
class ShapesConfig:
    num_frames: int = 8
    height: int = 32
    width: int = 32
    num_objects: int = 1
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # RGB in [0, 1]
    noise_std: float = 0.0  # additive Gaussian pixel noise, in [0, 1] units
    holdout_fraction: float = 0.15  # share of (colour, shape, direction) triples never seen in training
    eval_unseen_fraction: float = 0.25  # share of val/test clips drawn from held-out triples
    split_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 4096, "val": 256, "test": 512, "unseen": 256, "final": 512}
    )
    radius: dict[str, float] = field(default_factory=lambda: dict(RADIUS))  # {small, large}: pixels at 32x32
    speed: dict[str, float] = field(default_factory=lambda: dict(SPEED))  # {slow, fast}: pixels/frame at 32x32
    synonyms: bool = True  # captions draw each attribute's word from several synonyms (False: canonical words)
    position_range: float = 0.25  # starts span this centred share of where the path fits (0: centred; 1: anywhere)
    holdout_pair_fraction: float = 0.15  # binding task (num_objects > 1): share of pairs of seen descriptions held out
    fixed: dict[str, str] = field(default_factory=dict)  # {size: large, speed: slow}: constant, and not in captions
    seed: int = 0

    def __post_init__(self):
        self.background = tuple(self.background)
        self.split_sizes = dict(self.split_sizes)
        for name in ("num_frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.num_objects not in (1, 2, 3):
            raise ConfigError(f"data.num_objects={self.num_objects} must be 1, 2 or 3 (the binding task: 2 or 3)")
        if not 0.0 < self.holdout_pair_fraction < 1.0:
            raise ConfigError(f"data.holdout_pair_fraction={self.holdout_pair_fraction} must be in (0, 1)")
        if not 0.0 <= self.position_range <= 1.0:
            raise ConfigError(f"data.position_range={self.position_range} must be in [0, 1]")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        for key, names in (("radius", ATTRIBUTES["size"]), ("speed", ATTRIBUTES["speed"])):
            value = dict(getattr(self, key))
            if set(value) != set(names) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
                raise ConfigError(f"data.{key}={value} must give a positive number for each of {names}")
            setattr(self, key, value)
        self.fixed = dict(self.fixed)
        for key, value in self.fixed.items():
            # Only attributes outside the held-out (colour, shape, direction) triples: fixing one of those would
            # empty the held-out compositions.
            if key not in FIXABLE or value not in ATTRIBUTES[key]:
                raise ConfigError(f"data.fixed.{key}={value!r}: the attributes that can be fixed are "
                                  + ", ".join(f"{a} (one of {ATTRIBUTES[a]})" for a in FIXABLE))


def heldout_triples(cfg: ShapesConfig) -> torch.Tensor:
    """The held-out (colour, shape, direction) triples: a seeded choice, independent of split sizes."""
    n_col, n_shape, n_dir = (len(ATTRIBUTES[a]) for a in ("colour", "shape", "direction"))
    total = n_col * n_shape * n_dir
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
    chosen = torch.randperm(total, generator=g)[: max(1, round(cfg.holdout_fraction * total))]
    is_heldout = torch.zeros(total, dtype=torch.bool)
    is_heldout[chosen] = True
    return is_heldout.view(n_col, n_shape, n_dir)


# `final` holds the reported numbers of an ablation: its own seed, never used by any selection or screen (val chooses,
# test was used by earlier selection rounds; experiments/conditioning_ablation/README.md says which round used which).
SPLIT_IDS = {"train": 1, "val": 2, "test": 3, "unseen": 4, "final": 5}


def sample_labels(cfg: ShapesConfig, split: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (n, num_objects, 5) and the per-clip `unseen` flag of the first object's composition."""
    held = heldout_triples(cfg)
    sizes = [len(v) for v in ATTRIBUTES.values()]
    labels = torch.stack([torch.randint(k, (n, cfg.num_objects), generator=g) for k in sizes], dim=-1)
    if split == "train":
        want_unseen = torch.zeros(n, dtype=torch.bool)
    elif split == "unseen":
        want_unseen = torch.ones(n, dtype=torch.bool)
    else:
        want_unseen = torch.rand(n, generator=g) < cfg.eval_unseen_fraction
    # Redraw the (colour, shape, direction) of the first object from the allowed set: seen triples for train and
    # the seen part of val/test, held-out triples otherwise. Every object of a train clip must be seen.
    seen_ids, unseen_ids = (~held).flatten().nonzero().squeeze(1), held.flatten().nonzero().squeeze(1)
    for obj in range(cfg.num_objects):
        pick_unseen = want_unseen if obj == 0 else torch.zeros(n, dtype=torch.bool)
        seen_pick = seen_ids[torch.randint(len(seen_ids), (n,), generator=g)]
        unseen_pick = unseen_ids[torch.randint(len(unseen_ids), (n,), generator=g)]
        triple = torch.where(pick_unseen, unseen_pick, seen_pick)
        n_shape, n_dir = held.shape[1], held.shape[2]
        labels[:, obj, 0] = triple // (n_shape * n_dir)
        labels[:, obj, 1] = (triple // n_dir) % n_shape
        labels[:, obj, 3] = triple % n_dir
    return fix_labels(cfg, labels), want_unseen


def fix_labels(cfg: ShapesConfig, labels: torch.Tensor) -> torch.Tensor:
    """labels (..., 5) with `cfg.fixed`'s attributes set to their values (drawn first, so that every other
    attribute, and every clip of a config without `fixed`, is what it would be without it)."""
    for attr, value in cfg.fixed.items():
        labels[..., ATTRIBUTE_NAMES.index(attr)] = ATTRIBUTES[attr].index(value)
    return labels


def caption_for(labels: torch.Tensor, g: torch.Generator, synonyms: bool = True, fixed=()) -> str:
    """A caption for one clip's labels (num_objects, 5), joining objects with 'and'. synonyms=False always takes
    each value's canonical word (the same draws are made, so the clips do not change); attributes in `fixed` are
    left out of the words."""
    parts = []
    for obj_labels in labels.tolist():
        template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=g))]
        words = {}
        for attr, idx in zip(ATTRIBUTE_NAMES, obj_labels):
            options = SYNONYMS[attr][ATTRIBUTES[attr][idx]]
            pick = int(torch.randint(len(options), (1,), generator=g))
            words[attr] = "" if attr in fixed else options[pick if synonyms else 0]
        parts.append(fill(template, words))
    return " and ".join(parts)


def fill(template: str, words: dict[str, str]) -> str:
    """A template filled in; an attribute left out ("") takes its space (and a leading "{speed}, ") with it."""
    text = " ".join(template.format(**words).split())
    return text[2:] if text.startswith(", ") else text


def parse_caption(caption: str) -> list[dict[str, int]]:
    """Recover attribute labels from a caption, one dict per object (clauses split on ' and ').

    Attributes a caption does not mention are absent from its dict; a prompt such as "a red circle moving left"
    gives {colour: 0, shape: 0, direction: 0}.
    """
    objects = []
    for clause in caption.lower().split(" and "):
        found: dict[str, int] = {}
        for word in re.findall(r"[a-z]+", clause):
            if word in _KEYWORDS:
                attr, idx = _KEYWORDS[word]
                found.setdefault(attr, idx)
        objects.append(found)
    return objects


def _sdf_circle(dx, dy, r):
    return torch.sqrt(dx * dx + dy * dy) - r


def _sdf_square(dx, dy, r):
    return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r  # 0.85: about the circle's area


def _sdf_triangle(dx, dy, r):
    # Upward-pointing equilateral triangle as the intersection of three half-planes (inradius 0.6 r).
    return torch.maximum(torch.maximum(dy, -0.866 * dx - 0.5 * dy), 0.866 * dx - 0.5 * dy) - 0.6 * r


_SDFS = (_sdf_circle, _sdf_square, _sdf_triangle)  # in ATTRIBUTES["shape"] order


def render(cfg: ShapesConfig, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Render clips for labels (n, num_objects, 5): uint8 (n, 3, T, H, W), vectorised over everything.

    Each object's centre moves along a straight line at sub-pixel precision and bounces off the walls (a triangle
    wave folds the unbounded path back into the frame) when the path is longer than the frame. Starts are drawn
    from the centred `position_range` share of the range where the path fits (across the motion: the frame).
    Coverage comes from a signed distance field with a one-pixel ramp, which anti-aliases the edges.
    """
    n, n_obj, _ = labels.shape
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    scale = min(H, W) / 32.0
    radius = torch.tensor([float(cfg.radius[s]) for s in ATTRIBUTES["size"]])[labels[..., 2]] * scale  # (n, n_obj)
    speed = torch.tensor([float(cfg.speed[s]) for s in ATTRIBUTES["speed"]])[labels[..., 4]] * scale
    velocity = DIRECTION_VECTORS[labels[..., 3]] * speed[..., None]  # (n, n_obj, 2)
    lo = radius[..., None]  # keep the whole shape inside the frame
    hi = torch.stack([W - radius, H - radius], dim=-1)
    # Along the motion axis, start where the object can travel freely for the whole clip if the frame allows it
    # (so the caption's direction is what the clip shows); longer paths bounce off the far wall.
    u = torch.rand(n, n_obj, 2, generator=g)
    if cfg.position_range != 1.0:  # (skipped at 1.0: keeps the default's clips bit-identical)
        u = 0.5 + cfg.position_range * (u - 0.5)
    free = (hi - lo - velocity.abs() * (T - 1)).clamp(min=0)
    start = torch.where(velocity > 0, lo + u * free, torch.where(velocity < 0, hi - u * free, lo + u * (hi - lo)))
    t = torch.arange(T, dtype=torch.float32)
    path = start[:, :, None, :] + velocity[:, :, None, :] * t[None, None, :, None]  # (n, n_obj, T, 2)
    span = (hi - lo)[:, :, None, :]
    folded = torch.remainder(path - lo[:, :, None, :], 2 * span)
    centre = lo[:, :, None, :] + span - (folded - span).abs()  # bounce: reflect at both walls

    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    background = torch.tensor(cfg.background, dtype=torch.float32).view(1, 3, 1, 1, 1)
    video = background.expand(n, 3, T, H, W).clone()
    # Several objects: all large ones first, then the small ones over them, so a small object is never hidden
    # behind a large one; objects of one size are drawn in object order. Colours are distinct within a clip.
    passes = [(obj, None) for obj in range(n_obj)] if n_obj == 1 else \
        [(obj, size) for size in reversed(range(len(ATTRIBUTES["size"]))) for obj in range(n_obj)]
    for obj, size in passes:
        coverage = torch.empty(n, T, H, W)
        for shape_id, sdf_fn in enumerate(_SDFS):  # one SDF per clip: evaluate each shape only where it is drawn
            idx = (labels[:, obj, 1] == shape_id).nonzero().squeeze(1)
            c = centre[idx, obj]  # (k, T, 2)
            dx = xs - c[..., 0, None, None]  # (k, T, H, W)
            dy = ys - c[..., 1, None, None]
            sdf = sdf_fn(dx, dy, radius[idx, obj].view(-1, 1, 1, 1))
            coverage[idx] = sdf.neg_().add_(0.5).clamp_(0.0, 1.0)  # one-pixel anti-aliasing ramp
        if size is not None:  # this pass draws only the objects of this size
            coverage *= (labels[:, obj, 2] == size).view(n, 1, 1, 1)
        colour = RGB[labels[:, obj, 0]].view(n, 3, 1, 1, 1)
        video.lerp_(colour.expand_as(video), coverage[:, None])
    if cfg.noise_std > 0:
        video = video + cfg.noise_std * torch.randn(video.shape, generator=g)
    return video.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


@dataclass
class ShapesSplit:
    """A rendered split: videos uint8 (n, 3, T, H, W), labels (n, num_objects, 5), unseen (n,), captions; with
    several objects also `unseen_pair` (n,) and `twin` (n,: the index of the swapped-binding twin, -1 for none)."""

    videos: torch.Tensor
    labels: torch.Tensor
    unseen: torch.Tensor
    captions: list[str]
    unseen_pair: torch.Tensor | None = None
    twin: torch.Tensor | None = None


def clause_for(obj_labels: list[int], template: int, picks: list[int], synonyms: bool = True, fixed=()) -> str:
    """One object's clause from draws made elsewhere (the binding task's twins share them): a template and, per
    attribute, a synonym (each taken modulo its list; synonyms=False: the canonical word; `fixed`: left out)."""
    words = {}
    for attr, idx, pick in zip(ATTRIBUTE_NAMES, obj_labels, picks):
        options = SYNONYMS[attr][ATTRIBUTES[attr][idx]]
        words[attr] = "" if attr in fixed else options[pick % len(options) if synonyms else 0]
    return fill(TEMPLATES[template % len(TEMPLATES)], words)


def split_labels(cfg: ShapesConfig, split: str, g: torch.Generator) -> tuple[dict, list[str]]:
    """The labels and flags of a split and its captions, drawn from `g` before any rendering."""
    n = cfg.split_sizes.get(split, 0)
    if cfg.num_objects == 1:
        labels, unseen = sample_labels(cfg, split, n, g)
        return {"labels": labels, "unseen": unseen}, [caption_for(labels[i], g, cfg.synonyms, cfg.fixed)
                                                       for i in range(n)]
    from sorabench.data.binding import binding_captions, sample_binding_labels

    info = sample_binding_labels(cfg, split, n, g, heldout_triples(cfg), [len(v) for v in ATTRIBUTES.values()],
                                 fix=lambda labels: fix_labels(cfg, labels))
    captions = binding_captions(info["labels"], info["twin"], info["swapped"], g,
                                lambda obj, template, picks: clause_for(obj, template, picks, cfg.synonyms, cfg.fixed))
    return info, captions


def split_captions(cfg: ShapesConfig, split: str) -> list[str]:
    """The captions of `make_split(cfg, split)` without rendering the videos (same generator, drawn first)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + SPLIT_IDS[split])
    return split_labels(cfg, split, g)[1]


def make_split(cfg: ShapesConfig, split: str, chunk: int = 1024) -> ShapesSplit:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    n = cfg.split_sizes.get(split, 0)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + SPLIT_IDS[split])
    info, captions = split_labels(cfg, split, g)
    labels, unseen = info["labels"], info["unseen"]
    # Render in chunks to bound the float intermediates (n_obj x T x H x W per clip).
    videos = [render(cfg, labels[i : i + chunk], g) for i in range(0, n, chunk)]
    videos = torch.cat(videos) if videos else torch.empty(0, 3, cfg.num_frames, cfg.height, cfg.width, dtype=torch.uint8)
    return ShapesSplit(videos, labels, unseen, captions, info.get("unseen_pair"), info.get("twin"))


@register("shapes")
class ShapesDataset(VideoDataset):
    """One split of `shapes`, rendered once at construction (uint8 in memory: 4096 clips of 8x32x32 are 100 MB)."""

    config = ShapesConfig
    attributes = {name: len(values) for name, values in ATTRIBUTES.items()}  # the label schema: `labels` columns

    def __init__(self, cfg: ShapesConfig, split: str, train: bool | None = None):  # no augmentation: train unused
        self.cfg, self.split = cfg, split
        self.data = make_split(cfg, split)

    def __len__(self) -> int:
        return len(self.data.captions)

    def __getitem__(self, i: int) -> dict:
        item = {
            "video": self.data.videos[i].float() / 127.5 - 1.0,
            "caption": self.data.captions[i],
            "labels": self.data.labels[i, 0],
            "unseen": self.data.unseen[i],
        }
        if self.cfg.num_objects > 1:  # the binding task: every object's labels, both held-out levels, the twin
            item.update(labels=self.data.labels[i], unseen_pair=self.data.unseen_pair[i], twin=self.data.twin[i])
        return item
