"""Tests of the evaluator network and its LightningModule, on tiny clips rendered here."""

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from sorabench.models.evaluator import VideoAttributeClassifier
from sorabench.training.evaluator_module import EvaluatorModule

TINY_ATTRIBUTES = {"colour": 3, "direction": 4}
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])  # red, green, blue in [-1, 1]
STEPS = torch.tensor([[0, -1], [0, 1], [-1, 0], [1, 0]])  # (dy, dx) per frame: left, right, up, down


def render_squares(n: int, seed: int, frames: int = 8, size: int = 16) -> dict:
    """A batch dict of n clips: a 4x4 square of one of 3 colours moving 1 pixel per frame in one of 4 directions."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(3, (n,), generator=g), torch.randint(4, (n,), generator=g)], dim=1)
    video = -torch.ones(n, 3, frames, size, size)
    travel = frames - 1
    for i in range(n):
        dy, dx = STEPS[labels[i, 1]].tolist()
        # Start where the whole path stays inside the frame.
        y0, x0 = (int(torch.randint(0, size - 4 - travel * abs(d) + 1, (1,), generator=g)) for d in (dy, dx))
        y0, x0 = (y0 + travel if dy < 0 else y0), (x0 + travel if dx < 0 else x0)
        for t in range(frames):
            y, x = y0 + dy * t, x0 + dx * t
            video[i, :, t, y : y + 4, x : x + 4] = COLOURS[labels[i, 0]].view(3, 1, 1)
    return {"video": video, "labels": labels, "unseen": torch.zeros(n, dtype=torch.bool), "caption": [""] * n}


def loader(batch: dict, batch_size: int, shuffle: bool = False) -> torch.utils.data.DataLoader:
    items = [{"video": v, "labels": y} for v, y in zip(batch["video"], batch["labels"])]
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle)


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_classifier_shapes_for_8_and_16_frames_and_single_frames():
    net = VideoAttributeClassifier({"colour": 6, "shape": 3, "size": 2, "direction": 4, "speed": 2}, width=8)
    for frames in (8, 16):
        video = torch.randn(2, 3, frames, 32, 32)
        logits = net(video)
        assert {k: tuple(v.shape) for k, v in logits.items()} == {
            "colour": (2, 6), "shape": (2, 3), "size": (2, 2), "direction": (2, 4), "speed": (2, 2)
        }  # fmt: skip
        assert net.features(video).shape == (2, 128)
        assert net.frame_features(video).shape == (2 * frames, 128)


def test_frame_features_do_not_depend_on_neighbouring_frames():
    net = VideoAttributeClassifier(TINY_ATTRIBUTES, width=4).eval()
    clips = render_squares(2, seed=0)["video"]
    shuffled = clips[:, :, torch.randperm(8)]
    with torch.no_grad():
        a, b = net.frame_features(clips).view(2, 8, -1), net.frame_features(shuffled).view(2, 8, -1)
    assert torch.allclose(a.sort(1).values, b.sort(1).values, atol=1e-5)


def test_fast_dev_run_logs_the_expected_keys():
    data = render_squares(8, seed=0)
    module = EvaluatorModule(TINY_ATTRIBUTES, width=4)
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(module, loader(data, 4), loader(data, 4))
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "val/loss", "val/acc/colour", "val/acc/direction", "val/acc/all"} <= logged


def test_learns_a_tiny_synthetic_task_and_reloads_from_checkpoint(tmp_path):
    L.seed_everything(0)
    train, held_out = render_squares(384, seed=1), render_squares(128, seed=2)
    module = EvaluatorModule(TINY_ATTRIBUTES, width=8, feature_dim=32, lr=1e-2, warmup_steps=5)
    trainer = quiet_trainer(max_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(train, 32, shuffle=True))
    metrics = trainer.validate(module, loader(held_out, 128), verbose=False)[0]
    assert metrics["val/acc/colour"] >= 0.95, metrics
    assert metrics["val/acc/direction"] >= 0.9, metrics

    path = tmp_path / "evaluator.ckpt"
    trainer.save_checkpoint(path)
    restored = EvaluatorModule.load_from_checkpoint(path).eval()
    assert restored.hparams.attributes == TINY_ATTRIBUTES
    module.eval()
    with torch.no_grad():
        assert torch.equal(restored.net.features(held_out["video"]), module.net.features(held_out["video"]))


def test_every_ablation_declares_the_instruments_floor():
    """The evaluator's accuracy at the ablations' budget is checked where it matters - in every ablation run, on the
    machine that runs it (`metrics.evaluator_min_accuracy`, below) - instead of by a ten-minute training here."""
    sweeps = Path(__file__).resolve().parents[1] / "conf" / "sweep"
    for name in ("conditioning_ablation", "conditioning_ablation_long", "binding_ablation", "binding_budget"):
        fixed = OmegaConf.load(sweeps / f"{name}.yaml").fixed
        floors = [float(o.split("=")[1]) for o in fixed if o.startswith("metrics.evaluator_min_accuracy=")]
        assert floors and floors[0] >= 0.95, name


def test_a_weak_evaluator_stops_the_run_with_one_line(tmp_path):
    """Trained for 2 steps, the evaluator reads some attribute below the floor: using it fails, naming the floor and
    the weakest attribute; without a floor it is used as before; a cached weak evaluator fails the same way."""
    from sorabench.config import ConfigError, compose_config
    from sorabench.training.evaluator_module import check_instrument, ensure_evaluator
    from tests.conftest import TINY

    cfg = compose_config("train", [f"outputs={tmp_path}", *TINY, "metrics.evaluator.max_steps=2",
                                   "mlflow.enabled=false"], command="train")
    assert ensure_evaluator(cfg).is_file()  # no floor: used
    cfg.metrics.evaluator_min_accuracy = 0.99
    for _ in range(2):  # found cached the second time: checked again
        with pytest.raises(ConfigError, match=r"metrics.evaluator_min_accuracy=0.99: .* reads held-out test clips at"):
            ensure_evaluator(cfg)
    # `train` checks the floor before the DiT trains: no DiT checkpoint is written
    from sorabench.training.dit_run import train

    with pytest.raises(ConfigError, match="evaluator_min_accuracy"):
        train(cfg)
    assert not list((tmp_path / "train").rglob("*.ckpt"))
    strong = {"accuracy": {"test": {"colour": 1.0, "shape": 0.97, "all": 0.9}}}
    check_instrument(strong, 0.95, "x")  # "all" is not an attribute: not held to the floor
    with pytest.raises(ConfigError, match="shape 0.970"):
        check_instrument(strong, 0.98, "x")


def test_a_feature_evaluator_is_a_second_network_trained_apart(tmp_path):
    """`metrics.feature_evaluator`: FVD/FID/KID read a second evaluator (another seed, wider data), not the accuracy
    instrument; it trains once, reports its accuracy on the run's own data too, and leaves the instrument's cache
    where it was. A typo'd setting or data key fails in one line before anything trains."""
    from sorabench.config import ConfigError, compose_config, config_key, to_container
    from sorabench.data.module import clip_fields
    from sorabench.files import state_dict_sha256
    from sorabench.metrics.evaluate import check_metrics_config, feature_evaluator
    from sorabench.metrics.features import build_feature_networks
    from sorabench.training.evaluator_module import ensure_evaluator, load_evaluator
    from sorabench.training.runs import finished_result
    from tests.conftest import TINY

    cfg = compose_config("train", [f"outputs={tmp_path}", *TINY, "metrics.evaluator.max_steps=2",
                                   "mlflow.enabled=false"], command="train")
    instrument = ensure_evaluator(cfg)
    # the key without the empty `data: {}`: the instrument's cache of earlier versions is found, not retrained
    old_key = {k: v for k, v in to_container(cfg.metrics.evaluator).items() if k != "data"}
    assert f"auto-{config_key(clip_fields(to_container(cfg.data)), old_key)}" in str(instrument)
    assert feature_evaluator(cfg, "the instrument") == "the instrument"  # unset: FVD reads the instrument

    # as a user writes it on the command line (a null block replaced by a dict)
    cfg = compose_config("train", [f"outputs={tmp_path}", *TINY, "metrics.evaluator.max_steps=2", "mlflow.enabled=false",
                                   "metrics.feature_evaluator={seed: 1, data: {position_range: 1.0}}"], command="train")
    check_metrics_config(cfg)
    features = ensure_evaluator(cfg, "feature_evaluator")
    assert features != instrument and ensure_evaluator(cfg) == instrument
    result = next(finished_result(p) for p in features.parents if finished_result(p))
    assert set(result["accuracy"]) == {"test", "target"}  # its own (wider) test clips and the run's
    net = feature_evaluator(cfg, load_evaluator(instrument).net)
    assert state_dict_sha256(net) != state_dict_sha256(load_evaluator(instrument).net)
    video_net, frame_net = build_feature_networks(to_container(cfg.metrics), net)
    assert video_net.id.startswith("feature_evaluator:clip") and frame_net.id.startswith("feature_evaluator:frame")
    assert video_net.sha256 == state_dict_sha256(load_evaluator(features).net)

    for key, value, named in (("feature_evaluator", {"seedd": 1}, "metrics.feature_evaluator"),
                              ("feature_evaluator", {"data": {"position_rang": 1.0}}, "metrics.evaluator.data")):
        cfg.metrics[key] = value
        with pytest.raises(ConfigError, match=named) as err:
            check_metrics_config(cfg)
        assert "\n" not in str(err.value)
    cfg = compose_config("train", [f"outputs={tmp_path}", *TINY, "metrics.evaluator.data={position_rang: 1.0}"],
                         command="train")
    with pytest.raises(ConfigError, match=r"metrics.evaluator.data=.*position_rang"):
        check_metrics_config(cfg)
