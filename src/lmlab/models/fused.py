"""One matrix product for several linear layers that read the same input (inference only).

    fused = FusedLinears()
    y = fused(x, (attn.q, attn.k, attn.v))   # x (..., K) -> (..., N_q + N_k + N_v), or None

The layers stay what they are (their names, state-dict keys, LoRA targets and
conversions do not change); ``FusedLinears`` keeps a concatenated copy of their
weights, rows in the order given: layer i's outputs are columns
``sum(N_0..N_{i-1}) : sum(N_0..N_i)`` of ``y``. The copy is built on first use and
rebuilt when any weight is replaced or modified in place (its storage or its
version counter changes), so optimizer steps, ``load_state_dict`` and ``set_dtype``
are seen; an edit through ``.data`` (which bypasses the version counter) is not. It is used only without autograd (``torch.no_grad``/``inference_mode``) and
only for plain ``nn.Linear`` layers of one dtype, or :class:`QuantizedLinear`
layers of one scheme; for anything else (a LoRA-wrapped layer, mixed kinds)
the call returns None and the caller runs the layers one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.quantize import QuantizedLinear

__all__ = ["FusedLinears"]


def _sources(layer: nn.Module) -> tuple[torch.Tensor | None, ...] | None:
    """The tensors a layer's product reads, or None for a kind of layer that is not fused."""
    kind = type(layer)
    if kind is nn.Linear:
        return (layer.weight, layer.bias)
    if kind is QuantizedLinear:
        return (layer.qweight, layer.scales, getattr(layer, "zeros", None), layer.bias)
    return None


def _layer_key(layer: nn.Module) -> tuple | None:
    sources = _sources(layer)
    if sources is None:
        return None
    extra = (layer.bits, layer.group_size, layer.compute_dtype) if type(layer) is QuantizedLinear else ()
    return (type(layer), *extra, *(() if t is None else (t.data_ptr(), t._version, t.dtype) for t in sources))


def _concat_linear(layers: tuple[nn.Linear, ...]) -> nn.Linear:
    first = layers[0]
    fused = nn.Linear(first.in_features, sum(l.out_features for l in layers), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([l.weight.detach() for l in layers]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([l.bias.detach() for l in layers]), requires_grad=False)
    return fused


def _concat_quantized(layers: tuple[QuantizedLinear, ...]) -> QuantizedLinear:
    first = layers[0]
    fused = QuantizedLinear(first.in_features, sum(l.out_features for l in layers), first.bits, first.group_size,
                            first.bias is not None, first.compute_dtype)
    names = ["qweight", "scales"] + (["zeros"] if first.bits == 4 else [])
    for name in names:
        setattr(fused, name, torch.cat([getattr(l, name) for l in layers]))
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([l.bias.detach() for l in layers]), requires_grad=False)
    return fused


class FusedLinears:
    """Callable ``(x, layers) -> y or None``; see the module docstring. Not an ``nn.Module``:
    its copy is a cache, not part of the model's state."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._fused: nn.Module | None = None
        self._held: list[torch.Tensor] = []  # the source tensors: their addresses stay theirs while keyed

    def __call__(self, x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor | None:
        """x (..., K) -> (..., sum of the layers' outputs), or None where fusing does not apply."""
        if torch.is_grad_enabled():
            return None
        key = tuple(_layer_key(l) for l in layers)
        if key != self._key:
            self._fused = self._build(layers, key)
            self._key = key
            self._held = [t.detach() for l in layers for t in (_sources(l) or ()) if t is not None]
        if self._fused is None:
            return None
        if type(self._fused) is nn.Linear:
            return F.linear(x, self._fused.weight, self._fused.bias)
        return self._fused(x)

    @staticmethod
    def _build(layers: tuple[nn.Module, ...], key: tuple) -> nn.Module | None:
        if any(k is None for k in key) or len({type(l) for l in layers}) != 1:
            return None
        first = layers[0]
        if any(l.in_features != first.in_features or (l.bias is None) != (first.bias is None) for l in layers):
            return None
        if type(first) is nn.Linear:
            if len({(l.weight.dtype, l.weight.device) for l in layers}) != 1:
                return None
            return _concat_linear(layers)
        if len({(l.bits, l.group_size, l.compute_dtype, l.qweight.device) for l in layers}) != 1:
            return None
        return _concat_quantized(layers)
