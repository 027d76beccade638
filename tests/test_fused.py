"""One product for q/k/v (and gate/up): lmlab.models.fused.FusedLinears and its use in the transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.models import build_model
from lmlab.models.fused import FusedLinears
from lmlab.quantize import QuantizedLinear, prepare_model, set_dtype

LLAMA = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, d_ff=96, norm="rmsnorm",
             positions="rotary", activation="swiglu", bias=False)
IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


def layers(bias: bool) -> tuple[nn.Linear, ...]:
    torch.manual_seed(0)
    return nn.Linear(64, 64, bias=bias), nn.Linear(64, 32, bias=bias), nn.Linear(64, 32, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("quantize", [None, 8, 4])
def test_fused_product_is_the_layers_side_by_side(bias, quantize):
    parts = layers(bias)
    if quantize:
        parts = tuple(QuantizedLinear.from_linear(p, quantize, 32 if quantize == 4 else None) for p in parts)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = FusedLinears()(x, parts)
        expected = torch.cat([p(x) for p in parts], dim=-1)
    assert y.shape == (3, 5, 128)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_the_fused_copy_follows_changes_of_the_weights():
    parts = layers(bias=True)
    fused, x = FusedLinears(), torch.randn(2, 64)
    with torch.no_grad():
        fused(x, parts)
        parts[1].weight.add_(1.0)                                         # an optimizer step: in place
        torch.testing.assert_close(fused(x, parts)[:, 64:96], parts[1](x))
        parts[2].load_state_dict({"weight": torch.randn(32, 64), "bias": torch.randn(32)})
        torch.testing.assert_close(fused(x, parts)[:, 96:], parts[2](x))
        for p in parts:
            set_dtype(p, "bfloat16")                                      # a new tensor per weight
        y = fused(x.bfloat16(), parts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.cat([p(x.bfloat16()) for p in parts], -1))


def test_not_fused_with_autograd_or_for_other_layers():
    parts = layers(bias=False)
    x = torch.randn(2, 64)
    assert FusedLinears()(x, parts) is None                       # gradients: the layers run one by one
    with torch.no_grad():
        assert FusedLinears()(x, (parts[0], nn.Sequential(parts[1]))) is None
        assert FusedLinears()(x, (parts[0], QuantizedLinear.from_linear(parts[1], 8, None))) is None
        assert FusedLinears()(x, (parts[0], nn.Linear(32, 8))) is None          # another input width


@pytest.mark.parametrize("precision", [dict(), dict(dtype="bfloat16", quantize="int4"), dict(quantize="int8")])
def test_transformer_inference_equals_its_unfused_forward(precision):
    torch.manual_seed(0)
    model = prepare_model(build_model("transformer", LLAMA).eval(), **precision)
    with torch.no_grad():
        fused, _ = model(IDS)
    unfused, _ = model(IDS)  # with autograd: q, k, v, gate and fc as separate layers
    torch.testing.assert_close(fused, unfused.detach(), atol=1e-4, rtol=1e-3)


def test_lora_layers_are_not_fused_away():
    from lmlab.finetune import LoraSettings, add_lora

    torch.manual_seed(0)
    model = build_model("transformer", LLAMA).eval()
    with torch.no_grad():
        base, _ = model(IDS)
    lora = add_lora(model, LoraSettings(target_modules=["q", "k", "v"])).eval()
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        adapted, _ = lora(IDS)
    expected, _ = lora(IDS)
    torch.testing.assert_close(adapted, expected.detach(), atol=1e-4, rtol=1e-3)
    assert not torch.allclose(adapted, base, atol=1e-2)  # the adapters change the logits
