"""`trainer.precision: auto` and the bf16 plugin: what auto picks from what the CPU is and measures, and that bf16
trains with the project's fused AdamW and gradient clipping (which Lightning's own plugin refuses)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from sorabench import precision as P


def test_explicit_precision_is_kept_and_a_gpu_gets_bf16(monkeypatch):
    assert P.resolve("32-true", "cpu") == P.Resolved("32-true", "set in the config")
    assert P.resolve("bf16-mixed", "cpu").precision == "bf16-mixed"
    assert P.resolve("auto", "gpu").precision == "bf16-mixed"


@pytest.mark.parametrize("flags, speedup, expected", [
    ([], None, "32-true"),  # no native bf16: no calibration at all
    (["avx512_bf16"], 0.52, "32-true"),  # the flag, but bf16 slower than fp32 (avx512_bf16 without AMX)
    (["avx512_bf16", "amx_bf16"], 1.2, "32-true"),  # AMX: the step only 1.2x (measured so on one)
    (["avx512_bf16", "amx_bf16"], 4.0, "bf16-mixed"),
])
def test_auto_on_a_cpu_needs_the_flag_and_a_measured_speedup(monkeypatch, flags, speedup, expected):
    def calibrate():
        assert speedup is not None, "calibrated although the CPU has no bf16 flag"
        return speedup

    monkeypatch.setattr(P, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(P, "cpu_bf16_speedup", calibrate)
    resolved = P.resolve("auto", "cpu")
    assert resolved.precision == expected
    assert ("no native bf16" in resolved.reason) == (not flags)
    if speedup is not None:
        assert f"{speedup:.2f}x" in resolved.reason


def test_calibration_measures_a_positive_ratio():
    ratio = P.cpu_bf16_speedup.__wrapped__(seconds=0.1)  # its cost is benchmark 15's to show, not a unit test's
    assert 0.01 < ratio < 100


def test_cpu_bf16_attention_runs_in_fp32_and_returns_bf16():
    from sorabench.models.layers import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 32, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention(q, k, v, mask), ref)  # fp32: exactly SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    # Computed from the bf16-rounded inputs in fp32: within bf16's rounding of the fp32 result.
    exact = torch.nn.functional.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(),
                                                             v.bfloat16().float(), attn_mask=mask)
    assert torch.equal(out, exact.bfloat16())


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        self.dtypes, self.norms, self.clipped = set(), [], []

    def training_step(self, batch, _):
        out = self.net(batch[0])
        self.dtypes.add(out.dtype)
        return (out.float() - batch[1]).pow(2).mean() * 1e3  # large gradients: clipping has work to do

    def grad_norm(self) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.parameters()])))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.norms.append(self.grad_norm())
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.clipped.append(self.grad_norm())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 8, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def fit(plugin):
    model = Tiny()
    trainer = L.Trainer(max_steps=3, plugins=[plugin], gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)
    return model


def test_bf16_plugin_trains_with_fused_adamw_and_clips():
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(MixedPrecision("bf16-mixed", "cpu"))  # Lightning's own plugin: the failure BF16Mixed fixes
    model = fit(P.BF16Mixed("cpu"))
    assert model.dtypes == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert min(model.norms) > 1.0 and max(model.clipped) <= 1.0 + 1e-4  # clipped to the trainer's 1.0
    precision, plugins = P.trainer_precision("bf16-mixed", "cpu")
    assert precision is None and isinstance(plugins[0], P.BF16Mixed)
    assert P.trainer_precision("32-true", "cpu") == ("32-true", [])


def test_autocast_outside_a_trainer():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with P.autocast("bf16-mixed", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with P.autocast("32-true", "cpu"):
        assert (x @ w).dtype == torch.float32

