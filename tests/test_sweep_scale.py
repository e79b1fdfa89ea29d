"""Sweeps that scale: shared assets under concurrent writers, growing studies, distinct search trials,
interrupts, DDP trials. Fast tests here; end-to-end ones are marked slow."""

import threading
import time

import pytest
import torch

import sorabench.latents as latents


def test_concurrent_writers_of_one_latent_cache_all_succeed(tmp_path, monkeypatch):
    """Two sweep workers encoding the same split at once: both must get the cache, neither may crash (a fixed
    `<key>.pt.tmp` made one worker's rename fail with FileNotFoundError)."""
    barrier = threading.Barrier(4)

    def fake_encode(vae, data_cfg, split):
        barrier.wait()  # every writer finishes encoding at the same moment
        return {"mean": torch.zeros(2, 3), "captions": ["a", "b"]}

    monkeypatch.setattr(latents, "encode_split", fake_encode)
    monkeypatch.setattr(latents, "cache_key", lambda *a: "k")
    errors, results = [], []

    def work():
        try:
            results.append(latents.load_or_encode(None, "vae.ckpt", {}, "train", tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and torch.load(latents.cache_path(tmp_path, "k"), weights_only=True)["key"] == "k"
    assert [p.name for p in (tmp_path / "latents").iterdir()] == ["k.pt"]  # no temporary file left behind
