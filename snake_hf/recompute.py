"""Recompute the blocks above the active group in backward instead of storing their activations.

During a stage, blocks below the active group are frozen and run without a graph; the group and the blocks above it
keep activations for backward. `set_recompute` wraps every block above the group in non-reentrant
`torch.utils.checkpoint`, so only each block's input is kept and its activations are recomputed in backward: the same
loss and gradients up to float rounding (the recomputed backward may run other kernels), less memory.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache
from transformers.utils import logging

from .blocks import BlockGroups, find_block_list


logger = logging.get_logger(__name__)


__all__ = ["set_recompute"]


def set_recompute(model: nn.Module, groups: BlockGroups, active_group: int | None) -> int:
    """Wraps every block above `active_group` in non-reentrant activation checkpointing; unwraps all others.

    A wrapped block keeps only its inputs during the forward and recomputes its activations in the backward, so the
    stored activations of the blocks above the group shrink to one hidden state per block. Values, gradients and the
    RNG stream are those of the plain forward (checkpoint replays the RNG state). Blocks below the group need nothing:
    they are frozen and build no graph. `active_group=None` unwraps every block. Outside training (eval mode or no grad) a
    wrapped block runs its plain forward; in training it runs without a KV cache (`use_cache=False`, with a warning
    once), as transformers' gradient checkpointing does, since the recompute would write the cache twice. Trainer's
    `gradient_checkpointing` is a different thing and must stay off: it makes the embedding outputs require grad, so
    backward would reach the bottom (docs/pitfalls.md, "Trainer").

    Args:
        model (`nn.Module`): the model (possibly PEFT-wrapped).
        groups (`BlockGroups`): the cut.
        active_group (`int`, *optional*): the group that trains; `None` unwraps everything.

    Returns:
        `int`: how many blocks are wrapped now.

    Example:
        ```python
        >>> set_recompute(model, groups, active_group=0)  # blocks of groups 1.. recompute in backward
        >>> set_recompute(model, groups, None)  # back to plain blocks
        ```
    """
    _, blocks = find_block_list(model, groups.path)
    first = groups.boundaries[active_group + 1] if active_group is not None else len(blocks)
    for index, block in enumerate(blocks):
        wrapped = "_snake_plain_forward" in block.__dict__
        if index >= first and not wrapped:
            block._snake_plain_forward = block.forward
            block.forward = types.MethodType(_recomputed_forward, block)  # a bound method: deepcopy rebinds it
        elif index < first and wrapped:
            block.forward = block.__dict__.pop("_snake_plain_forward")
            if block.forward == types.MethodType(type(block).forward, block):
                del block.forward  # it was the class's own forward: drop the instance attribute again
    return max(len(blocks) - first, 0)


def _recomputed_forward(self: nn.Module, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return self._snake_plain_forward(*args, **kwargs)
    # transformers' (private) mark of a layer that only reads its cache; checked on transformers 5.23-5.24
    if not getattr(self, "_can_checkpoint_with_cache", False):
        args, kwargs = _without_kv_cache(self, args, kwargs)
    return checkpoint(self._snake_plain_forward, *args, use_reentrant=False, **kwargs)


# Keyword names a block's KV cache goes by across architectures (a positional one is found by its type).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params")


def _without_kv_cache(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's arguments with its KV cache dropped and `use_cache` off, as transformers' `GradientCheckpointingLayer`
    does in training: the backward's recompute would write the cache a second time (doubled keys; with a padding mask,
    a size mismatch). Checked against transformers 5.23.0, whose GPT-2 passes the cache positionally."""
    dropped = [f"argument {i}" for i, value in enumerate(args) if isinstance(value, Cache)]
    dropped += [
        name
        for name, value in kwargs.items()
        if isinstance(value, Cache) or (name in _CACHE_KWARGS and value is not None)
    ]
    args = tuple(None if isinstance(value, Cache) else value for value in args)
    kwargs = {name: None if name in dropped else value for name, value in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
        dropped.append("use_cache")
    if dropped:
        logger.warning_once(
            f"recompute_above_group: {type(block).__name__} got a KV cache in training ({', '.join(dropped)}); the "
            "recomputed blocks run without it (use_cache=False), as transformers' gradient checkpointing does."
        )
    return args, kwargs
