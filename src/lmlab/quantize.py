"""Inference precision: float dtypes and weight-only integer quantization, for any model.

Every ``nn.Linear`` of a model (any neural family, or the wrapped module of an
``hf:`` model) can be replaced by a :class:`QuantizedLinear` that stores its
weight as group-wise integer codes::

    quantize_model(model, bits=8)             # int8, one scale per output row (symmetric)
    quantize_model(model, bits=4)             # int4, groups of 32 inputs, a scale and an offset each
    set_dtype(model, torch.bfloat16)          # activations and float weights in bfloat16
    prepare_model(model, dtype="bfloat16", quantize="int4")   # both, from plain strings

The formats (``K`` inputs, ``N`` outputs, groups of ``G`` inputs):

- int8: ``w = q * scale``, ``q`` in [-127, 127] (int8, (N, K)), ``scale`` (N, K/G)
  float32 = max|w| of the group / 127. Default ``G = K`` (per row).
- int4: ``w = (q - 8) * scale + zero``, ``q`` in [0, 15] packed two to a byte
  (uint8, (N, K/2), even input in the low nibble), ``scale`` = (max - min) / 15 and
  ``zero`` = min + 8 * scale, both (N, K/G) float32 (the form of Q4_1 blocks and of
  PyTorch's int4 CPU kernel). Default ``G = 32``.

On the CPU the matrix products run in PyTorch's own packed-weight kernels
(``torch._weight_int8pack_mm`` for per-row int8, ``aten._weight_int4pack_mm_for_cpu``
for int4 in groups of 32, 64, 128 or 256), elsewhere through the de-quantized weight; both compute ``x @ w.T``
for the same ``w``. Embeddings, norms and recurrent cells stay in floating point.

A quantized model saves and loads like any other (``save_model``/``load_model``):
the codes and scales go in ``model.safetensors`` and ``config.json`` records the
scheme under ``"quantization"`` (bits, group size, the replaced modules).
The float32 path without quantization is unchanged and stays the default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DTYPES",
    "QUANTIZE_CHOICES",
    "QuantizedLinear",
    "parse_dtype",
    "quantize_model",
    "quantize_output",
    "apply_quantization_layout",
    "set_dtype",
    "prepare_model",
    "model_dtype",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE_CHOICES: dict[str, int] = {"int8": 8, "int4": 4}
ACTIVATION_CHOICES = ("float", "int8")  # QuantizedLinear: activations as they come, or quantized per row
OUTPUT_CHOICES: dict[str, str] = {"int8": "float", "int8-dynamic": "int8"}  # quantize_output scheme -> activations
DEFAULT_GROUP_SIZE = {8: None, 4: 32}  # None: one group per row


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' (or a torch dtype among them) -> torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype {name!r} is not supported; accepted: {', '.join(DTYPES)}")


def _parse_bits(quantize: str | int) -> int:
    if isinstance(quantize, str) and quantize in QUANTIZE_CHOICES:
        return QUANTIZE_CHOICES[quantize]
    if isinstance(quantize, int) and not isinstance(quantize, bool) and quantize in QUANTIZE_CHOICES.values():
        return quantize
    raise ValueError(f"quantization {quantize!r} is not supported; accepted: {', '.join(QUANTIZE_CHOICES)} (or bits 8, 4)")


# ---------------------------------------------------------------- codes


def _quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """w (N, K) float -> the stored tensors of the format (see the module docstring)."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    if bits == 8:
        scale = (g.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8).reshape(N, K)
        return {"qweight": q, "scales": scale}
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return {"qweight": _pack_nibbles(q), "scales": scale, "zeros": lo + 8 * scale}


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, K/2) uint8, even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """A linear layer ``y = x @ w.T + b`` whose weight is stored as ``bits``-bit codes.

    x (..., K) -> y (..., N). Buffers: ``qweight`` (int8 (N, K) or packed uint8
    (N, K/2)), ``scales`` and for int4 ``zeros`` (N, K/G) float32; ``bias`` (N,)
    stays floating point. ``compute_dtype`` is the dtype of activations and output.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 bias: bool, compute_dtype: torch.dtype = torch.float32, activations: str = "float") -> None:
        super().__init__()
        bits = _parse_bits(bits)
        group_size = in_features if group_size is None else int(group_size)
        if group_size <= 0 or in_features % group_size or (bits == 4 and group_size % 2):
            raise ValueError(
                f"group size {group_size} does not divide the {in_features} inputs of the layer"
                + (" into even groups" if bits == 4 else "")
                + "; accepted: a divisor of the layer's input width"
            )
        if activations not in ACTIVATION_CHOICES:
            raise ValueError(f"activations={activations!r} is not supported; accepted: {', '.join(ACTIVATION_CHOICES)}")
        if activations == "int8" and (bits != 8 or group_size != in_features):
            raise ValueError(f"int8 activations need 8-bit codes with one scale per row, not {bits}-bit codes "
                             f"in groups of {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        self.activations = activations
        groups = in_features // group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("zeros", torch.zeros(out_features, groups))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None
        self._kernel_cache: dict[tuple, tuple] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None) -> "QuantizedLinear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, w.dtype)
        with torch.no_grad():
            for name, t in _quantize_weight(w, q.bits, q.group_size).items():
                getattr(q, name).copy_(t)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q.to(w.device)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel_cache.clear()  # new codes: the packed kernel weights are stale
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float32: the weight the codes stand for."""
        N, K, G = self.out_features, self.in_features, self.group_size
        if self.bits == 8:
            q = self.qweight.float().reshape(N, K // G, G)
            return (q * self.scales[..., None]).reshape(N, K)
        q = _unpack_nibbles(self.qweight).float().reshape(N, K // G, G)
        return ((q - 8) * self.scales[..., None] + self.zeros[..., None]).reshape(N, K)

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized weight (N, K) in ``compute_dtype`` (for code that reads a layer's
        weight, e.g. its dtype or device; the forward pass does not build it on the CPU)."""
        return self.dequantized_weight().to(self.compute_dtype)

    def _kernel_operands(self, dtype: torch.dtype) -> tuple | None:
        """The packed weight and scales of PyTorch's CPU kernel for activations of ``dtype``,
        built once (and looked up once per call: a decoding step makes hundreds); None where
        no kernel applies (then the de-quantized weight is used)."""
        key = (dtype, self.activations, self.qweight.data_ptr())
        ops = self._kernel_cache.get(key, _UNBUILT)
        if ops is _UNBUILT:
            ops = self._kernel_cache[key] = self._build_kernel_operands(dtype)
        return ops

    def _build_kernel_operands(self, dtype: torch.dtype) -> tuple | None:
        if self.qweight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        if self.activations == "int8":
            return _fbgemm_weight(self.qweight, self.scales[:, 0])
        if self.bits == 8 and self.group_size != self.in_features:
            return None  # the int8 kernel has one scale per row
        if self.bits == 4 and (self.group_size not in (32, 64, 128, 256) or self.out_features % 16):
            return None  # the int4 kernel takes these group sizes and multiples of 16 outputs
        if self.bits == 8:
            return self.qweight, self.scales[:, 0].to(dtype).contiguous()
        codes = _unpack_nibbles(self.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return packed, torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        ops = self._kernel_operands(x2.dtype) if x2.shape[0] > 0 else None
        if self.activations == "int8":
            y = self._int8_activation_product(x2, ops)
        elif ops is None:
            y = x2 @ self.dequantized_weight().to(x2.dtype).t()
        elif self.bits == 8:
            y = torch._weight_int8pack_mm(x2.contiguous(), ops[0], ops[1])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), ops[0], self.group_size, ops[1])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _int8_activation_product(self, x2: torch.Tensor, ops: tuple | None) -> torch.Tensor:
        """x2 (M, K) -> (M, N): each row of x quantized on its own to 7-bit unsigned codes (an
        affine scale and zero point from the row's min and max, FBGEMM's dynamic scheme), multiplied
        with the int8 codes in integers and scaled back. One kernel call per row, so that a row's
        result never depends on the other rows of the batch (scoring equals decoding)."""
        x32 = x2.float()
        if ops is None:
            return _int8_rows_emulated(x32, self.qweight, self.scales[:, 0]).to(x2.dtype)
        rows = [torch.ops.quantized.linear_dynamic(x32[i:i + 1], ops[0], True) for i in range(x32.shape[0])]
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).to(x2.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
                + (f", activations={self.activations}" if self.activations != "float" else ""))


_UNBUILT = object()


def _fbgemm_weight(codes: torch.Tensor, scales: torch.Tensor) -> tuple | None:
    """int8 codes (N, K) with one scale per row (N,) as FBGEMM's packed weight for its dynamic
    int8 product (``torch.ops.quantized.linear_dynamic``); None where PyTorch has no FBGEMM engine."""
    import warnings

    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in PyTorch; the packing is kept
            weight = torch._make_per_channel_quantized_tensor(
                codes, scales.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)
            return (torch.ops.quantized.linear_prepack(weight, None),)
    except (RuntimeError, AttributeError):  # a PyTorch without the quantized operators
        return None


def _int8_rows_emulated(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 -> (M, N): the int8-activation product of ``QuantizedLinear`` in plain
    tensor operations (FBGEMM's scheme per row: codes 0..127 over [min(x, 0), max(x, 0)]); the
    integer sums stay below 2**24, so float32 holds them exactly."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 127
    step = torch.where(step > 0, step, torch.full_like(step, 0.1))
    zero = torch.round(-lo / step).clamp(0, 127)
    xq = (torch.round(x / step) + zero).clamp(0, 127) - zero
    return (xq @ codes.float().t()) * step * scales


# ---------------------------------------------------------------- models


def _float_module(model: nn.Module) -> nn.Module:
    """The module that holds the weights: an ``hf:`` model's wrapped transformers module."""
    return getattr(model, "hf", model)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_model(model: nn.Module, bits: int | str, group_size: int | None = None,
                   output_layer: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`QuantizedLinear` (in place; returns
    ``model``). ``bits``: 8 | 4 (or 'int8' | 'int4'); ``group_size``: inputs per scale
    (default: a whole row for int8, 32 for int4); ``output_layer=False`` leaves the output layer
    float (for :func:`quantize_output`). Records the scheme in ``model.quantization``."""
    bits = _parse_bits(bits)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['bits']}-bit); quantize a float model")
    group_size = DEFAULT_GROUP_SIZE[bits] if group_size is None else int(group_size)
    root = _float_module(model)
    skip = None if output_layer else _output_layer_name(root)
    linears = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear) and name != skip]
    if not linears:
        raise ValueError(
            f"the {getattr(model, 'family', type(model).__name__)} model has no linear layers to quantize; "
            "accepted: models with nn.Linear layers (transformer, mlp, context-average, rnn/gru/lstm, hf:)"
        )
    for name, linear in linears:
        if group_size is not None and linear.in_features % group_size:
            raise ValueError(
                f"group size {group_size} does not divide the {linear.in_features} inputs of layer {name!r}; "
                f"accepted: a divisor of every layer's input width"
            )
    for name, linear in linears:
        _set_submodule(root, name, QuantizedLinear.from_linear(linear, bits, group_size))
    model.quantization = {"bits": bits, "group_size": group_size, "modules": [name for name, _ in linears]}
    return model


def _output_layer_name(root: nn.Module) -> str | None:
    """The name of the layer that maps hidden vectors to logits: a Hugging Face model's output
    embeddings, else an lmlab model's ``lm_head`` (transformer, mlp, context average) or ``decoder``."""
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in root.named_modules():
        if (head is not None and module is head) or (head is None and name in ("lm_head", "decoder")):
            return name
    return None


def quantize_output(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """The output layer (hidden vectors -> logits, the largest product of a decoding step of a small
    vocabulary-heavy model) as 8-bit codes, one scale per row. ``scheme``: 'int8' (weight-only, the
    activations stay float) or 'int8-dynamic' (int8 activations too: each input row quantized on its
    own and multiplied in integers, FBGEMM's dynamic kernel on an x86 CPU; faster, less exact).
    In place; returns ``model``. The model must already be quantized (:func:`quantize_model`, or a
    GGUF file's 4-bit layers); a float output layer is quantized from its weight (a tied embedding
    keeps its float weight: lookups stay exact), an 8-bit per-row one keeps its codes. Recorded in
    ``model.quantization["output"]``."""
    if scheme not in OUTPUT_CHOICES:
        raise ValueError(f"output quantization {scheme!r} is not supported; accepted: {', '.join(OUTPUT_CHOICES)}")
    activations = OUTPUT_CHOICES[scheme]
    record = getattr(model, "quantization", None)
    if not record:
        raise ValueError("the output layer is quantized on top of quantized layers; quantize the model first "
                         "(int8 or int4)")
    root = _float_module(model)
    name = _output_layer_name(root)
    layer = root.get_submodule(name) if name is not None else None
    if isinstance(layer, QuantizedLinear) and layer.bits == 8 and layer.group_size == layer.in_features:
        layer.activations = activations
        layer._kernel_cache.clear()
    elif type(layer) is nn.Linear:
        q = QuantizedLinear.from_linear(layer, 8, None)
        q.activations = activations
        _set_submodule(root, name, q)
    else:
        raise ValueError(f"the output layer {name!r} is a {type(layer).__name__}; accepted: a linear layer "
                         "(float, or 8-bit with one scale per row)")
    record["output"] = {"module": name, "bits": 8, "activations": activations}
    return model


def apply_quantization_layout(model: nn.Module, record: dict) -> nn.Module:
    """Put empty :class:`QuantizedLinear` layers where ``record`` (a saved ``quantization``
    entry of config.json) says, so that ``load_state_dict`` can fill them. Returns ``model``."""
    try:
        bits, group_size, names = _parse_bits(record["bits"]), record["group_size"], list(record["modules"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"the quantization record {record!r} needs 'bits', 'group_size' and 'modules' ({e})") from None
    root = _float_module(model)
    for name in names:
        try:
            linear = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the quantization record names layer {name!r}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"the quantization record names {name!r}, a {type(linear).__name__}, not a linear layer")
        q = QuantizedLinear(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                            linear.weight.dtype)
        _set_submodule(root, name, q)
    model.quantization = {"bits": bits, "group_size": group_size, "modules": names}
    output = record.get("output")
    if output is not None:
        name = output.get("module") if isinstance(output, dict) else None
        layer = root.get_submodule(name) if name is not None and name == _output_layer_name(root) else None
        if isinstance(layer, nn.Linear):
            layer = QuantizedLinear(layer.in_features, layer.out_features, 8, None, layer.bias is not None,
                                    layer.weight.dtype)
            _set_submodule(root, name, layer)
        activations = output.get("activations") if isinstance(output, dict) else None
        if not isinstance(layer, QuantizedLinear) or activations not in ACTIVATION_CHOICES \
                or output != {"module": name, "bits": 8, "activations": activations}:
            raise ValueError(f"the quantization record's output entry {output!r} does not fit the model; accepted: "
                             "{'module': <its output layer>, 'bits': 8, 'activations': 'float' or 'int8'}")
        if layer.bits != 8 or layer.group_size != layer.in_features:
            raise ValueError(f"the quantization record's output layer {name!r} has {layer.bits}-bit codes in groups "
                             f"of {layer.group_size}; accepted: 8-bit codes with one scale per row")
        layer.activations = activations
        model.quantization["output"] = dict(output)
    return model


def set_dtype(model: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    """Cast the floating-point weights and buffers of ``model`` to ``dtype`` in place (the
    activations follow); integer codes and their float32 scales stay as they are."""
    dtype = parse_dtype(dtype)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.compute_dtype = dtype
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)  # the same Parameter object: tied weights stay tied
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return module.compute_dtype
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def prepare_model(model: nn.Module, dtype: str | torch.dtype | None = None, quantize: str | int | None = None,
                  group_size: int | None = None, output: str | None = None) -> nn.Module:
    """Quantize (from the float weights), then the output layer (``output``: 'int8' | 'int8-dynamic',
    :func:`quantize_output`), then cast: what ``--quantize``, ``--quantize-output`` and ``--dtype`` do.
    None leaves that part as it is. Returns ``model``."""
    if dtype is not None:
        dtype = parse_dtype(dtype)
    if (dtype is not None or quantize is not None) and getattr(model, "family", None) == "ngram":
        raise ValueError(f"the {model.family} model counts tokens; it has no float weights for --dtype or --quantize")
    if quantize is not None:
        quantize_model(model, quantize, group_size, output_layer=output is None)
    if output is not None:
        quantize_output(model, output)
    if dtype is not None:
        set_dtype(model, dtype)
    return model
