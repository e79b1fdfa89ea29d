import pytest
import torch

from sorabench.latents import LatentDataset, cache_key, cache_path, load_or_encode
from sorabench.training.vae_module import VAEModule

DATA = {"name": "shapes", "split_sizes": {"train": 8, "val": 4}, "batch_size": 4}


@pytest.fixture
def vae_ckpt(tmp_path):
    module = VAEModule(vae={"factor": "causal", "spatial_factor": 4, "base_channels": 8})
    module.scale_factor.fill_(0.5)
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return module, path


def test_cache_key_changes_with_data_config_checkpoint_and_split(vae_ckpt, tmp_path):
    _, path = vae_ckpt
    key = cache_key(path, DATA, "train")
    assert cache_key(path, {**DATA, "batch_size": 64}, "train") == key  # loader settings do not change latents
    assert cache_key(path, {**DATA, "num_frames": 16}, "train") != key
    assert cache_key(path, DATA, "val") != key
    other = tmp_path / "other.ckpt"
    other.write_bytes(path.read_bytes() + b"x")
    assert cache_key(other, DATA, "train") != key


def test_cache_is_written_once_and_reused(vae_ckpt, tmp_path):
    module, path = vae_ckpt
    cache = load_or_encode(module, path, DATA, "train", tmp_path / "cache")
    assert cache["mean"].shape == (8, 4, 8, 8, 8) and len(cache["captions"]) == 8 and cache["scale_factor"] == 0.5
    file = cache_path(tmp_path / "cache", cache_key(path, DATA, "train"))
    mtime = file.stat().st_mtime_ns
    again = load_or_encode(module, path, DATA, "train", tmp_path / "cache")
    assert file.stat().st_mtime_ns == mtime and torch.equal(again["mean"], cache["mean"])
    item = LatentDataset(cache, sample_posterior=False)[0]
    assert torch.allclose(item["latent"], cache["mean"][0] * 0.5) and item["caption"] == cache["captions"][0]


def test_a_cache_holding_another_key_is_refused(vae_ckpt, tmp_path):
    module, path = vae_ckpt
    cache = load_or_encode(module, path, DATA, "train", tmp_path / "cache")
    file = cache_path(tmp_path / "cache", cache_key(path, DATA, "train"))
    torch.save({**cache, "key": "something-else"}, file)
    with pytest.raises(ValueError, match="expected"):
        load_or_encode(module, path, DATA, "train", tmp_path / "cache")
