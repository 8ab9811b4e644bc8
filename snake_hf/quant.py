"""Block quantization of adapter deltas with error feedback (`payload_dtype="int8"` / `"int4"`).

A leaf module (torch only). A tensor travels as its delta against a base version the receiver holds, cut into blocks
of `block` consecutive values (row-major); each block carries one float16 scale `s = absmax / qmax` (rounded *up* to
float16, so no value is clipped) and one signed integer code per value, `round(x / s)` in `[-qmax, qmax]`:

| scheme | qmax | block | bytes per value | vs float32 |
| --- | ---: | ---: | ---: | ---: |
| `int8` | 127 | 128 | 1 + 2/128 = 1.016 | 0.254 |
| `int4` | 7 | 64 | 0.5 + 2/64 = 0.531 | 0.133 |

int4 codes are stored as `code + 8` (1..15) in nibbles, two per byte, low nibble first; the nibble 0 and the int8
code -128 are never written, so a receiver refuses them. **Error bound**: every dequantized value is within `s / 2`
of the value quantized (`|x - s * round(x / s)| <= s / 2` and `|x| / s <= qmax`), where `s` is its block's stored
scale, `absmax / qmax <= s <= absmax / qmax * (1 + 2**-10) + 2**-24` (one float16 step up at most).

**Error feedback** ([`quantize_step`]): the sender adds the residual it kept from its last delta of the part to the
next one, and keeps the new residual `r' = (trained + r) - sent`. Over a node's stages `k = 1..K` on a part,
`sum_k (sent_k - start_k) + r_K = sum_k (trained_k - start_k)` (with `r_0 = 0`): what was not sent is never lost,
only late; the identity holds exactly in real arithmetic, and in float32 up to the rounding of those additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


__all__ = [
    "QUANTIZED_SCHEMES",
    "QuantizedTensor",
    "apply_delta",
    "dequantize",
    "quantize",
    "quantize_step",
    "quantized_nbytes",
]


@dataclass(frozen=True)
class _Scheme:
    qmax: int
    block: int
    bits: int


_SCHEMES = {"int8": _Scheme(qmax=127, block=128, bits=8), "int4": _Scheme(qmax=7, block=64, bits=4)}
# The `payload_dtype` values whose floating-point tensors travel as block-quantized deltas.
QUANTIZED_SCHEMES = tuple(_SCHEMES)
_SCALE_DTYPE = torch.float16


@dataclass
class QuantizedTensor:
    """One tensor's quantized delta: packed codes (uint8 bytes) and one float16 scale per block.

    Args:
        codes (`torch.Tensor`): uint8, `int8`: one byte per value (two's complement); `int4`: two values per byte.
        scales (`torch.Tensor`): float16, one per block.
        shape (`tuple[int, ...]`): the shape of the tensor the delta belongs to.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_bytes(self) -> torch.Tensor:
        """Codes then scales, as one flat uint8 tensor (what the wire carries)."""
        return torch.cat([self.codes.reshape(-1), self.scales.reshape(-1).view(torch.uint8)])

    @classmethod
    def from_bytes(cls, data: torch.Tensor, shape: tuple[int, ...], scheme: str) -> QuantizedTensor:
        """Splits wire bytes into codes and scales, and checks them (raises `ValueError` naming what is wrong)."""
        spec, numel = _SCHEMES[scheme], math.prod(shape)
        codes_nbytes, blocks = _codes_nbytes(numel, spec), _blocks(numel, spec)
        if data.numel() != codes_nbytes + 2 * blocks:
            raise ValueError(
                f"{data.numel()} bytes for a {scheme} tensor of {numel} values; expected {codes_nbytes + 2 * blocks} "
                "(values truncated or padded)"
            )
        codes, scales = data[:codes_nbytes].clone(), data[codes_nbytes:].clone().view(_SCALE_DTYPE)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError(f"{scheme} scales must be finite and >= 0 (corrupted scales)")
        if spec.bits == 8 and bool((codes == 0x80).any()):
            raise ValueError("int8 code -128 is never written (corrupted values)")
        if spec.bits == 4:
            nibbles = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)[:numel]
            if bool((nibbles == 0).any()):
                raise ValueError("int4 nibble 0 is never written (corrupted values)")
        return cls(codes, scales, tuple(shape))


def _blocks(numel: int, spec: _Scheme) -> int:
    return math.ceil(numel / spec.block)


def _codes_nbytes(numel: int, spec: _Scheme) -> int:
    return numel if spec.bits == 8 else math.ceil(numel / 2)


def quantized_nbytes(numel: int, scheme: str) -> int:
    """Wire bytes of a tensor of `numel` values in `scheme` (codes and scales).

    Example:
        ```python
        >>> quantized_nbytes(4096, "int8"), quantized_nbytes(4096, "int4")
        (4160, 2176)
        ```
    """
    spec = _SCHEMES[scheme]
    return _codes_nbytes(numel, spec) + 2 * _blocks(numel, spec)


def quantize(values: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Block-quantizes `values` (any float dtype, any shape; flattened row-major).

    Example:
        ```python
        >>> q = quantize(torch.linspace(-1, 1, 256), "int8")
        >>> (dequantize(q, "int8") - torch.linspace(-1, 1, 256)).abs().max() <= q.scales.max() / 2
        tensor(True)
        ```
    """
    spec = _SCHEMES[scheme]
    flat = values.detach().reshape(-1).to(torch.float32)
    numel, blocks = flat.numel(), _blocks(flat.numel(), spec)
    padded = torch.nn.functional.pad(flat, (0, blocks * spec.block - numel)).reshape(blocks, spec.block)
    exact = padded.abs().amax(dim=1) / spec.qmax
    scales = exact.clamp(max=torch.finfo(_SCALE_DTYPE).max).to(_SCALE_DTYPE)
    # Round up to the next float16 where rounding went down, so that |x| / scale <= qmax (no value is clipped).
    low = scales.to(torch.float32) < exact
    scales = torch.where(low, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    divisor = scales.to(torch.float32).unsqueeze(1)
    codes = torch.where(divisor > 0, torch.round(padded / divisor.clamp(min=1e-45)), torch.zeros_like(padded))
    codes = codes.clamp(-spec.qmax, spec.qmax).to(torch.int8).reshape(-1)[:numel]
    if spec.bits == 8:
        return QuantizedTensor(codes.view(torch.uint8), scales, tuple(values.shape))
    nibbles = (codes + 8).to(torch.uint8)
    if numel % 2:
        nibbles = torch.cat([nibbles, torch.full((1,), 8, dtype=torch.uint8)])
    pairs = nibbles.reshape(-1, 2)
    return QuantizedTensor(pairs[:, 0] | (pairs[:, 1] << 4), scales, tuple(values.shape))


def dequantize(quantized: QuantizedTensor, scheme: str) -> torch.Tensor:
    """The float32 values (in `quantized.shape`) that `quantized` stands for."""
    spec, numel = _SCHEMES[scheme], quantized.numel
    if spec.bits == 8:
        codes = quantized.codes.view(torch.int8)[:numel].to(torch.float32)
    else:
        nibbles = torch.stack([quantized.codes & 0x0F, quantized.codes >> 4], dim=1).reshape(-1)[:numel]
        codes = nibbles.to(torch.float32) - 8
    blocks = _blocks(numel, spec)
    codes = torch.nn.functional.pad(codes, (0, blocks * spec.block - numel)).reshape(blocks, spec.block)
    values = (codes * quantized.scales.to(torch.float32).unsqueeze(1)).reshape(-1)[:numel]
    return values.reshape(quantized.shape)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def apply_delta(base: torch.Tensor, quantized: QuantizedTensor, scheme: str) -> torch.Tensor:
    """`base + dequantized delta`, in the working precision, cast back to `base`'s dtype: the one operation that both
    the sender (making a version) and every receiver (reconstructing it) run, so both get the same bits."""
    work = _work_dtype(base.dtype)
    delta = dequantize(quantized, scheme).to(work).reshape(base.shape)
    return (base.detach().to(work) + delta).to(base.dtype)


def quantize_step(
    trained: torch.Tensor, base: torch.Tensor, residual: torch.Tensor | None, scheme: str
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """One error-feedback step: the delta `trained + residual - base`, quantized.

    Args:
        trained (`torch.Tensor`): the sender's true value after training.
        base (`torch.Tensor`): the value the receiver will add the delta to (bit-exactly what it holds).
        residual (`torch.Tensor`, *optional*): what the sender's last delta of this tensor did not carry (None: zero).
        scheme (`str`): `"int8"` or `"int4"`.

    Returns:
        `tuple[QuantizedTensor, torch.Tensor, torch.Tensor]`: the quantized delta, the value it reconstructs to
        ([`apply_delta`]; the sender's model takes it, so sender and receiver hold the same bits), and the new residual
        `trained + residual - value` (in the working precision, float32 for float32/bfloat16/float16 models).

    Example:
        ```python
        >>> q, value, residual = quantize_step(trained, base, None, "int4")
        >>> torch.allclose(value.float() + residual, trained.float())
        True
        ```
    """
    work = _work_dtype(trained.dtype)
    target = trained.detach().to(work) + (0 if residual is None else residual)
    quantized = quantize(target - base.detach().to(work), scheme)
    value = apply_delta(base, quantized, scheme)
    return quantized, value, target - value.to(work)
