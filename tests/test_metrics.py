"""Tests of sorabench.metrics: Fréchet distance, FVD, FID/KID on frames, feature networks, cache keys, alignment."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import Metric

from sorabench.metrics import (
    PROTOCOL_FIELDS,
    EvaluatorFeatures,
    FrechetVideoDistance,
    TorchScriptFeatures,
    attribute_accuracy,
    build_feature_networks,
    clips_to_frames,
    FrameFID,
    FrameKID,
    frechet_distance,
    kid_subset_size,
    load_real_statistics,
    protocol_key,
    save_real_statistics,
)
from sorabench.metrics.registry import METRICS, register
from sorabench.models.evaluator import VideoAttributeClassifier

CONF = Path(__file__).resolve().parents[1] / "conf" / "metrics"
ATTRIBUTES = {"colour": 6, "shape": 3, "size": 2, "direction": 4, "speed": 2}


# --------------------------------------------------------------------------------------------- helpers


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def frechet_by_eigh(mu1, sigma1, mu2, sigma2) -> float:
    """Independent reference: Tr (Σ1Σ2)^½ = Tr (Σ1^½ Σ2 Σ1^½)^½, both roots of symmetric PSD matrices via eigh."""

    def sym_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root1 = sym_sqrt(sigma1)
    tr_covmean = np.trace(sym_sqrt(root1 @ sigma2 @ root1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def moving_squares(n: int, frames: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Clips (n, 3, T, H, W) in [-1, 1]: a 4-pixel square of a random colour moving right (wrapping around)."""
    g = torch.Generator().manual_seed(seed)
    video = -torch.ones(n, 3, frames, size, size)
    colours = torch.rand(n, 3, generator=g) * 2 - 1
    starts = torch.randint(0, size - 4, (n, 2), generator=g)
    for i in range(n):
        y, x = starts[i].tolist()
        for t in range(frames):
            left = (x + t) % (size - 4)
            video[i, :, t, y : y + 4, left : left + 4] = colours[i].view(3, 1, 1)
    return video


class RandomConvFeatures(nn.Module):
    """A fixed, randomly initialised clip feature network: conv -> ReLU -> global pool -> (B, 16)."""

    num_features = 16
    per_frame = False

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1)

    def forward(self, video):
        return torch.relu(self.conv(video)).mean((2, 3, 4))


class ProbeNet(nn.Module):
    """Reports what it was given: [min, max, is_float, dim1, dim2, dim3, dim4], plus a flag from a call kwarg."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        xf = x.float()
        shape = torch.tensor(x.shape[1:], dtype=torch.float32).expand(x.shape[0], -1)
        stats = torch.stack(
            [
                xf.flatten(1).amin(1),
                xf.flatten(1).amax(1),
                torch.full((x.shape[0],), float(x.is_floating_point())),
                torch.full((x.shape[0],), float(return_features)),
            ],
            dim=1,
        )
        return torch.cat([stats, shape], dim=1)


class TinyVideoNet(nn.Module):
    """Stands in for StyleGAN-V's I3D TorchScript, with the same call signature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(3, 8, 3, padding=1)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        pooled = torch.relu(self.conv(x)).mean((2, 3, 4))
        return pooled if return_features else pooled.sum(1, keepdim=True)


class TinyImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.relu(self.conv(x.float() / 255.0)).mean((2, 3))


def script(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


# --------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    var1, var2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_matches_eigh_reference_on_random_covariances(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = random_spd(d, rng), random_spd(d, rng)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        frechet_by_eigh(mu1, sigma1, mu2, sigma2), rel=1e-8, abs=1e-8
    )
    # Torch float32 inputs give the same float64 answer (up to the float32 rounding of the inputs).
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    assert frechet_distance(as_t(mu1), as_t(sigma1), as_t(mu2), as_t(sigma2)) == pytest.approx(
        frechet_by_eigh(mu1, sigma1, mu2, sigma2), rel=1e-4
    )


def test_frechet_of_identical_gaussians_is_zero_and_singular_covariances_work():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(6), random_spd(6, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Rank-1 covariances (fewer samples than dimensions): the product is singular, the result must still be finite.
    v = rng.standard_normal((6, 1))
    singular = v @ v.T
    d = frechet_distance(mu, singular, mu + 1, singular)
    assert math.isfinite(d) and d == pytest.approx(6.0, abs=1e-3)


def test_frechet_rejects_non_psd_and_mismatched_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------------------------- FVD


def test_fvd_of_identical_sets_is_zero():
    clips = moving_squares(32)
    fvd = FrechetVideoDistance(RandomConvFeatures())
    fvd.update(clips, real=True)
    fvd.update(clips, real=False)
    assert fvd.compute().dtype == torch.float64
    assert abs(float(fvd.compute())) < 1e-6


def test_fvd_rises_monotonically_with_noise():
    real = moving_squares(64, seed=0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(real.shape, generator=g)
    fvd = FrechetVideoDistance(RandomConvFeatures())
    fvd.update(real, real=True)
    scores = []
    for level in (0.0, 0.1, 0.25, 0.5, 1.0):
        fvd.reset()  # keeps the real statistics (reset_real_features=False)
        fvd.update(real + level * noise, real=False)
        scores.append(float(fvd.compute()))
    assert scores[0] < 1e-6
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_fvd_streaming_equals_one_shot_numpy():
    net = RandomConvFeatures()
    real, fake = moving_squares(40, seed=0), moving_squares(30, seed=1) + 0.2
    fvd = FrechetVideoDistance(net)
    for chunk in real.split(13):
        fvd.update(chunk, real=True)
    for chunk in fake.split(7):
        fvd.update(chunk, real=False)
    with torch.no_grad():
        f_real, f_fake = net(real).double().numpy(), net(fake).double().numpy()
    expected = frechet_distance(
        f_real.mean(0), np.cov(f_real, rowvar=False), f_fake.mean(0), np.cov(f_fake, rowvar=False)
    )
    # float32 features from different batch splits round differently, hence 1e-6 and not machine precision.
    assert float(fvd.compute()) == pytest.approx(expected, rel=1e-6)


def test_fvd_reset_keeps_real_statistics_unless_asked():
    real, fake = moving_squares(16, seed=0), moving_squares(16, seed=1)
    kept = FrechetVideoDistance(RandomConvFeatures())
    dropped = FrechetVideoDistance(RandomConvFeatures(), reset_real_features=True)
    for metric in (kept, dropped):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    before = float(kept.compute())
    kept.reset()
    dropped.reset()
    assert int(kept.real_n) == 16 and int(kept.fake_n) == 0
    assert int(dropped.real_n) == 0
    kept.update(fake, real=False)
    assert float(kept.compute()) == pytest.approx(before, rel=1e-12)


def test_fvd_real_statistics_round_trip_through_the_cache(tmp_path):
    real, fake = moving_squares(20, seed=0), moving_squares(20, seed=2)
    fields = dict.fromkeys(PROTOCOL_FIELDS, 1) | {"feature_net": "random-conv", "real_split": "test"}
    source = FrechetVideoDistance(RandomConvFeatures())
    source.update(real, real=True)
    source.update(fake, real=False)
    assert load_real_statistics(tmp_path, fields) is None
    path = save_real_statistics(tmp_path, fields, source.real_statistics())
    assert path == tmp_path / f"{protocol_key(fields)}.pt"

    restored = FrechetVideoDistance(RandomConvFeatures())
    cached = load_real_statistics(tmp_path, fields)
    restored.set_real_statistics(**cached)
    restored.update(fake, real=False)
    assert float(restored.compute()) == pytest.approx(float(source.compute()), rel=1e-12)
    restored.update(real, real=True)  # must not write into the cached tensors
    assert int(cached["n"]) == 20 and int(restored.real_n) == 40

    # A file whose recorded protocol differs from its name is refused, not silently used.
    other = fields | {"seed": 2}
    path.rename(tmp_path / f"{protocol_key(other)}.pt")
    with pytest.raises(ValueError, match="another protocol"):
        load_real_statistics(tmp_path, other)


def test_fvd_needs_num_features_and_clip_features():
    with pytest.raises(TypeError, match="num_features"):
        FrechetVideoDistance(nn.Identity())
    with pytest.raises(ValueError, match="per-frame"):
        FrechetVideoDistance(EvaluatorFeatures(VideoAttributeClassifier(ATTRIBUTES, width=4), per_frame=True))


def test_protocol_key_changes_with_every_field():
    base = {
        "feature_net": "evaluator:clip:128d",
        "feature_sha256": "ab" * 32,
        "n_real": 512,
        "n_generated": 512,
        "num_frames": 8,
        "frame_stride": 1,
        "clip_start": "first",
        "resolution": 32,
        "real_split": "shapes/test",
        "seed": 0,
    }
    key = protocol_key(base)
    assert key == protocol_key(dict(reversed(list(base.items()))))  # order does not matter
    changed = {
        "feature_net": "x", "feature_sha256": "cd" * 32, "n_real": 2048, "n_generated": 2048, "num_frames": 16,
        "frame_stride": 2, "clip_start": "random", "resolution": 64, "real_split": "shapes/val", "seed": 1,
    }  # fmt: skip
    assert set(changed) == set(PROTOCOL_FIELDS)
    keys = {protocol_key(base | {name: value}) for name, value in changed.items()}
    assert len(keys) == len(PROTOCOL_FIELDS) and key not in keys
    with pytest.raises(ValueError, match="missing"):
        protocol_key({k: v for k, v in base.items() if k != "seed"})
    with pytest.raises(ValueError, match="unexpected"):
        protocol_key(base | {"batch_size": 8})


# --------------------------------------------------------------------------------------------- feature networks


def test_torchscript_features_equal_the_scripted_module(tmp_path):
    module = TinyVideoNet().eval()
    path = script(module, tmp_path / "tiny.pt")
    net = TorchScriptFeatures(path, resolution=16, call_kwargs={"return_features": True})
    clips = moving_squares(3)
    with torch.no_grad():
        assert torch.allclose(net(clips), module(clips, return_features=True), atol=1e-6)
    assert net.num_features == 8 and not net.per_frame
    assert not any(p.requires_grad for p in net.parameters())  # frozen, even inside a LightningModule
    assert net.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert net.id.startswith("torchscript:tiny.pt:")


def test_torchscript_features_apply_the_declared_protocol(tmp_path):
    path = script(ProbeNet(), tmp_path / "probe.pt")
    clips = moving_squares(2, frames=12, size=16)
    clips[:, :, :, 0, 0] = 1.5  # out of range, as a generated sample may be: clamped to 1 before mapping
    as_uint8_btchw = TorchScriptFeatures(
        path, resolution=24, num_frames=4, frame_stride=3, value_range=(0, 255), dtype="uint8", layout="BTCHW",
        call_kwargs={"return_features": True},
    )  # fmt: skip
    lo, hi, is_float, flag, t, c, h, w = as_uint8_btchw(clips)[0].tolist()
    assert (lo, hi, is_float, flag) == (0, 255, 0, 1)
    assert (t, c, h, w) == (4, 3, 24, 24)

    as_float_bcthw = TorchScriptFeatures(path, resolution=8, num_frames=5, value_range=(-1, 1))
    lo, hi, is_float, flag, c, t, h, w = as_float_bcthw(clips)[0].tolist()
    assert is_float == 1 and flag == 0 and (c, t, h, w) == (3, 5, 8, 8)
    assert -1 <= lo < hi <= 1
    with pytest.raises(ValueError, match="at least 13 frames"):
        TorchScriptFeatures(path, resolution=8, num_frames=5, frame_stride=3, num_features=8)(clips)

    # Non-square frames: short side resized to the resolution, then centre-cropped.
    wide = torch.zeros(1, 3, 2, 16, 32)
    assert as_float_bcthw.num_features == 8
    assert TorchScriptFeatures(path, resolution=8)(wide)[0, -2:].tolist() == [8, 8]


def test_torchscript_per_frame_network_feeds_frame_fid(tmp_path):
    path = script(TinyImageNet(), tmp_path / "img.pt")
    frame_net = TorchScriptFeatures(path, resolution=16, value_range=(0, 255), layout="NCHW")
    clips = moving_squares(4, frames=3)
    assert frame_net.per_frame and frame_net(clips).shape == (12, 6)
    fid = FrameFID(frame_net)
    fid.update(clips, real=True)
    fid.update(clips, real=False)
    assert abs(float(fid.compute())) < 1e-3
    with pytest.raises(ValueError, match="num_frames must be null"):
        TorchScriptFeatures(path, resolution=16, num_frames=4, layout="NCHW")


def test_missing_torchscript_fails_clearly(tmp_path):
    missing = tmp_path / "weights" / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError) as err:
        TorchScriptFeatures(missing, resolution=224, num_frames=16)
    message = str(err.value)
    assert str(missing) in message and "I3D" in message and "16 frames" in message and "224x224" in message
    with pytest.raises(FileNotFoundError, match="my_net.pt"):
        TorchScriptFeatures(tmp_path / "my_net.pt", resolution=32)


def test_evaluator_features_identity_and_frozen_mode():
    classifier = VideoAttributeClassifier(ATTRIBUTES, width=4, feature_dim=12)
    clip_net, frame_net = EvaluatorFeatures(classifier), EvaluatorFeatures(classifier, per_frame=True)
    clips = moving_squares(2, frames=8)
    assert clip_net(clips).shape == (2, 12) and frame_net(clips).shape == (16, 12)
    assert clip_net.id == "evaluator:clip:12d" and frame_net.id == "evaluator:frame:12d"
    assert clip_net.sha256 == frame_net.sha256 and len(clip_net.sha256) == 64
    clip_net.train()
    assert not classifier.training  # BatchNorm statistics must not move during evaluation
    other = VideoAttributeClassifier(ATTRIBUTES, width=4, feature_dim=12)
    assert EvaluatorFeatures(other).sha256 != clip_net.sha256


def test_frame_fid_agrees_with_frechet_distance_and_kid_runs():
    frame_net = EvaluatorFeatures(VideoAttributeClassifier(ATTRIBUTES, width=4, feature_dim=8), per_frame=True)
    real, fake = moving_squares(6, frames=4, seed=0), moving_squares(6, frames=4, seed=1) * 0.5
    fid = FrameFID(frame_net)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        f_real, f_fake = frame_net(real).double().numpy(), frame_net(fake).double().numpy()
    expected = frechet_distance(
        f_real.mean(0), np.cov(f_real, rowvar=False), f_fake.mean(0), np.cov(f_fake, rowvar=False)
    )
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-3)

    assert FrameKID(frame_net, n_real_frames=24, n_fake_frames=24, max_subset_size=10).subset_size == 10
    kid = FrameKID(frame_net, n_real_frames=24, n_fake_frames=24, subsets=5)
    assert kid.subset_size == 24
    kid.update(real, real=True)
    kid.update(fake, real=False)
    out = kid.compute()
    assert math.isfinite(float(out["kid"])) and float(out["kid_std"]) >= 0


def test_kid_subset_size_adapts():
    assert kid_subset_size(5000, 3000) == 1000
    assert kid_subset_size(300, 800) == 300
    assert kid_subset_size(64, 50) == 50
    with pytest.raises(ValueError, match="at least 2"):
        kid_subset_size(1, 100)


def test_metrics_configs_build_their_feature_networks(tmp_path):
    evaluator_cfg = OmegaConf.load(CONF / "evaluator.yaml")
    clip_net, frame_net = build_feature_networks(evaluator_cfg, VideoAttributeClassifier(ATTRIBUTES, width=4))
    assert not clip_net.per_frame and frame_net.per_frame
    with pytest.raises(ValueError, match="trained evaluator"):
        build_feature_networks(evaluator_cfg)

    ts_cfg = OmegaConf.load(CONF / "torchscript.yaml")
    ts_cfg.fvd.path = str(script(TinyVideoNet(), tmp_path / "video.pt"))
    ts_cfg.fid.path = str(script(TinyImageNet(), tmp_path / "image.pt"))
    ts_cfg.fvd.resolution = 16  # keep the test fast; the shipped protocol is 224
    clip_net, frame_net = build_feature_networks(ts_cfg)
    assert clip_net.num_features == 8 and frame_net.num_features == 6
    assert clip_net(moving_squares(1, frames=16, size=16)).shape == (1, 8)
    with pytest.raises(ValueError, match=r"unknown metrics.features 'inception'; registered: \['evaluator', 'i3d', 'torchscript'\]"):
        build_feature_networks({"features": "inception"})


# --------------------------------------------------------------------------------------------- alignment


def test_attribute_accuracy_on_a_hand_made_example():
    # Six clips, two attributes: colour (3 classes, given as logits) and direction (2 classes, given as ids).
    labels = torch.tensor([[0, 0], [1, 1], [2, 0], [0, 1], [1, 0], [0, 0]])
    unseen = torch.tensor([False, False, False, False, True, True])
    colour_pred = torch.tensor([0, 1, 1, 0, 1, 2])  # right, right, wrong, right | right, wrong
    direction_pred = torch.tensor([0, 0, 0, 0, 0, 0])  # a "broken" evaluator: always class 0
    report = attribute_accuracy(
        {"colour": torch.eye(3)[colour_pred] * 5.0, "direction": direction_pred},
        labels,
        unseen,
        ["colour", "direction"],
        num_classes={"direction": 2},
    )
    assert report["overall"]["n"] == 6 and report["seen"]["n"] == 4 and report["unseen"]["n"] == 2
    assert report["seen"]["acc"] == {"colour": 3 / 4, "direction": 2 / 4, "all": 1 / 4}
    assert report["unseen"]["acc"] == {"colour": 1 / 2, "direction": 2 / 2, "all": 1 / 2}
    assert report["overall"]["acc"]["all"] == pytest.approx(2 / 6)
    assert report["chance_uniform"] == {"colour": 1 / 3, "direction": 1 / 2, "all": 1 / 6}
    # Majority chance: colour 0 is 3/6 of the labels; direction 0 is 4/6; the tuple (0, 0) is 2/6.
    assert report["overall"]["chance_majority"] == pytest.approx({"colour": 3 / 6, "direction": 4 / 6, "all": 2 / 6})
    assert report["confusion"]["colour"] == [[2, 0, 1], [0, 2, 0], [0, 1, 0]]
    assert report["confusion"]["direction"] == [[4, 0], [2, 0]]
    # The constant direction predictor shows as zero prediction entropy against non-zero label entropy.
    direction = report["predictions"]["direction"]
    assert direction["distribution"] == [1.0, 0.0] and direction["entropy"] == 0.0
    binary_entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2)  # labels: 4 vs 2 of 6
    assert direction["label_entropy"] == pytest.approx(binary_entropy)
    assert direction["mean_softmax_entropy"] is None
    colour = report["predictions"]["colour"]
    assert colour["distribution"] == pytest.approx([2 / 6, 3 / 6, 1 / 6])
    assert 0 < colour["mean_softmax_entropy"] < 0.1  # confident logits


def test_attribute_accuracy_empty_subset_and_bad_inputs():
    labels = torch.tensor([[0], [1]])
    report = attribute_accuracy({"size": torch.tensor([0, 1])}, labels, torch.zeros(2, dtype=torch.bool), ["size"],
                                num_classes={"size": 2})  # fmt: skip
    assert report["seen"]["acc"]["all"] == 1.0
    assert report["unseen"]["n"] == 0 and math.isnan(report["unseen"]["acc"]["size"])
    with pytest.raises(ValueError, match="num_classes"):
        attribute_accuracy({"size": torch.tensor([0, 1])}, labels, torch.zeros(2, dtype=torch.bool), ["size"])
    with pytest.raises(ValueError, match=r"labels must be \(N, 2\)"):
        attribute_accuracy({}, labels, torch.zeros(2, dtype=torch.bool), ["size", "shape"])


# A metric defined and registered outside the package: one class here plus one YAML line (`extra: [...]`).

@register("test_brightness")
class Brightness(Metric):
    """Mean pixel value of the generated clips (a toy; "brighter is better" so that the name rule would be wrong)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, video: torch.Tensor, real: bool) -> None:
        if not real:
            self.total += video.double().sum()
            self.count += video.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def test_a_metric_registered_outside_the_package(tmp_path):
    import pandas as pd

    from sorabench.config import ConfigError, compose_config
    from sorabench.metrics.evaluate import check_metrics_config, evaluate_videos
    from sorabench.report.stats import metric_direction

    # the evaluator metrics config with one line changed, in a config dir of its own (hydra.searchpath)
    (tmp_path / "metrics").mkdir()
    text = (CONF / "evaluator.yaml").read_text()
    assert text.count("\nextra: []") == 1
    (tmp_path / "metrics" / "bright.yaml").write_text(text.replace("\nextra: []", "\nextra: [test_brightness]"))
    cfg = compose_config("evaluate", [f"hydra.searchpath=[file://{tmp_path}]", "metrics=bright"])
    check_metrics_config(cfg)

    fake = [torch.full((2, 3, 8, 32, 32), 0.5), torch.full((2, 3, 8, 32, 32), -0.5)]
    real = [torch.zeros(2, 3, 8, 32, 32)]
    out, ranked = evaluate_videos(fake, real, cfg.metrics, (None, None), None, {}, None, None)  # no FVD/FID net
    assert out == {"eval/test_brightness": pytest.approx(0.0)} and ranked == {"test_brightness": True}
    out, _ = evaluate_videos(fake[:1], real, cfg.metrics, (None, None), None, {}, None, None)
    assert out == {"eval/test_brightness": pytest.approx(0.5)}

    # the report ranks by the flag the evaluation logs beside it, not by the metric's name
    runs = pd.DataFrame({"eval/test_brightness": [0.5], "tags.eval.higher_is_better.test_brightness": ["True"]})
    assert metric_direction("eval/test_brightness", runs=runs) == "maximize"
    assert metric_direction("eval/test_brightness") == "minimize"  # without the flag: the name rule

    with pytest.raises(ConfigError, match="not a registered metric"):
        check_metrics_config(compose_config("evaluate", ["metrics.extra=[nope]"]))
    assert METRICS["test_brightness"] is Brightness
    with pytest.raises(ValueError, match="already registered"):
        register("test_brightness")(Brightness)
