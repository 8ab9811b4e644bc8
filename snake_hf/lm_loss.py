"""A causal-LM training loss computed from the final hidden states in chunks, never holding the full logits.

A small language model's logits dominate its training memory: SmolLM2's vocabulary has 49,152 entries, so a batch of
4 x 128 tokens has 100 MB of float32 logits, and the loss's backward holds two or three tensors of that size. Here the
model runs its own forward with its output head fed an empty slice (so no logits are made), and the loss is the same
shifted cross-entropy as `transformers`' `ForCausalLMLoss`, summed chunk by chunk; each chunk's logits are recomputed
in the backward (non-reentrant checkpoint), so at most one chunk's logits exist at a time. The value is the model's own
loss up to float rounding (a sum in a different order), and so are the gradients.

Only for models whose logits are `output_embeddings(last_hidden_state)` (Llama, Qwen2, Mistral, GPT-2, OPT, ...);
models that post-process logits (Gemma 2's soft-capping, Cohere's logit scale) are refused.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import unwrap_model


__all__ = ["check_chunkable", "chunked_causal_lm_loss"]

IGNORE_INDEX = -100
_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def check_chunkable(model: nn.Module, chunk_tokens: int) -> nn.Module:
    """Returns the output head of `model`; raises when its logits are not the head applied to the hidden states.

    `SnakeTrainer` calls it before it touches the model when `lm_loss_chunk_tokens` is set.

    Args:
        model (`nn.Module`): the model (possibly PEFT-wrapped).
        chunk_tokens (`int`): the `lm_loss_chunk_tokens` value, for the message.

    Returns:
        `nn.Module`: the output head (`get_output_embeddings()`).

    Raises:
        `ValueError`: naming `lm_loss_chunk_tokens` and its value, the model, why, and the fix.

    Example:
        ```python
        >>> head = check_chunkable(AutoModelForCausalLM.from_config(LlamaConfig(...)), 128)  # lm_head
        >>> check_chunkable(BertForSequenceClassification(BertConfig(...)), 128)
        ValueError: `lm_loss_chunk_tokens` (128) is set, but BertForSequenceClassification has no output embeddings...
        ```
    """
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    post = [name for name in _POST_PROCESSING if getattr(config, name, None) not in (None, 1, 1.0)]
    if head is None or post:
        reason = f"post-processes its logits ({', '.join(post)})" if post else "has no output embeddings"
        raise ValueError(
            f"`lm_loss_chunk_tokens` ({chunk_tokens}) is set, but {type(base).__name__} {reason}: the chunked loss "
            "needs logits = lm_head(hidden states). Set lm_loss_chunk_tokens=0 for this model."
        )
    return head


def chunked_causal_lm_loss(
    model: nn.Module, inputs: dict, chunk_tokens: int, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """The model's shifted next-token cross-entropy, from its final hidden states in chunks of `chunk_tokens`.

    Args:
        model (`nn.Module`): a causal LM (possibly PEFT-wrapped) whose logits are its output head on the hidden states.
        inputs (`dict`): the batch, with `labels` (`-100` is ignored; the labels are shifted by one as in
            `transformers`).
        chunk_tokens (`int`): tokens per chunk of logits.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): divide the summed loss by this (Trainer's count of
            predicted tokens across gradient accumulation); without it, the mean over this batch's predicted tokens.
            A batch with no predicted token gives what the model's own loss gives: NaN without `num_items_in_batch`
            (a mean over nothing), `0 / num_items_in_batch` with it; either way with zero gradients.

    Returns:
        `torch.Tensor`: the scalar loss.

    Example:
        ```python
        >>> loss = chunked_causal_lm_loss(model, batch, chunk_tokens=128)
        >>> loss.backward()  # no more than 128 x vocab logits at a time
        ```
    """
    head = check_chunkable(model, chunk_tokens)
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    with _capture_head_input(head) as captured:
        model(**inputs)
    hidden = captured[0]
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
    keep = targets.reshape(-1) != IGNORE_INDEX
    rows, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets.reshape(-1)[keep]
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    count = count.to(hidden.device) if torch.is_tensor(count) else count
    if not rows.shape[0]:
        # Nothing to predict (every label -100). The model's own loss is then 0 / count with zero gradients: NaN
        # for the mean over no tokens, 0 with Trainer's num_items_in_batch (which covers the other micro-batches of
        # the step). The head on the empty selection keeps the loss in the graph, so backward runs and every
        # parameter the model's own loss reaches gets its zero gradient (AdamW still steps on a zero gradient).
        return head(rows).float().sum() + hidden.new_zeros((), dtype=torch.float32) / count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(_summed_cross_entropy, head, rows[chunk], targets[chunk], use_reentrant=False)
    return total / count


def _summed_cross_entropy(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")


@contextlib.contextmanager
def _capture_head_input(head: nn.Module):
    """During the model's forward: keep the head's input and give the head an empty slice of it (no logits made)."""
    captured = []

    def take(module, args, kwargs):
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(take, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()
