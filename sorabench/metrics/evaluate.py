"""Scoring a text-to-video model: FVD, FID, KID and text-video alignment with a pinned protocol.

- `evaluate_module(pipeline, cfg, logger, step)` samples clips for prompts of the eval split (seen and unseen
  compositions), computes FVD (clips), FID and KID (frames) against real clips of that split, and the alignment of
  each sample with its prompt as read by the evaluator; every number is logged with its protocol beside it. `train`
  runs it after training and every N steps (`sorabench.training.dit_run`), `sorabench evaluate ckpt=` on a checkpoint
  (`sorabench.commands.evaluate`).
- `evaluate_videos` scores any two streams of clips: `sorabench evaluate real_root= fake_root=` compares two folders.
- The evaluator (the embedded default feature network) is trained once per data config and cached
  (`sorabench.training.evaluator_module.ensure_evaluator`): this module sits on the training layer for it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sorabench.config import ConfigError, config_key, require, to_container
from sorabench.data.module import attribute_schema, build_dataset, clip_fields
from sorabench.metrics.alignment import alignment_from_logits
from sorabench.metrics.binding import binding_scores, count_objects, read_objects  # noqa: F401 - registers `binding`
from sorabench.metrics.features import build_feature_networks
from sorabench.metrics.fvd import FrechetVideoDistance  # noqa: F401 - registers fvd, fid and kid
from sorabench.metrics.memorisation import Memorisation  # noqa: F401 - registers `memorisation`
from sorabench.metrics.registry import METRICS, EvalSetup, build_metric, directions
from sorabench.precision import autocast, resolve
from sorabench.tracking import set_run_tags
from sorabench.training.evaluator_module import ensure_evaluator, evaluator_settings, load_evaluator, training_data


# ---- metrics ---------------------------------------------------------------------------------------------------


CLIP_STARTS = ("first", "center", "random")


def check_metrics_config(cfg: DictConfig, data_clips: bool = True) -> None:
    """Reject a metrics config that cannot work, before anything is rendered, trained or sampled. `data_clips`:
    the clips come from `cfg.data` (not from two folders, whose files `check_lengths` checks)."""
    m = cfg.metrics
    require(int(m.num_frames) >= 1, "metrics.num_frames", m.num_frames, "must be >= 1")
    require(int(m.frame_stride) >= 1, "metrics.frame_stride", m.frame_stride, "must be >= 1")
    require(m.get("clip_start", "first") in CLIP_STARTS, "metrics.clip_start", m.get("clip_start"),
            f"must be one of {CLIP_STARTS}")
    require(m.n_real >= 2 and m.n_samples >= 2, "metrics.n_real/n_samples", (m.n_real, m.n_samples), "need >= 2 each")
    fvd = int(m.num_frames) > 1
    if m.features == "i3d" and fvd:
        from sorabench.metrics.i3d import min_frames

        require(int(m.num_frames) >= min_frames(), "metrics.num_frames", m.num_frames,
                f"the I3D needs clips of at least {min_frames()} frames (standard FVD: 16)")
    if m.features == "torchscript":
        for net in ("fvd", "fid") if fvd else ("fid",):  # images (num_frames=1) need no video network
            path = Path(m[net].path)
            if not path.is_file():
                raise FileNotFoundError(f"metrics.{net}.path={str(path)!r}: no such TorchScript feature network file")
    for key in ("compute", "extra"):
        for name in m.get(key) or []:
            require(name in METRICS, f"metrics.{key}", list(m[key]), f"{name!r} is not a registered metric "
                    f"(sorabench.metrics.registry; registered: {sorted(METRICS)})")
    if m.features == "evaluator":
        check_evaluator_data(cfg, data_clips)
    blocks = (["evaluator"] if m.get("evaluator") is not None else []) + (
        ["feature_evaluator"] if m.features == "evaluator" and m.get("feature_evaluator") else [])
    for block in blocks if data_clips else ():  # a typo'd setting or data key: one line, before anything trains
        training_data(to_container(cfg.data), evaluator_settings(cfg, block))
    floor = m.get("evaluator_min_accuracy")
    require(floor is None or (isinstance(floor, (int, float)) and 0 <= floor <= 1), "metrics.evaluator_min_accuracy",
            floor, "must be null or a number in [0, 1]")
    span = (int(m.num_frames) - 1) * int(m.frame_stride) + 1
    if data_clips and int(cfg.data.num_frames) < span:
        raise ConfigError(f"metrics.num_frames={m.num_frames} at stride {m.frame_stride} needs {span} frames; "
                          f"data.num_frames={cfg.data.num_frames} (raise data.num_frames)")
    sizes = OmegaConf.select(cfg, "data.split_sizes")  # a rendered dataset declares its split sizes: check now
    if data_clips and sizes is not None and m.real_split in sizes:
        have = int(sizes[m.real_split])
        require(have >= max(int(m.n_real), int(m.n_samples)), "metrics.n_real/n_samples", (m.n_real, m.n_samples),
                f"the {m.real_split} split has only {have} clips (data.split_sizes.{m.real_split})")


def uses_evaluator(cfg: DictConfig) -> bool:
    """Whether an evaluation reads clips with the evaluator: as its feature network (`metrics=evaluator`), or for
    the alignment and binding scores of a labelled dataset (`attribute_schema`)."""
    return cfg.metrics.features == "evaluator" or bool(attribute_schema(to_container(cfg.data)))


def feature_evaluator(cfg: DictConfig, evaluator):
    """The network behind FVD/FID/KID with `metrics=evaluator`: the accuracy instrument itself, or with
    `metrics.feature_evaluator` a second evaluator trained apart from it (another seed, wider data), so that FVD and
    the accuracies are not one instrument read twice."""
    if cfg.metrics.features != "evaluator" or not cfg.metrics.get("feature_evaluator"):
        return evaluator
    return load_evaluator(ensure_evaluator(cfg, "feature_evaluator")).net


def check_evaluator_data(cfg: DictConfig, data_clips: bool) -> None:
    """`metrics=evaluator` on clips other than a labelled dataset's (an unlabelled dataset such as `folder`, or the
    two folders of `evaluate real_root= fake_root=`) only with `metrics.evaluator_on_other_data=true`: its features
    are trained on `shapes`. An unlabelled dataset has no labels to train one on, so it comes from
    `metrics.evaluator_checkpoint`. The one check of `train` and `evaluate` alike."""
    m = cfg.metrics
    if data_clips and attribute_schema(to_container(cfg.data)):
        return
    if not m.get("evaluator_on_other_data", False):
        if not data_clips:
            raise ConfigError(f"metrics={m.features!r}: the evaluator's features are trained on `shapes`, not on your "
                              "videos: use metrics=i3d (standard FVD), or set metrics.evaluator_on_other_data=true to "
                              "apply them anyway")
        raise ConfigError(f"data={cfg.data.name} with metrics=evaluator: the evaluator's features are trained on "
                          "`shapes`; use metrics=i3d (standard FVD), or set metrics.evaluator_on_other_data=true")
    if data_clips:
        require(bool(m.get("evaluator_checkpoint")), "metrics.evaluator_checkpoint", m.get("evaluator_checkpoint"),
                f"data={cfg.data.name} has no labels to train the evaluator on: give one trained on shapes "
                "(sorabench train-evaluator)")


def protocol_fields(m: DictConfig, video_net, data_cfg: dict, seed: int) -> dict:
    net = video_net if video_net is not None else None
    return {
        "feature_net": net.id if net is not None else "none (num_frames=1: no FVD)",
        "feature_sha256": net.sha256 if net is not None else "",
        "n_real": int(m.n_real),
        "n_generated": int(m.n_samples),
        "num_frames": int(m.num_frames),
        "frame_stride": int(m.frame_stride),
        "clip_start": str(m.get("clip_start", "first")),
        "resolution": int(m.resolution),
        "real_split": f"{data_cfg['name']}:{config_key(clip_fields(data_cfg))}/{m.real_split}",
        "seed": int(seed),
    }


def take_clips(videos: torch.Tensor, m: DictConfig, start: str = "first",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The protocol's frames of each clip: `num_frames` frames at `frame_stride`, from frame 0 (`first`), the
    middle (`center`) or a random offset per clip (`random`, from `generator`: StyleGAN-V's real clips)."""
    span = (m.num_frames - 1) * m.frame_stride + 1
    t = videos.shape[2]
    if t < span:
        raise ConfigError(f"metrics.num_frames={m.num_frames} at stride {m.frame_stride} needs {span} frames; "
                          f"clips have {t} (raise data.num_frames)")
    offsets = [clip_offset(t, span, start, generator) for _ in range(len(videos))]
    if all(o == 0 for o in offsets):
        return videos[:, :, :span : m.frame_stride]
    return torch.stack([v[:, o : o + span : m.frame_stride] for v, o in zip(videos, offsets)])


def clip_offset(t: int, span: int, start: str, generator: torch.Generator | None = None) -> int:
    """First frame of a `span`-frame window in `t` frames: 0 (first), the middle (center) or uniform (random)."""
    if start == "first" or t == span:
        return 0
    if start == "center":
        return (t - span) // 2
    return int(torch.randint(t - span + 1, (1,), generator=generator))


def eval_prompts(dataset, n: int) -> dict:
    """Captions, attribute labels and unseen flags of the first n items, without keeping their videos."""
    if hasattr(dataset, "entries"):  # a folder: captions are in the index, no decoding needed
        return {"caption": [c for _, c in dataset.entries[:n]],
                "labels": torch.zeros((n, len(dataset.attributes)), dtype=torch.long),  # no labels: 0 columns
                "unseen": torch.zeros(n, dtype=torch.bool)}
    items = [dataset[i] for i in range(n)]
    prompts = {"caption": [it["caption"] for it in items], "labels": torch.stack([it["labels"] for it in items]),
               "unseen": torch.stack([torch.as_tensor(it["unseen"]) for it in items])}
    if "unseen_pair" in items[0]:  # the binding task (labels (n, K, 5)): metrics/binding.py
        prompts["unseen_pair"] = torch.stack([torch.as_tensor(it["unseen_pair"]) for it in items])
    return prompts


def real_batches(dataset, m: DictConfig, count: int, seed: int):
    """Batches of the first `count` real clips of `dataset`, cut to the protocol (clip_start drawn from `seed`);
    only one batch is in memory at a time."""
    generator = torch.Generator().manual_seed(seed)
    bs = int(m.batch_size)
    for i in range(0, count, bs):
        video = torch.stack([dataset[j]["video"] for j in range(i, min(i + bs, count))])
        yield take_clips(video, m, m.get("clip_start", "first"), generator)


def train_batches(data_cfg: dict, m: DictConfig):
    """The train split's clips cut to the protocol, with their labels, batch by batch: what the memorisation metric
    compares generated and real clips with."""
    train = build_dataset(data_cfg, "train", train=False)
    bs = int(m.batch_size)
    for i in range(0, len(train), bs):
        items = [train[j] for j in range(i, min(i + bs, len(train)))]
        yield take_clips(torch.stack([it["video"] for it in items]), m), torch.stack([it["labels"] for it in items])


def metric_names(m: DictConfig) -> list[str]:
    """What an evaluation computes: `metrics.compute` (the built-ins) and `metrics.extra` (any registered metric)."""
    compute = m.get("compute")
    return [*(DEFAULT_METRICS if compute is None else compute), *(m.get("extra") or [])]


DEFAULT_METRICS = ("fvd", "fid", "kid", "alignment")  # a metrics config from before `metrics.compute` existed


@torch.no_grad()
def evaluate_videos(fake_batches, real_batches, m: DictConfig, nets, evaluator, fields: dict,
                    prompt_labels: torch.Tensor | None, prompt_unseen: torch.Tensor | None,
                    prompt_extra: dict | None = None) -> tuple[dict[str, float], dict[str, bool]]:
    """Every metric of `metric_names(m)` (each a registered torchmetrics Metric, `sorabench.metrics.registry`) of
    generated vs real clips: ({eval/<key>: value}, {key: higher is better} for the keys the metrics rank by).

    `fake_batches` and `real_batches` are iterables of clip batches (B, C, T, H, W) already cut to the protocol;
    `real_batches` may also be a callable returning one, called only when a metric needs real clips (FVD's real
    statistics may come from the cache). Clips are consumed batch by batch: features, never all clips, are kept.
    """
    setup = EvalSetup(m, nets[0], nets[1], evaluator, fields, prompt_labels, prompt_unseen, prompt_extra or {})
    metrics = {name: metric for name in metric_names(m) if (metric := build_metric(name, setup)) is not None}
    readers = [metric for metric in metrics.values() if getattr(metric, "needs_real", True)]
    if readers:
        seen, n_real = 0, int(m.n_real)
        for video in (real_batches() if callable(real_batches) else real_batches):
            video = video[: n_real - seen]
            for metric in readers:
                metric.update(video, real=True)
            seen += len(video)
            if seen >= n_real:
                break
    for video in fake_batches:
        for metric in metrics.values():
            metric.update(video, real=False)
    out, ranked = {}, {}
    for name, metric in metrics.items():
        value = metric.compute()
        scores = ({f"eval/{k}": float(v) for k, v in value.items()} if isinstance(value, dict) else
                  {f"eval/{name}": float(value)})
        out.update(scores)
        ranked.update(directions(metric, scores))
    return out, ranked


@torch.no_grad()
def reconstruct(vae_module, video: torch.Tensor) -> torch.Tensor:
    """VAE reconstructions (posterior means decoded) of a batch of clips, clamped to [-1, 1] like decoded samples."""
    device = next(vae_module.parameters(), torch.zeros(())).device
    mean, _ = vae_module.vae.encode(video.to(device))
    return vae_module.vae.decode(mean).clamp(-1, 1).cpu()


@torch.no_grad()
def binding_reference_points(evaluator, batches, labels, unseen, vae_module=None, unseen_pair=None):
    """`reference_points` of the binding task: eval/{real,noise,ceiling}_bind_* (metrics/binding.py). The real
    clips' scores are the instrument's own accuracy on this data: what a perfect generator would get."""
    noise_gen = torch.Generator().manual_seed(0)
    read = {"real": [], "noise": [], "ceiling": []}
    counts = {source: [] for source in read}
    seen = 0
    for video in batches:
        colours = labels[seen : seen + len(video), :, 0]
        seen += len(video)
        clips = {"real": video, "noise": torch.randn(video.shape, generator=noise_gen).clamp(-1, 1)}
        if vae_module is not None:
            clips["ceiling"] = reconstruct(vae_module, video)
        for source, clip in clips.items():
            read[source].append(read_objects(evaluator, clip, colours))
            counts[source].append(count_objects(clip))
    out = {}
    for source, chunks in read.items():
        if chunks:
            scores = binding_scores(torch.cat(chunks), labels, unseen, unseen_pair, prefix="bind",
                                    counts=torch.cat(counts[source]))
            out.update({f"eval/{source}_{k}": v for k, v in scores.items() if "chance" not in k})
    return out


@torch.no_grad()
def reference_points(evaluator, batches, labels, unseen, vae_module=None, unseen_pair=None) -> dict[str, float]:
    """What the evaluator reads, per attribute and all-correct, from the real clips (`eval/real_acc_*`), from pure
    noise (`eval/noise_acc_*`: the floor) and from the VAE's reconstructions of the real clips
    (`eval/ceiling_acc_*`): no latent DiT can show more than its VAE keeps, so this is the ceiling its samples
    are measured against. They tell "at chance" from "broken" and "learned" from "capped". `batches` yields the
    real clips, cut to the protocol, batch by batch."""
    if labels.dim() == 3:  # several objects per prompt: the binding scores of the same three references
        return binding_reference_points(evaluator, batches, labels, unseen, vae_module, unseen_pair)
    noise_gen = torch.Generator().manual_seed(0)
    logits = {"real": [], "noise": [], "ceiling": []}
    for video in batches:
        logits["real"].append(evaluator(video))
        logits["noise"].append(evaluator(torch.randn(video.shape, generator=noise_gen).clamp(-1, 1)))
        if vae_module is not None:
            logits["ceiling"].append(evaluator(reconstruct(vae_module, video)))
    out = {}
    for source, chunks in logits.items():
        if chunks:
            joined = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
            acc = alignment_from_logits(joined, labels, unseen, "r")
            out.update({f"eval/{source}_acc_{a}": acc[f"r/acc_{a}"] for a in [*joined, "all"]})
    return out


# ---- the guidance axis -----------------------------------------------------------------------------------------
# Besides the shared default scale (`metrics.cfg`, the unsuffixed eval/* keys), a model can be scored at every scale
# of `metrics.guidance_scales`, on the first `metrics.guidance_n_samples` prompts (the same prompts and the same
# sampling seed at every scale, so scales differ only by guidance). Keys: `eval/cfg<scale>/<metric>` on the
# `metrics.real_split` prompts, and `eval_<split>/cfg<scale>/<metric>` on the prompts of `metrics.guidance_select_split`
# (val), where the report chooses each strategy's best scale: choosing it on the test prompts would be selection on
# test. MLflow metric names cannot hold '@', hence the `cfg<scale>/` level.

def axis_metrics(scored: dict[str, float]) -> list[str]:
    """What is logged per scale: the headline numbers, not every diagnostic (every attribute scored has a chance)."""
    attrs = [k.removeprefix("eval/chance_") for k in scored if k.startswith("eval/chance_")]
    binding = ["bind_all", "bind_object", "bind_twins"]  # the binding task's headline (a tuning sweep selects on it)
    return ["fvd", "fid", "kid", *[f"acc_{a}" for a in attrs], "acc_all_seen", "acc_all_unseen", *binding]


def guidance_key(metric: str, scale: float, prefix: str = "eval") -> str:
    """`guidance_key("acc_all", 4.0)` -> 'eval/cfg4/acc_all'; `(.., 1.5, "eval_val")` -> 'eval_val/cfg1.5/acc_all'."""
    return f"{prefix}/cfg{float(scale):g}/{metric}"


def check_guidance_axis(m: DictConfig) -> list[float]:
    """The validated guidance scales of `metrics` ([] = no axis), before any compute."""
    scales = m.get("guidance_scales") or []
    require(all(isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in scales),
            "metrics.guidance_scales", list(scales), "must be a list of guidance scales >= 0, e.g. [1,2,4,7]")
    scales = sorted({float(s) for s in scales})
    if not scales:
        return []
    k = m.get("guidance_n_samples") or m.n_samples
    require(isinstance(k, int) and 2 <= k <= m.n_samples, "metrics.guidance_n_samples", k,
            f"must be an integer in [2, metrics.n_samples={m.n_samples}] (the axis scores the first k prompts)")
    split = m.get("guidance_select_split")
    require(split is None or split != m.real_split, "metrics.guidance_select_split", split,
            f"must differ from metrics.real_split={m.real_split!r} (choosing on the reported prompts is selection "
            "on test), or null for an oracle choice")
    return scales


def _axis_scores(scored: dict[str, float], scale: float, prefix: str) -> dict[str, float]:
    return {guidance_key(k, scale, prefix): scored[f"eval/{k}"] for k in axis_metrics(scored) if f"eval/{k}" in scored}


def guidance_axis(pipeline, m: DictConfig, scales: list[float], seed: int, splits: list, default_fake: torch.Tensor,
                  nets, evaluator, data_cfg: dict) -> dict[str, float]:
    """Scores at every scale of the axis for one seed, on the first k prompts of each split in `splits`
    (`(prefix, split, dataset, prompts, n_real)`, see `axis_splits`); on the reported split the first k clips
    already sampled at `metrics.cfg` are reused."""
    k = int(m.get("guidance_n_samples") or m.n_samples)
    sub = OmegaConf.create(to_container(m))  # resolved: a detached copy cannot resolve ${cache_dir}
    out = {}
    for prefix, split, dataset, prompts, n_real in splits:
        with open_dict(sub):
            sub.n_samples, sub.real_split, sub.n_real = k, split, n_real
        fields = protocol_fields(sub, nets[0], data_cfg, seed)
        labels, unseen = prompts["labels"][:k], prompts["unseen"][:k]
        for scale in scales:
            if prefix == "eval" and scale == float(m.cfg):
                fake = default_fake[:k]  # the default scale's clips: same prompts, same seed, no second sampling
            else:
                fake = take_clips(pipeline.sample_videos(prompts["caption"][:k], steps=int(m.sample_steps),
                                                       guidance_scale=scale, seed=seed,
                                                       batch_size=int(m.batch_size)).cpu(), sub)
            real = lambda: real_batches(dataset, sub, n_real, seed)  # noqa: E731 - read only if not cached
            scored, _ = evaluate_videos([fake], real, sub, nets, evaluator, fields, labels, unseen)
            out.update(_axis_scores(scored, scale, prefix))
    return out


def axis_splits(data_cfg: dict, m: DictConfig, dataset, prompts: dict) -> list:
    """The splits the guidance axis scores: the reported one (`eval/cfg*`) and, with `metrics.guidance_select_split`,
    the one the report chooses each strategy's best scale on (`eval_<split>/cfg*`; its real statistics use at most
    `metrics.n_real` clips of that split)."""
    splits = [("eval", m.real_split, dataset, prompts, int(m.n_real))]
    split = m.get("guidance_select_split")
    if split:
        k = int(m.get("guidance_n_samples") or m.n_samples)
        select = build_dataset(data_cfg, split, train=False)
        require(len(select) >= k, "metrics.guidance_select_split", split,
                f"the {split} split has {len(select)} clips, fewer than metrics.guidance_n_samples={k}")
        splits.append((f"eval_{split}", split, select, eval_prompts(select, k), min(int(m.n_real), len(select))))
    return splits


def eval_precision(cfg: DictConfig) -> str:
    """The precision evaluation samples and scores in: the run's (`trainer.precision`, pinned by train), `auto`
    resolved the same way where a command did not pin it (`sorabench.precision`); a protocol field."""
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision == "auto":
        precision = resolve(precision, str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))).precision
    return precision


def evaluate_seed(pipeline, m: DictConfig, seed: int, prompts: dict, dataset, nets, evaluator, scales, splits,
                  k: int, data_cfg: dict) -> tuple[dict[str, float], dict[str, bool], float]:
    """One evaluation seed: sample `n_samples` clips batch by batch, score them against real clips; the guidance
    axis on the first k clips when asked. Returns (scores, metric -> higher is better, guidance-axis seconds)."""
    n, bs = int(m.n_samples), int(m.batch_size)
    labels, unseen = prompts["labels"], prompts["unseen"]
    # sample_videos seeds batch i with seed + i, so batch-by-batch sampling draws the same clips as one call.
    fake = (take_clips(pipeline.sample_videos(prompts["caption"][i : i + bs], steps=int(m.sample_steps),
                                            guidance_scale=float(m.cfg), seed=seed + i, batch_size=bs).cpu(), m)
            for i in range(0, n, bs))
    fields = protocol_fields(m, nets[0], data_cfg, seed)
    kept = []  # the first k clips at the default scale, reused by the guidance axis
    if scales:
        fake = (kept.append(video[: k - sum(map(len, kept))]) or video for video in fake)
    extra = {k: v for k, v in prompts.items() if k not in ("caption", "labels", "unseen")}
    scored, ranked = evaluate_videos(fake, lambda: real_batches(dataset, m, int(m.n_real), seed),
                                     m, nets, evaluator, fields, labels, unseen, extra)
    t_axis = time.time()
    if scales:
        scored.update(guidance_axis(pipeline, m, scales, seed, splits, torch.cat(kept), nets, evaluator, data_cfg))
    return scored, ranked, time.time() - t_axis


def evaluate_module(pipeline, cfg: DictConfig, logger=None, step: int = 0) -> dict[str, float]:
    """Sample `metrics.n_samples` clips per seed with `pipeline` (`sorabench.pipeline.TextToVideo`) and score them;
    logs eval/* and the protocol.

    Streaming: generated clips are sampled, scored and dropped batch by batch, and real clips are read batch by
    batch, so memory does not grow with the clip counts."""
    m = cfg.metrics
    check_metrics_config(cfg)
    scales = check_guidance_axis(m)
    data_cfg = to_container(cfg.data)
    evaluator = load_evaluator(ensure_evaluator(cfg)).net if uses_evaluator(cfg) else None
    labelled = bool(attribute_schema(data_cfg))  # what the evaluator's heads read; else its features only
    nets = build_feature_networks(to_container(m), feature_evaluator(cfg, evaluator))
    dataset = build_dataset(data_cfg, m.real_split, train=False)
    n = int(m.n_samples)
    require(len(dataset) >= max(m.n_real, n), "metrics.n_real/n_samples", (m.n_real, n),
            f"the {m.real_split} split has only {len(dataset)} clips")
    prompts = eval_prompts(dataset, n)
    labels, unseen = prompts["labels"], prompts["unseen"]
    if "memorisation" in metric_names(m) and labelled:  # rendered only when asked for: the whole train split
        prompts["train_batches"] = lambda: train_batches(data_cfg, m)
    splits = axis_splits(data_cfg, m, dataset, prompts) if scales else []
    k = int(m.get("guidance_n_samples") or n)
    per_seed, axis_seconds, ranked = [], 0.0, {}
    precision = eval_precision(cfg)
    t0 = time.time()
    with autocast(precision, getattr(pipeline, "device", "cpu")):  # sampling and feature nets; statistics float64
        for s in range(int(m.num_seeds)):
            scored, ranked, seconds = evaluate_seed(pipeline, m, int(m.seed) + s, prompts, dataset, nets, evaluator,
                                                    scales, splits, k, data_cfg)
            per_seed.append(scored)
            axis_seconds += seconds
        references = {}  # what the evaluator's heads read from real clips, noise and the VAE's reconstructions
        if evaluator is not None and labelled:
            references = reference_points(evaluator, real_batches(dataset, m, n, int(m.seed)), labels, unseen,
                                          pipeline.vae, prompts.get("unseen_pair"))
    metrics = {key: sum(r[key] for r in per_seed) / len(per_seed) for key in per_seed[0]}
    if scales:
        metrics["time/guidance_axis_seconds"] = axis_seconds
    if len(per_seed) > 1 and "eval/fvd" in per_seed[0]:
        metrics["eval/fvd_seed_std"] = float(torch.tensor([r["eval/fvd"] for r in per_seed]).std())
    metrics.update(references)
    metrics["time/eval_seconds"] = time.time() - t0
    if logger is not None:
        logger.log_metrics(metrics, step=step)
        set_run_tags(logger, protocol_tags(m, nets, data_cfg, precision, ranked, scales, k))
    return metrics


def protocol_tags(m: DictConfig, nets, data_cfg: dict, precision: str, ranked: dict[str, bool], scales: list[float],
                  k: int) -> dict[str, str]:
    """The run tags beside an evaluation's numbers: its protocol, the label schema and each metric's direction."""
    fields = protocol_fields(m, nets[0], data_cfg, int(m.seed))
    protocol = {f"eval.protocol.{key}": str(v) for key, v in fields.items()}
    protocol.update({"eval.protocol.num_seeds": str(m.num_seeds), "eval.protocol.cfg": str(m.cfg),
                     "eval.protocol.sample_steps": str(m.sample_steps), "eval.protocol.precision": precision,
                     "eval.protocol.fid_net": nets[1].id if nets[1] is not None else "none",
                     "eval.protocol.fid_sha256": nets[1].sha256 if nets[1] is not None else ""})
    # the label schema, in the dataset's order: the report's attribute tables follow it
    if m.get("feature_evaluator") and m.features == "evaluator":  # the settings behind feature_sha256, readable
        protocol["eval.protocol.feature_evaluator"] = json.dumps(to_container(m.feature_evaluator), sort_keys=True)
    protocol["eval.attributes"] = ",".join(attribute_schema(data_cfg))
    # what the report ranks each metric by (torchmetrics' own flag), so it never guesses from a name
    protocol.update({f"eval.higher_is_better.{key}": str(up) for key, up in ranked.items()})
    if scales:
        protocol.update({"eval.protocol.guidance_scales": ",".join(f"{x:g}" for x in scales),
                         "eval.protocol.guidance_n_samples": str(k),
                         "eval.protocol.guidance_select_split": str(m.get("guidance_select_split"))})
    return protocol
