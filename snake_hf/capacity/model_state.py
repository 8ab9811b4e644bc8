"""Model-state bytes per node, counted from the parts: weights as stored + gradients + optimizer state.

The first of the two memory numbers a user reads (the second is the measured peak, `snake_hf.memory.PeakMemory`):
no activations, no allocator, so it is exact and the same on every device. A Snake node holds the whole model in the
dtype it was loaded in (bfloat16, or 4-bit with bitsandbytes), but gradients and optimizer state only for the group
it trains; full fine-tuning holds them for every parameter. The paper's OPT-1.3B figure (19.37 GB -> 3.13 GB, 0.16)
is this count with a half-precision model and one of 24 decoder layers training with 14 bytes per parameter:
(2 + 14/24) / 16.

Conventions (torch 2.13): a gradient has its parameter's dtype; AdamW keeps two states per element in the
parameter's dtype. The full fine-tuning reference is 16 bytes per parameter, every parameter training in float32
with AdamW (4 + 4 + 8) — also what mixed precision with float32 master weights holds (2 + 2 + 4 + 8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..blocks import PartMap
from ..frozen_base import base_weights
from .estimate import _OPTIMIZER_STATES


__all__ = ["FULL_FINETUNE_BYTES_PER_PARAM", "ModelState", "full_finetune_state", "model_state", "snake_node_state"]

FULL_FINETUNE_BYTES_PER_PARAM = 16  # float32 weights + gradients + two AdamW states (or bf16 + fp32 master, mixed)


@dataclass(frozen=True)
class ModelState:
    """Model-state bytes of one node.

    Args:
        weights (`int`): every parameter and buffer as stored (tied tensors once; 4-bit weights packed, with their
            quantization constants).
        gradients (`int`): gradients of the tensors that train.
        optimizer_state (`int`): the optimizer's state for them.
    """

    weights: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    def ratio_to(self, reference: ModelState) -> float:
        """`self.total / reference.total` (e.g. a Snake node over full fine-tuning)."""
        return self.total / reference.total


def model_state(model: nn.Module, trainable: Iterable[str], optimizer: str = "adamw") -> ModelState:
    """Model-state bytes of `model` as stored, training the parameters named in `trainable`.

    Args:
        model (`nn.Module`): the model as loaded (a `PeftModel` in LoRA mode).
        trainable (`Iterable[str]`): names (as `model.named_parameters()` gives them) of the tensors that train.
        optimizer (`str`, defaults to `"adamw"`): `"adamw"`/`"adam"` (2 states per element), `"sgd_momentum"` (1),
            `"sgd"` (0).

    Example:
        ```python
        >>> state = model_state(model, [n for n, p in model.named_parameters() if p.requires_grad])
        >>> state.total
        ```
    """
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"`optimizer` ({optimizer!r}) must be one of {list(_OPTIMIZER_STATES)}.")
    named, names = dict(model.named_parameters()), set(trainable)
    unknown = names - set(named)
    if unknown:
        raise ValueError(f"`trainable` names tensors the model does not have: {sorted(unknown)[:3]}.")
    trained = sum(named[n].nbytes for n in names)
    return ModelState(base_weights(model).weight_bytes, trained, _OPTIMIZER_STATES[optimizer] * trained)


def snake_node_state(model: nn.Module, part_map: PartMap, optimizer: str = "adamw") -> ModelState:
    """The most model-state bytes a Snake node holds: the whole model as stored, and the gradients and optimizer state
    of its largest group (with the always-trainable tensors).

    Example:
        ```python
        >>> snake_node_state(trainer.model, trainer.part_map).ratio_to(full_finetune_state(trainer.model))
        ```
    """
    groups = range(part_map.groups.num_groups)
    return max((model_state(model, part_map.trainable_names(g), optimizer) for g in groups), key=lambda s: s.total)


def full_finetune_state(model: nn.Module) -> ModelState:
    """Full fine-tuning's model state for `model`'s parameters (pass it without adapters): every one trains in float32 with AdamW, 16 bytes each
    ([`FULL_FINETUNE_BYTES_PER_PARAM`]), whatever dtype `model` is loaded in (tied tensors once; a 4-bit weight counts
    its unpacked elements).

    Example:
        ```python
        >>> full_finetune_state(model).total / 2**30  # GiB
        ```
    """
    seen, numel = set(), 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        shape = getattr(getattr(param, "quant_state", None), "shape", None)  # bitsandbytes 4-bit: the original shape
        numel += shape.numel() if shape is not None else param.numel()
    return ModelState(4 * numel, 4 * numel, 8 * numel)
