"""The ablation's measuring instrument: reference points (real clips, the VAE's ceiling, noise)."""

import torch

from sorabench.data.shapes import ATTRIBUTE_NAMES, ATTRIBUTES
from sorabench.metrics.evaluate import reference_points


class MeanColourReader(torch.nn.Module):
    """A stand-in evaluator: 'colour' is class 1 when the clip's mean is above 0, else class 0; every other
    attribute is always class 0."""

    def forward(self, video):
        bright = (video.mean(dim=(1, 2, 3, 4)) > 0).long()
        out = {}
        for name in ATTRIBUTE_NAMES:
            k = len(ATTRIBUTES[name])
            cls = bright if name == "colour" else torch.zeros_like(bright)
            out[name] = torch.nn.functional.one_hot(cls, k).float()
        return out


class DarkeningVAE(torch.nn.Module):
    """Reconstructs every clip 1.5 darker (clamped): bright clips with mean below 1.5 come back dark."""

    def __init__(self):
        super().__init__()
        self.vae = self
        self.p = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return z - 1.5


def test_reference_points_read_real_reconstructed_and_noise_clips():
    n = 8
    level = torch.tensor([0.9, 0.9, 0.9, 0.9, -0.5, -0.5, -0.5, -0.5])  # half bright, half dark
    real = level.view(n, 1, 1, 1, 1).expand(n, 3, 4, 8, 8).clone()
    labels = torch.zeros(n, len(ATTRIBUTE_NAMES), dtype=torch.long)
    labels[:, 0] = (level > 0).long()  # the prompts' colours are what the real clips show
    unseen = torch.zeros(n, dtype=torch.bool)
    batches = [real[:3], real[3:]]  # streamed in batches
    out = reference_points(MeanColourReader(), iter(batches), labels, unseen, DarkeningVAE())
    assert out["eval/real_acc_colour"] == 1.0 and out["eval/real_acc_all"] == 1.0
    # The VAE loses the bright clips: the ceiling on colour (and so on all attributes) is the dark half.
    assert out["eval/ceiling_acc_colour"] == 0.5 and out["eval/ceiling_acc_all"] == 0.5
    assert out["eval/ceiling_acc_shape"] == 1.0
    assert 0.0 <= out["eval/noise_acc_colour"] <= 1.0
    without_vae = reference_points(MeanColourReader(), iter(batches), labels, unseen)
    assert "eval/ceiling_acc_all" not in without_vae and without_vae["eval/real_acc_all"] == 1.0
