"""Snake inside TRL: [`SnakeSFTTrainer`] and [`SnakeSFTConfig`] (needs `pip install snake_hf[trl]`).

`SnakeSFTTrainer` is `SFTTrainer` (chat templates, prompt–completion data and completion-only loss, packing, its
collators, metrics and model card) with Snake Learning: TRL prepares the whole training set (or each node's dataset
of a per-node list) first, then Snake splits it over nodes, so every shard holds what `SFTTrainer` trains on. TRL wraps
the model with `peft_config`; Snake cuts the wrapped model into block groups. Snake's distillation and label-skew
losses mix into TRL's task loss (`Trainer.compute_loss`, reached through `SFTTrainer.compute_loss`), so TRL's
completion mask, `loss_type` and metrics keep their meaning. See docs/trl.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .compose import SnakeMixin, snake_config
from .trainer import SnakeTrainer


__all__ = ["SnakeSFTConfig", "SnakeSFTTrainer"]


# gradient_checkpointing: TRL defaults it to True, which Snake refuses (it makes backward run through every frozen block,
# losing Snake's memory saving); `recompute_above_group=True` is Snake's memory saver instead.
_Fields = snake_config(SFTConfig, "_SnakeSFTFields", defaults={"gradient_checkpointing": False})


@dataclass
class SnakeSFTConfig(_Fields):
    """`trl.SFTConfig` and [`SnakeConfig`] in one: every field of both, with TRL's defaults (learning_rate 2e-5,
    logging_steps 10, bf16 unless fp16, max_length 1024, packing off, loss_type "chunked_nll") and Snake's fields and
    checks. Two differences, both where a TRL default cannot work with a Snake option:

    * `gradient_checkpointing` defaults to False (TRL: True), which Snake refuses because backward would run through
      every frozen block; use `recompute_above_group=True`.
    * `loss_type` left unset becomes "nll" (TRL: "chunked_nll") when `distill_alpha > 0`: distillation needs the
      student's logits, which the chunked loss never builds (the same loss, computed at once).
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

    def check_snake_options(self, args) -> None:
        # SFTTrainer.compute_loss reads the logits for its metrics, and Snake's distillation reads the student's
        # logits: neither exists where TRL never builds them (liger kernel, loss_type="chunked_nll").
        if args.lm_loss_chunk_tokens:
            raise ValueError(
                f"`lm_loss_chunk_tokens` ({args.lm_loss_chunk_tokens}) does not apply under SFTTrainer, whose "
                "compute_loss needs the full logits for its metrics; set it to 0 and use TRL's own chunked loss, "
                "loss_type='chunked_nll' (same loss, the lm_head run in chunks on the labelled tokens only)."
            )
        no_logits = "use_liger_kernel=True" if args.use_liger_kernel else (
            "loss_type='chunked_nll'" if args.loss_type == "chunked_nll" else None)  # fmt: skip
        if no_logits and args.distill_alpha > 0:
            raise ValueError(
                f"`distill_alpha` ({args.distill_alpha}) needs the student's logits, which {no_logits} never builds; "
                "set distill_alpha=0, or use loss_type='nll' without the liger kernel."
            )
