"""The Fréchet distance between two Gaussians, the number behind FID and FVD.

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½)

computed in float64 with `scipy.linalg.sqrtm`, following pytorch-fid's numerics: when Σ₁Σ₂ is near-singular (few
samples, dead feature dimensions) the square root is not finite, and the standard remedy is to retry with ε·I added to
both covariances; rounding can leave a tiny imaginary part in the square root, which is dropped once checked to be
negligible.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

# pytorch-fid's tolerance on the imaginary part of the diagonal of (Σ₁Σ₂)^½: more than this means the product
# has materially negative eigenvalues, i.e. one "covariance" is not positive semi-definite.
_IMAGINARY_ATOL = 1e-3


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means (D,), covariances (D, D).

    Raises ValueError on mismatched shapes and when the square root keeps a non-negligible imaginary part.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes disagree: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAGINARY_ATOL):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary component of {worst:.3g}; "
                "are both covariances positive semi-definite?"
            )
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
