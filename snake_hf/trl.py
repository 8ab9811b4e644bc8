"""Snake inside TRL: [`SnakeSFTTrainer`] and [`SnakeSFTConfig`] (needs `pip install snake_hf[trl]`).

`SnakeSFTTrainer` is `SFTTrainer` (chat templates, prompt–completion data and completion-only loss, packing, its
collators, metrics and model card) with Snake Learning: TRL prepares the whole training set (or each node's dataset
of a per-node list) first, then Snake splits it over nodes, so every shard holds what `SFTTrainer` trains on. TRL wraps
the model with `peft_config`; Snake cuts the wrapped model into block groups. Snake's distillation and label-skew
losses mix into the task loss `Trainer.compute_loss` computes (TRL's completion mask and labels, the same NLL); trl
1.13-1.14 reach it through `SFTTrainer.compute_loss`, and from trl 1.15 (whose `SFTTrainer.compute_loss` runs a fused
LM head and never builds the logits) [`SnakeSFTTrainer.compute_loss`] takes that route itself for the steps with a
Snake objective. Tested with trl 1.13, 1.14 and 1.16. See docs/trl.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer import utils as trl_utils

from .compose import SnakeMixin, snake_config
from .trainer import SnakeTrainer


__all__ = ["SnakeSFTConfig", "SnakeSFTTrainer"]

# trl >= 1.15: SFTTrainer.compute_loss computes the loss with a fused LM head (per-token log-probabilities in chunks,
# no logits) and never calls Trainer.compute_loss, where Snake's stage objective applies (trl 1.13-1.14 call it).
FUSED_LM_HEAD = hasattr(trl_utils, "add_fused_lm_head")


# gradient_checkpointing: TRL defaults it to True, which Snake refuses (it makes backward run through every frozen block,
# losing Snake's memory saving); `recompute_above_group=True` is Snake's memory saver instead.
_Fields = snake_config(SFTConfig, "_SnakeSFTFields", defaults={"gradient_checkpointing": False})


@dataclass
class SnakeSFTConfig(_Fields):
    """`trl.SFTConfig` and [`SnakeConfig`] in one: every field of both, with TRL's defaults (learning_rate 2e-5,
    logging_steps 10, bf16 unless fp16, max_length 1024, packing off, loss_type "nll"; "chunked_nll" when unset in
    trl 1.13-1.14) and Snake's fields and checks. Two differences, both where a TRL default cannot work with a Snake
    option:

    * `gradient_checkpointing` defaults to False (TRL: True), which Snake refuses because backward would run through
      every frozen block; use `recompute_above_group=True`.
    * trl 1.13-1.14: `loss_type` left unset becomes "nll" (TRL: "chunked_nll") when `distill_alpha > 0`: distillation
      needs the student's logits, which the chunked loss never builds (the same loss, computed at once).
    """

    def __post_init__(self):
        if self.loss_type is None and self.distill_alpha > 0 and not self.use_liger_kernel:
            self.loss_type = "nll"
        super().__post_init__()


class SnakeSFTTrainer(SnakeMixin, SFTTrainer, SnakeTrainer):
    """`trl.SFTTrainer` with Snake Learning: `SFTTrainer`'s arguments, plus `partitioner` (keyword-only) and a
    [`SnakeSFTConfig`] as `args`; `train_dataset` may also be one dataset per node.

    Example:
        ```python
        >>> trainer = SnakeSFTTrainer(
        ...     model, SnakeSFTConfig("out", num_nodes=3, num_block_groups=2, packing=True), train_dataset=chats,
        ...     processing_class=tokenizer, peft_config=LoraConfig(r=8, target_modules="all-linear"),
        ... )
        >>> trainer.train()
        ```
    """

    def prepare_node_dataset(self, dataset, args):
        # As SFTTrainer.__init__ prepared the first (its _prepare_dataset, trl 1.13): the same tokenizer, template,
        # packing and formatting function.
        if self._skip_prepare_dataset:
            return dataset
        return self._prepare_dataset(dataset, self._tokenizer, args, args.packing, self._formatting_func, "train")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`SFTTrainer.compute_loss`; from trl 1.15, a step with a Snake objective (distillation, label-skew loss)
        computes its loss through `SnakeTrainer.compute_loss` (the objective over `Trainer`'s task loss: the model's
        own NLL on TRL's labels, from the full logits the objective needs) and runs `SFTTrainer.compute_loss` once
        more without gradients for TRL's metrics, as TRL itself does for `compute_loss_func` and label smoothing."""
        current = self._current
        if not (FUSED_LM_HEAD and model.training and current is not None and current.objective is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False  # as SFTTrainer sets it
        loss, outputs = SnakeTrainer.compute_loss(self, model, {**inputs}, True, num_items_in_batch)
        with torch.no_grad():
            SFTTrainer.compute_loss(self, model, {**inputs}, False, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def check_snake_options(self, args) -> None:
        # trl 1.13-1.14: SFTTrainer.compute_loss reads the logits for its metrics, and Snake's distillation reads the
        # student's logits: neither exists where TRL never builds them (liger kernel, loss_type="chunked_nll").
        # trl >= 1.15: TRL's own loss is already chunked (the fused LM head); a distillation step computes the task
        # loss as Trainer does (see compute_loss), which is TRL's "nll" and not its "dft".
        if args.lm_loss_chunk_tokens:
            own = "always computes its loss with a fused LM head" if FUSED_LM_HEAD else (
                "computes it with loss_type='chunked_nll'")  # fmt: skip
            raise ValueError(
                f"`lm_loss_chunk_tokens` ({args.lm_loss_chunk_tokens}) does not apply under SFTTrainer, whose "
                f"compute_loss does not build the logits Snake's chunked loss replaces; set it to 0: TRL {own} "
                "(the same loss, the lm_head run in chunks on the labelled tokens only)."
            )
        if args.distill_alpha <= 0:
            return
        if args.use_liger_kernel:
            raise ValueError(
                f"`distill_alpha` ({args.distill_alpha}) needs the student's logits from the model's own forward, "
                "which use_liger_kernel=True replaces; set distill_alpha=0, or use_liger_kernel=False."
            )
        if not FUSED_LM_HEAD and args.loss_type == "chunked_nll":
            raise ValueError(
                f"`distill_alpha` ({args.distill_alpha}) needs the student's logits, which loss_type='chunked_nll' "
                "never builds; set distill_alpha=0, or use loss_type='nll'."
            )
        if FUSED_LM_HEAD and args.loss_type != "nll":
            raise ValueError(
                f"`distill_alpha` ({args.distill_alpha}) mixes distillation into the NLL task loss computed from the "
                f"full logits; loss_type={args.loss_type!r} is not that loss. Set loss_type='nll' or distill_alpha=0."
            )
