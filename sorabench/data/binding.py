"""The binding task of `shapes` (`data.num_objects=2` or 3): several objects per clip, each with its own attributes,
so that a caption only describes its clip if every attribute is bound to the right object.

- Each object is named by its colour, and the colours of a clip are distinct; every object has its own shape, size,
  direction and speed. The caption joins one clause per object (the single-object templates and synonyms) in a
  random order: "quickly, a big red box is rising and a small blue disk moving left slowly".
- Compositions held out of training at two levels, both flagged per clip:
  - an unseen **description**: an object's (colour, shape, direction) is one of the held-out triples of the
    single-object task (`heldout_triples`);
  - an unseen **pairing**: every object's description is seen in training, but a pair of them never is (a seeded
    share `holdout_pair_fraction` of the pairs of seen descriptions with distinct colours).
- **Swapped-binding twins**: val, test and unseen come in twin pairs (clips 2j and 2j+1). A twin exchanges one
  attribute (shape, size, direction or speed, one that differs between them) between objects 0 and 1, with the
  same words in the same clauses and order: "a red circle moving left and a blue square moving up" and "a red square
  moving left and a blue circle moving up". A model that ignores which word goes with which object can get at most
  one clip of each pair right.

Everything is drawn from the split's seeded generator, after nothing else: the single-object task (num_objects=1)
never calls this module, so its clips stay bit-identical.
"""

from __future__ import annotations

import torch

# Attribute columns of a label row (the order of shapes.ATTRIBUTES) and the sizes of their vocabularies.
COLOUR, SHAPE, SIZE, DIRECTION, SPEED = range(5)
SWAPPABLE = (SHAPE, SIZE, DIRECTION, SPEED)  # exchanged between twins (colour names the object)
MAX_REDRAWS = 1000


def triple_ids(labels: torch.Tensor, n_shape: int, n_dir: int) -> torch.Tensor:
    """(..., 5) labels -> the id of each object's (colour, shape, direction) description."""
    return (labels[..., COLOUR] * n_shape + labels[..., SHAPE]) * n_dir + labels[..., DIRECTION]


def heldout_pairs(held_triples: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A symmetric (D, D) mask over description ids: the pairs of *seen* descriptions of distinct colours that no
    training clip shows together (a seeded choice of `fraction` of them)."""
    n_col, n_shape, n_dir = held_triples.shape
    d = n_col * n_shape * n_dir
    colour = torch.arange(d) // (n_shape * n_dir)
    seen = ~held_triples.flatten()
    i, j = torch.triu_indices(d, d, offset=1)
    eligible = seen[i] & seen[j] & (colour[i] != colour[j])
    i, j = i[eligible], j[eligible]
    g = torch.Generator().manual_seed(seed * 1_000_003 + 29)
    chosen = torch.randperm(len(i), generator=g)[: max(1, round(fraction * len(i)))]
    mask = torch.zeros(d, d, dtype=torch.bool)
    mask[i[chosen], j[chosen]] = True
    return mask | mask.T


def composition_flags(labels: torch.Tensor, held_triples: torch.Tensor, held_pairs: torch.Tensor):
    """(unseen description, unseen pairing) per clip of labels (n, K, 5): some object's description is held out;
    or every description is seen and some pair of them is held out."""
    _, n_shape, n_dir = held_triples.shape
    ids = triple_ids(labels, n_shape, n_dir)  # (n, K)
    description = held_triples.flatten()[ids].any(1)
    k = labels.shape[1]
    pair = torch.zeros(len(labels), dtype=torch.bool)
    for a in range(k):
        for b in range(a + 1, k):
            pair |= held_pairs[ids[:, a], ids[:, b]]
    return description, pair & ~description


def draw_objects(n: int, k: int, sizes: list[int], g: torch.Generator, fix=None) -> torch.Tensor:
    """(n, k, 5) labels: distinct colours per clip, every other attribute drawn per object (then `fix(labels)`: the
    attributes the task holds constant)."""
    colours = torch.rand(n, sizes[COLOUR], generator=g).argsort(1)[:, :k]
    labels = torch.stack([torch.randint(s, (n, k), generator=g) for s in sizes], dim=-1)
    labels[..., COLOUR] = colours
    return labels if fix is None else fix(labels)


def sample_binding_labels(cfg, split: str, n: int, g: torch.Generator, held_triples: torch.Tensor,
                          sizes: list[int], fix=None) -> dict[str, torch.Tensor]:
    """Labels (n, K, 5) of a binding split and its flags: `unseen` (an unseen description), `unseen_pair`, and
    `twin` (the index of each clip's swapped-binding twin, -1 in train).

    train: only seen descriptions and seen pairings. val/test: `eval_unseen_fraction` of the base clips with an
    unseen description and as many with an unseen pairing, the rest seen; `unseen`: half each. Each base clip is
    followed by its twin, which keeps its own flags (exchanging an attribute can make a seen pairing unseen)."""
    held_pairs = heldout_pairs(held_triples, cfg.holdout_pair_fraction, cfg.seed)
    k = cfg.num_objects
    twins = split != "train"
    base_n = (n + 1) // 2 if twins else n
    if split == "train":
        want = torch.zeros(base_n, dtype=torch.long)  # 0 seen, 1 unseen description, 2 unseen pairing
    elif split == "unseen":
        want = 1 + (torch.rand(base_n, generator=g) < 0.5).long()
    else:
        u = torch.rand(base_n, generator=g)
        f = cfg.eval_unseen_fraction
        want = torch.where(u < f, 1, torch.where(u < 2 * f, 2, 0))
    labels = draw_objects(base_n, k, sizes, g, fix)
    for _ in range(MAX_REDRAWS):  # redraw the clips that are not what their slot asks for
        description, pair = composition_flags(labels, held_triples, held_pairs)
        got = torch.where(description, 1, torch.where(pair, 2, 0))
        bad = got != want
        if twins:  # a twin needs an attribute to exchange: objects 0 and 1 must differ in one besides colour
            bad |= (labels[:, 0, list(SWAPPABLE)] == labels[:, 1, list(SWAPPABLE)]).all(1)
        if not bad.any():
            break
        labels[bad] = draw_objects(int(bad.sum()), k, sizes, g, fix)
    else:
        raise RuntimeError(f"shapes binding: could not draw {split} compositions in {MAX_REDRAWS} rounds")
    if not twins:
        description, pair = composition_flags(labels, held_triples, held_pairs)
        return {"labels": labels, "unseen": description, "unseen_pair": pair,
                "twin": torch.full((n,), -1, dtype=torch.long), "swapped": torch.full((n,), -1, dtype=torch.long)}
    # The twin of each base clip: one attribute, among those where objects 0 and 1 differ, exchanged between them.
    differs = labels[:, 0, list(SWAPPABLE)] != labels[:, 1, list(SWAPPABLE)]  # (base_n, 4)
    choice = torch.multinomial(differs.float(), 1, generator=g).squeeze(1)
    swapped = torch.tensor(SWAPPABLE)[choice]
    twin = labels.clone()
    rows = torch.arange(base_n)
    twin[rows, 0, swapped], twin[rows, 1, swapped] = labels[rows, 1, swapped], labels[rows, 0, swapped]
    both = torch.stack([labels, twin], 1).flatten(0, 1)[:n]  # base 0, twin 0, base 1, twin 1, ...
    description, pair = composition_flags(both, held_triples, held_pairs)
    index = torch.arange(len(both))
    partner = torch.where(index % 2 == 0, index + 1, index - 1)
    partner[partner >= len(both)] = -1  # an odd-sized split's last base clip has no twin in it
    return {"labels": both, "unseen": description, "unseen_pair": pair, "twin": partner,
            "swapped": swapped.repeat_interleave(2)[:n]}


def binding_captions(labels: torch.Tensor, twin: torch.Tensor, swapped: torch.Tensor, g: torch.Generator,
                     clause) -> list[str]:
    """One caption per clip: per-object clauses (`clause(object labels, template, synonym picks)`) in a random
    order. A twin reuses its base clip's draws - the same template, clause order and word for each value, the words
    of the exchanged attribute moving with their values - so the pair reads the same words with other bindings."""
    n, k, _ = labels.shape
    captions: list[str] = []
    draws = {}
    for i in range(n):
        base = int(twin[i]) if 0 <= int(twin[i]) < i else None
        if base is None:
            order = torch.randperm(k, generator=g).tolist()
            templates = [int(torch.randint(1 << 16, (1,), generator=g)) for _ in range(k)]
            picks = [[int(torch.randint(1 << 16, (1,), generator=g)) for _ in range(5)] for _ in range(k)]
            draws[i] = (order, templates, picks)
        else:
            order, templates, base_picks = draws[base]
            picks = [list(p) for p in base_picks]
            a = int(swapped[i])  # the exchanged attribute's words travel with its values
            picks[0][a], picks[1][a] = base_picks[1][a], base_picks[0][a]
        captions.append(" and ".join(clause(labels[i, obj].tolist(), templates[obj], picks[obj]) for obj in order))
    return captions
