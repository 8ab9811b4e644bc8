"""The frozen base as loaded: its storage dtype and quantization, and undoing the hooks that make backward reach it.

A user fine-tuning an LLM loads the base in half precision (`dtype=torch.bfloat16`) or 4-bit (QLoRA:
`BitsAndBytesConfig(load_in_4bit=True)` then peft's `prepare_model_for_kbit_training`). Snake trains on either as it
is; what it must undo is `prepare_model_for_kbit_training`'s input-grad hook (`enable_input_require_grads`, which makes
the embedding output require grad) and its activation checkpointing: with them, every frozen block below the active
group builds a graph, so backward runs through the whole prefix and Snake's memory saving is lost (docs/pitfalls.md).
[`release_input_grads`] removes both; `recompute_above_group` is Snake's replacement for the checkpointing.

A leaf module (torch and transformers only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["BaseWeights", "base_weights", "release_input_grads"]

# The names of the forward hooks transformers' `enable_input_require_grads` and peft's fallback register.
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@dataclass(frozen=True)
class BaseWeights:
    """How a model's weights are stored.

    Args:
        dtype (`str`): the floating-point dtype of most weight elements (e.g. `"bfloat16"`), as `torch` names it; for a
            quantized base the dtype of its unquantized tensors (norms, embeddings).
        quantization (`str`, *optional*): `"4bit"`, `"8bit"` (bitsandbytes) or another quantizer's name; `None` when
            the weights are plain tensors.
        weight_bytes (`int`): bytes of every parameter and buffer as stored (tied tensors once; a 4-bit weight as its
            packed bytes).
    """

    dtype: str
    quantization: str | None
    weight_bytes: int

    @property
    def label(self) -> str:
        """`"bfloat16"`, or `"4bit (bfloat16 rest)"` for a quantized base."""
        return self.dtype if self.quantization is None else f"{self.quantization} ({self.dtype} rest)"


def _quantization(model: nn.Module) -> str | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(config, "load_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False) or getattr(config, "load_in_8bit", False):
        return "8bit"
    method = getattr(model, "quantization_method", None) or getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) if method else None


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _quantization_constants(tensor: torch.Tensor) -> int:
    """Bytes of a bitsandbytes 4-bit weight's constants (per-block scales, nested scales and their code book)."""
    state = getattr(tensor, "quant_state", None)
    total = 0
    while state is not None:
        total += sum(t.nbytes for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None)
        state = getattr(state, "state2", None)
    return total


def base_weights(model: nn.Module) -> BaseWeights:
    """How `model`'s weights are stored: dtype, quantization and bytes (a `PeftModel` is read through to its base).

    Example:
        ```python
        >>> base_weights(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)).dtype
        'bfloat16'
        ```
    """
    base = _base_model(model)
    counts: dict[torch.dtype, int] = {}
    seen, total = set(), 0
    for tensor in (*base.parameters(), *base.buffers()):
        key = (id(tensor),) if tensor.is_meta else (tensor.data_ptr(), tensor.nbytes)  # offloaded: no storage
        if key in seen:
            continue
        seen.add(key)
        total += tensor.nbytes + _quantization_constants(tensor)
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return BaseWeights(str(dtype).removeprefix("torch."), _quantization(base), total)


def release_input_grads(model: nn.Module) -> list[str]:
    """Removes what makes backward run through the frozen blocks below the active group; returns what it removed.

    `enable_input_require_grads()` (called by peft's `prepare_model_for_kbit_training`, by `PeftModel` on a model with
    activation checkpointing on, and by `Trainer`'s `gradient_checkpointing`) hooks the input embeddings so that
    their output requires grad: every frozen block then builds a graph and stores activations. Activation
    checkpointing on the blocks (`prepare_model_for_kbit_training`'s default) recomputes every block, the frozen ones
    included. Both are removed, with a warning; `recompute_above_group=True` recomputes only the blocks above the
    group.

    Args:
        model (`nn.Module`): the model (possibly a `PeftModel`).

    Returns:
        `list[str]`: `"input_require_grads"` and/or `"activation_checkpointing"`, as found.

    Example:
        ```python
        >>> model = prepare_model_for_kbit_training(model)  # QLoRA: hooks the embeddings, checkpoints every block
        >>> release_input_grads(model)
        ['input_require_grads', 'activation_checkpointing']
        ```
    """
    removed = []
    for module in model.modules():
        if getattr(module, "_require_grads_hooks", None):
            module.disable_input_require_grads()
            removed.append("input_require_grads")
        # A second enable_input_require_grads() (e.g. PeftModel's, after the user's) overwrites the handles of the
        # first, whose hooks stay registered: find them by function name. Checked on transformers 5.23-5.24 and peft
        # 0.21 (its fallback for models without enable_input_require_grads); `_forward_hooks` is torch's (2.13).
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                del module._forward_hooks[key]
                removed.append("input_require_grads")
    removed = sorted(set(removed))
    modules = list(model.modules())
    if any(getattr(m, "gradient_checkpointing", False) is True for m in modules):
        base = _base_model(model)
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
        removed.append("activation_checkpointing")
    if removed:
        logger.warning(
            f"Removed {' and '.join(removed)} from the model (set by peft's prepare_model_for_kbit_training, or "
            "enable_input_require_grads / gradient_checkpointing_enable): they make backward run through every "
            "frozen block below the active group. Use recompute_above_group=True to recompute the blocks above it."
        )
    return removed
