import json

import numpy as np
import pytest
import torch

from sorabench.config import ConfigError
from sorabench.data.folder import DataError, FolderConfig, FolderDataset, collate_skipping
from sorabench.data.module import VideoDataModule, attribute_schema, dataset_config
from sorabench.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    TEMPLATES,
    ShapesConfig,
    caption_for,
    heldout_triples,
    make_split,
    parse_caption,
)
from sorabench.data.video_io import VideoReadError, read_frames, write_gif, write_video

SMALL = {"train": 64, "val": 32, "test": 32, "unseen": 16}


def small_cfg(**kw):
    return ShapesConfig(split_sizes=SMALL, **kw)


def test_shapes_is_deterministic_and_seed_dependent():
    a, b = make_split(small_cfg(), "train"), make_split(small_cfg(), "train")
    assert torch.equal(a.videos, b.videos) and a.captions == b.captions and torch.equal(a.labels, b.labels)
    c = make_split(small_cfg(seed=1), "train")
    assert not torch.equal(a.videos, c.videos)


def test_shapes_clip_format_and_content():
    s = make_split(small_cfg(num_frames=16, height=32, width=48), "val")
    assert s.videos.shape == (32, 3, 16, 32, 48) and s.videos.dtype == torch.uint8
    # the object's colour is present, and it moves between first and last frame
    first, last = s.videos[:, :, 0].float(), s.videos[:, :, -1].float()
    assert (first - last).abs().amax(dim=(1, 2, 3)).min() > 50
    # anti-aliased: edge pixels take intermediate values
    values = s.videos.unique()
    assert len(values) > 20


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
def test_every_template_caption_parses_back_to_its_labels(template, monkeypatch):
    import sorabench.data.shapes as shapes

    monkeypatch.setattr(shapes, "TEMPLATES", [TEMPLATES[template]])
    g = torch.Generator().manual_seed(template)
    sizes = [len(v) for v in ATTRIBUTES.values()]
    for _ in range(200):
        labels = torch.stack([torch.randint(k, (1,), generator=g) for k in sizes], dim=-1)
        caption = caption_for(labels, g)
        assert parse_caption(caption) == [dict(zip(ATTRIBUTE_NAMES, labels[0].tolist()))], caption


def _first_frame_centres(videos):
    """The object's centroid in frame 0 of each clip (black background), (n, 2) as (x, y) pixels."""
    w = videos[:, :, 0].float().amax(1)  # (n, H, W)
    ys, xs = torch.meshgrid(torch.arange(w.shape[1]) + 0.5, torch.arange(w.shape[2]) + 0.5, indexing="ij")
    return torch.stack([(w * xs).sum((1, 2)), (w * ys).sum((1, 2))], -1) / w.sum((1, 2))[:, None]


def test_position_range_narrows_where_objects_start():
    sizes = {"train": 512}
    spread = {}
    for r in (1.0, 0.25, 0.0):
        s = make_split(ShapesConfig(split_sizes=sizes, position_range=r), "train")
        centre = _first_frame_centres(s.videos)
        # clips of one (size, direction, speed) differ only in where they start (and the shape, +-1 px)
        same = (s.labels[:, 0, 2] == 1) & (s.labels[:, 0, 3] == 0) & (s.labels[:, 0, 4] == 0)  # large, left, slow
        spread[r] = (centre[same].amax(0) - centre[same].amin(0)).tolist()  # (x, y) extent in pixels
    assert spread[1.0][1] > 15  # uniform over the frame across the motion (32 px - 2 x radius 6 = 20 px)
    assert 3 < spread[0.25][1] < 0.25 * 20 + 2  # a quarter of it, centred
    assert spread[0.0][0] < 2 and spread[0.0][1] < 2  # one start per (size, direction, speed)
    with pytest.raises(ConfigError, match="data.position_range=1.5"):
        ShapesConfig(position_range=1.5)


def test_canonical_captions_change_the_words_not_the_clips():
    varied, canonical = make_split(small_cfg(), "train"), make_split(small_cfg(synonyms=False), "train")
    assert torch.equal(varied.videos, canonical.videos) and torch.equal(varied.labels, canonical.labels)
    assert varied.captions != canonical.captions
    words = {w for c in canonical.captions for w in c.split()}
    assert not words & {"disk", "ball", "box", "block", "little", "tiny", "big", "rising", "falling"}
    assert [parse_caption(c) for c in canonical.captions] == [parse_caption(c) for c in varied.captions]


def test_two_object_captions_are_joined_with_and():
    s = make_split(small_cfg(num_objects=2), "train")
    assert all(" and " in c for c in s.captions)
    parsed = sorted(parse_caption(s.captions[0]), key=lambda d: d["colour"])  # clauses come in random order
    assert parsed == sorted((dict(zip(ATTRIBUTE_NAMES, obj.tolist())) for obj in s.labels[0]),
                            key=lambda d: d["colour"])


def test_unseen_compositions_never_in_train_and_flagged_in_eval():
    cfg = ShapesConfig(split_sizes={"train": 2000, "val": 400, "unseen": 100})
    held = heldout_triples(cfg)
    assert 0 < held.sum() < held.numel()

    def is_held(labels):
        return held[labels[:, 0], labels[:, 1], labels[:, 3]]

    train = make_split(cfg, "train")
    assert not is_held(train.labels[:, 0]).any() and not train.unseen.any()
    val = make_split(cfg, "val")
    assert torch.equal(is_held(val.labels[:, 0]), val.unseen) and 0 < val.unseen.sum() < len(val.unseen)
    assert make_split(cfg, "unseen").unseen.all()


def test_dataset_config_rejects_unknown_field_and_bad_type():
    with pytest.raises(ConfigError, match="data.bogus"):
        dataset_config({"name": "shapes", "bogus": 1})
    with pytest.raises(ConfigError, match="data.num_frames"):
        dataset_config({"name": "shapes", "num_frames": "abc"})
    with pytest.raises(ConfigError, match="data.num_objects"):
        dataset_config({"name": "shapes", "num_objects": 4})


def test_datamodule_batches():
    dm = VideoDataModule({"name": "shapes", "split_sizes": SMALL, "batch_size": 8})
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (8, 3, 8, 32, 32)
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert batch["labels"].shape == (8, 5) and len(batch["caption"]) == 8 and batch["unseen"].dtype == torch.bool


# ---- folder dataset -------------------------------------------------------------------------------------------


def moving_square(t=12, h=40, w=56):
    video = -torch.ones(3, t, h, w)
    for i in range(t):
        video[0, i, 10:20, 2 + 3 * i : 12 + 3 * i] = 1.0
    return video


@pytest.fixture
def video_folder(tmp_path):
    write_video(tmp_path / "a.mp4", moving_square())
    (tmp_path / "sub").mkdir()
    write_gif(tmp_path / "sub" / "b.gif", moving_square())
    write_video(tmp_path / "short.mp4", moving_square(t=3))
    rows = [{"video": "a.mp4", "caption": "a red square moving right"}, {"video": "sub/b.gif", "caption": "gif"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def folder_cfg(root, **kw):
    return FolderConfig(root=str(root), num_frames=8, height=32, width=32, val_fraction=0.0, test_fraction=0.0, **kw)


def test_folder_reads_mp4_and_gif_resized_and_cropped(video_folder):
    ds = FolderDataset(folder_cfg(video_folder), "train", train=False)
    assert len(ds) == 2
    for item in (ds[0], ds[1]):
        v = item["video"]
        assert v.shape == (3, 8, 32, 32) and v.min() >= -1 and v.max() <= 1
        assert v[0].max() > 0.5  # the red square survived decoding
    assert {ds[0]["caption"], ds[1]["caption"]} == {"a red square moving right", "gif"}


def test_datasets_declare_their_label_schema(video_folder):
    # shapes: one labels column per attribute, in ATTRIBUTES order; folder: captions only, so no (fake) labels
    assert attribute_schema({"name": "shapes"}) == {name: len(values) for name, values in ATTRIBUTES.items()}
    assert attribute_schema({"name": "folder", "root": str(video_folder)}) == {}
    ds = FolderDataset(folder_cfg(video_folder), "train", train=False)
    assert ds[0]["labels"].shape == (0,) and collate_skipping([ds[0], ds[1]])["labels"].shape == (2, 0)


def test_folder_frame_stride_and_random_offset(video_folder):
    cfg = folder_cfg(video_folder, frame_stride=1)
    cfg.num_frames = 4
    ds = FolderDataset(cfg, "train", train=True)
    torch.manual_seed(0)
    offsets = {float(ds[0]["video"][0, 0].argmax()) for _ in range(10)}
    assert len(offsets) > 1  # training draws random temporal offsets

    def step_px(stride):  # how far the square moves between consecutive frames of a clip
        c = folder_cfg(video_folder, frame_stride=stride)
        c.num_frames = 4
        video = FolderDataset(c, "train", train=False)[0]["video"]
        red = (video[0] > 0).float()  # (T, H, W): the square
        cols = torch.arange(red.shape[-1], dtype=torch.float)
        x = (red.sum(1) * cols).sum(1) / red.sum((1, 2))  # centre of mass per frame
        return float((x[1:] - x[:-1]).mean())

    assert step_px(2) == pytest.approx(2 * step_px(1), rel=0.1) and step_px(1) > 1  # every 2nd frame: twice the step


def test_folder_csv_and_webvid_columns(tmp_path):
    write_video(tmp_path / "123.mp4", moving_square())
    (tmp_path / "meta.csv").write_text("videoid,name\n123,a red square\n")
    ds = FolderDataset(folder_cfg(tmp_path), "train")
    assert ds[0]["caption"] == "a red square"


def test_folder_bad_inputs_name_the_culprit(video_folder, tmp_path_factory):
    # caption entry for a missing file
    (video_folder / "captions.jsonl").write_text('{"video": "nope.mp4", "caption": "x"}\n')
    with pytest.raises(DataError, match="nope.mp4"):
        FolderDataset(folder_cfg(video_folder), "train")
    # missing caption field
    (video_folder / "captions.jsonl").write_text('{"video": "a.mp4"}\n')
    with pytest.raises(DataError, match="missing field 'caption'"):
        FolderDataset(folder_cfg(video_folder), "train")
    # too short
    (video_folder / "captions.jsonl").write_text('{"video": "short.mp4", "caption": "x"}\n')
    ds = FolderDataset(folder_cfg(video_folder), "train")
    with pytest.raises(VideoReadError, match="short.mp4"):
        ds[0]
    # corrupt / truncated
    data = (video_folder / "a.mp4").read_bytes()
    (video_folder / "trunc.mp4").write_bytes(data[: len(data) // 3])
    (video_folder / "captions.jsonl").write_text('{"video": "trunc.mp4", "caption": "x"}\n')
    with pytest.raises(DataError, match="trunc.mp4: unreadable"):  # caught when the dataset is built
        FolderDataset(folder_cfg(video_folder), "train")
    # empty folder
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="no video files"):
        FolderDataset(folder_cfg(empty), "train")


def test_folder_skip_mode_counts_bad_samples(video_folder):
    (video_folder / "captions.jsonl").write_text(
        '{"video": "a.mp4", "caption": "ok"}\n{"video": "short.mp4", "caption": "x"}\n'
        '{"video": "missing.mp4", "caption": "y"}\n'
    )
    ds = FolderDataset(folder_cfg(video_folder, on_error="skip"), "train")
    assert len(ds.skipped) == 1 and "missing.mp4" in ds.skipped[0]
    batch = collate_skipping([ds[0], ds[1]])
    assert batch["video"].shape[0] == 1 and len(batch["skipped"]) == 1 and "short.mp4" in batch["skipped"][0]


def test_video_io_round_trip(tmp_path):
    v = moving_square()
    write_video(tmp_path / "x.mp4", v)
    frames, fps = read_frames(tmp_path / "x.mp4")
    assert frames.shape == (12, 40, 56, 3) and fps == 8
    decoded = torch.from_numpy(np.asarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert (decoded - v).abs().mean() < 0.05


def test_a_dataset_registered_outside_the_package(tmp_path):
    """Adding a dataset = one module (tests/toy_dataset.py, imported here, registers `toy`) + one YAML, here in a
    config dir of its own that `hydra.searchpath` adds to the package's."""
    from sorabench.config import compose_config
    from sorabench.data.module import build_dataset, clip_fields
    from sorabench.training.evaluator_module import EvaluatorModule
    from tests.toy_dataset import ToyDataset

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy.yaml").write_text("name: toy\nnum_frames: 4\nheight: 16\nwidth: 16\nsize: 6\n"
                                                 "batch_size: 4\nnum_workers: 0\n")
    # no conf/metrics/default_for_toy.yaml: a new labelled dataset is scored by the evaluator trained on its labels
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "data=toy", "data.batch_size=4"]
    cfg = compose_config("train", overrides)
    assert cfg.metrics.features == "evaluator"
    assert compose_config("train", [*overrides, "metrics=i3d"]).metrics.features == "i3d"  # a choice is kept
    data = dict(cfg.data)
    assert isinstance(build_dataset(data, "val"), ToyDataset) and len(build_dataset(data, "val")) == 6
    assert "content" not in clip_fields(data)  # the config defines its clips
    assert attribute_schema(data) == {"colour": 2, "trend": 2}

    batch = next(iter(VideoDataModule(data).train_dataloader()))
    assert batch["video"].shape == (4, 3, 4, 16, 16) and batch["labels"].shape == (4, 2)
    evaluator = EvaluatorModule(attributes=attribute_schema(data))  # one head per attribute of the schema
    logits = evaluator(batch["video"])
    assert {name: out.shape[1] for name, out in logits.items()} == {"colour": 2, "trend": 2}
    assert torch.isfinite(evaluator._loss(logits, batch["labels"]))

    with pytest.raises(ConfigError, match="toy_typo"):
        build_dataset({"name": "toy_typo"}, "val")


FORKED_LOADER = """
import sys
from sorabench.data.module import VideoDataModule
if __name__ == "__main__":
    cfg = {"name": "folder", "root": sys.argv[1], "num_frames": 8, "height": 32, "width": 32, "val_fraction": 0.0,
           "test_fraction": 0.0, "batch_size": 2, "num_workers": 2}
    dm = VideoDataModule(cfg)
    train = dm.dataset("train")
    train[0]  # decoded in the parent first, as a run does (probe, real statistics, a preview)
    loader = dm.train_dataloader()
    print(loader.multiprocessing_context.get_start_method(), sum(len(b["caption"]) for b in loader))
"""


def test_folder_loader_workers_do_not_hang_after_the_parent_decoded(tmp_path):
    """data=folder's default num_workers=2: workers forked from a process that has decoded with PyAV deadlocked (3 of
    3 runs, 60 s timeout, before the fix); they now fork from a clean server process and read every clip."""
    import subprocess
    import sys

    for i in range(6):
        write_video(tmp_path / f"c{i}.mp4", moving_square())
    rows = [{"video": f"c{i}.mp4", "caption": f"clip {i}"} for i in range(6)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    script = tmp_path / "load.py"
    script.write_text(FORKED_LOADER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["forkserver", "6"]
