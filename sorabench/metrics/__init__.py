"""Metrics: Fréchet distance, FVD, FID/KID on frames, feature networks, and text–video alignment."""

from sorabench.metrics.alignment import Alignment, alignment_from_logits, attribute_accuracy
from sorabench.metrics.features import (
    EvaluatorFeatures,
    FeatureNetwork,
    TorchScriptFeatures,
    build_feature_networks,
)
from sorabench.metrics.frechet import frechet_distance
from sorabench.metrics.fvd import (
    PROTOCOL_FIELDS,
    FrechetVideoDistance,
    FrameFID,
    FrameKID,
    clips_to_frames,
    kid_subset_size,
    load_real_statistics,
    protocol_key,
    save_real_statistics,
)

__all__ = [
    "PROTOCOL_FIELDS",
    "Alignment",
    "FrameFID",
    "FrameKID",
    "alignment_from_logits",
    "EvaluatorFeatures",
    "FeatureNetwork",
    "FrechetVideoDistance",
    "TorchScriptFeatures",
    "attribute_accuracy",
    "build_feature_networks",
    "clips_to_frames",
    "frechet_distance",
    "kid_subset_size",
    "load_real_statistics",
    "protocol_key",
    "save_real_statistics",
]
