"""Floating-point precision on the wire: which dtype each tensor travels in (`payload_dtype`), and rounding to it.

A leaf module (torch only): `SnakeConfig` validates `payload_dtype` against [`PAYLOAD_DTYPES`] without importing the
engine, and the engine encodes payloads with [`wire_dtype`].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


__all__ = [
    "PAYLOAD_DTYPES",
    "QUANTIZED_PAYLOAD_DTYPES",
    "dtype_by_name",
    "dtype_name",
    "is_quantized",
    "round_to_wire",
    "wire_dtype",
]

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


# Schemes whose floating-point tensors travel as block-quantized deltas with error feedback (`snake_hf.quant`).
QUANTIZED_PAYLOAD_DTYPES = ("int8", "int4")
# The values `SnakeConfig.payload_dtype` accepts: the widest floating-point dtype a payload carries, or a quantized
# delta scheme.
PAYLOAD_DTYPES = ("float32", "bfloat16", "float16", *QUANTIZED_PAYLOAD_DTYPES)


def is_quantized(payload_dtype: str) -> bool:
    """Whether `payload_dtype` sends block-quantized deltas (`"int8"`, `"int4"`) rather than cast tensors."""
    return payload_dtype in QUANTIZED_PAYLOAD_DTYPES


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `"float32"`."""
    return str(dtype).removeprefix("torch.")


def dtype_by_name(name: str) -> torch.dtype:
    """`"float32"` -> `torch.float32` (the dtypes a payload may carry)."""
    return _DTYPES[name]


def wire_dtype(dtype: torch.dtype, payload_dtype: str = "float32") -> torch.dtype:
    """The dtype a tensor of `dtype` travels in: `payload_dtype` for wider floating-point tensors, else its own.

    A tensor is never widened (a bfloat16 model's tensors stay bfloat16 under the float32 default), and integer or
    boolean tensors (e.g. batch-norm step counters) always travel as they are. Under a quantized scheme (`"int8"`,
    `"int4"`) a tensor that travels whole (not as a quantized delta) keeps its own dtype: such payloads are exact.

    Example:
        ```python
        >>> wire_dtype(torch.float32, "bfloat16"), wire_dtype(torch.int64, "bfloat16")
        (torch.bfloat16, torch.int64)
        ```
    """
    if is_quantized(payload_dtype):
        return dtype
    target = _DTYPES[payload_dtype]
    if dtype.is_floating_point and torch.finfo(dtype).bits > torch.finfo(target).bits:
        return target
    return dtype


def round_to_wire(tensors: Iterable[torch.Tensor], payload_dtype: str = "float32") -> None:
    """Rounds `tensors` in place to the values they take after a trip in `payload_dtype` and back (cast and back).

    Idempotent, and a no-op for the float32 default on a float32 (or narrower) model.

    Args:
        tensors (`Iterable[torch.Tensor]`): tensors to round in place (e.g. a part's parameters).
        payload_dtype (`str`, defaults to `"float32"`): one of [`PAYLOAD_DTYPES`].

    Example:
        ```python
        >>> weight = torch.tensor([1.0 + 2**-10])
        >>> round_to_wire([weight], "bfloat16"); weight
        tensor([1.])
        ```
    """
    with torch.no_grad():
        for tensor in tensors:
            target = wire_dtype(tensor.dtype, payload_dtype)
            if target != tensor.dtype:
                tensor.copy_(tensor.to(target))
