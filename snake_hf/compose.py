"""Making another `Trainer` subclass Snake: [`SnakeMixin`] and [`snake_trainer`], [`snake_config`].

A trainer such as TRL's `SFTTrainer` prepares its data inside its own `__init__` (chat templates, tokenization,
packing) and only then calls `Trainer.__init__`. Snake must split the data over nodes after that preparation, so that
every node's shard is in the form the trainer trains on. The composed class puts the parent between two Snake pieces:

    class SnakeSFTTrainer(SnakeMixin, SFTTrainer, SnakeTrainer): ...

* [`SnakeMixin`] (first): takes Snake's own keyword-only arguments, hands the parent the first dataset of a per-node
  list, and guards the loss (below).
* the parent (`SFTTrainer`): prepares the data and, when its `__init__` takes `peft_config`, wraps the model itself
  (so its own PEFT handling, e.g. input grads for gradient checkpointing, runs as without Snake).
* [`SnakeTrainer`] (last, just above `Trainer`): receives what the parent passes to `Trainer.__init__` (the prepared
  data, the wrapped model), prepares the other nodes' datasets through [`SnakeMixin.prepare_node_dataset`], splits,
  plans and builds the part map from the model as it will train.

Snake's losses live in `SnakeTrainer.compute_loss`, which the parent's `compute_loss` reaches when it calls
`super().compute_loss` (the task loss is then `Trainer`'s, with the parent's `compute_loss_func` and labels). A parent
whose `compute_loss` never gets there would drop them silently; [`SnakeMixin.compute_loss`] refuses that by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .config import SnakeConfig
from .model_card import snake_section, write_model_card
from .trainer import SnakeTrainer


logger = logging.get_logger(__name__)

__all__ = ["SnakeMixin", "snake_config", "snake_trainer"]

SNAKE_TAG = "snake-learning"


class SnakeMixin:
    """The first base of a Snake version of a `Trainer` subclass: `class X(SnakeMixin, Parent, SnakeTrainer)`.

    Protocol for a parent that prepares data in its `__init__` (override in the composed class):

    * [`prepare_node_dataset`]: prepares one more node's dataset the way the parent prepared the first one (called
      for each dataset after the first of a per-node list, once the parent's own preparation has run).
    * [`check_snake_options`]: refuses, by name, Snake options that cannot apply under this parent.

    `peft_config` goes to the parent when its `__init__` takes one (the parent wraps the model and Snake cuts the
    wrapped model into parts); otherwise `SnakeTrainer` wraps it. `partitioner` is Snake's.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        ordered = SnakeTrainer in mro and mro.index(SnakeMixin) < mro.index(SnakeTrainer)
        between = mro[mro.index(SnakeMixin) + 1 : mro.index(SnakeTrainer)] if ordered else ()
        if not any(issubclass(c, Trainer) for c in between):
            raise TypeError(
                f"{cls.__name__}: put SnakeMixin first and SnakeTrainer last, around the trainer to make Snake: "
                f"`class {cls.__name__}(SnakeMixin, ParentTrainer, SnakeTrainer)` (or use snake_trainer(ParentTrainer))."
            )
        tags = getattr(cls, "_tag_names", None)
        if isinstance(tags, list) and SNAKE_TAG not in tags:
            cls._tag_names = [*tags, SNAKE_TAG]  # TRL's model card and model tags read `_tag_names`

    def __init__(self, *args, peft_config=None, partitioner=None, **kwargs):
        parent_init = super().__init__  # the parent's __init__ (SnakeMixin's own bases come after it)
        # The parent's arguments by name, in the parent's own order (DPOTrainer's second one is ref_model); a parent
        # that passes everything through (`*args, **kwargs`) takes Trainer's order, as SnakeTrainer does.
        signature = inspect.signature(parent_init)
        if "args" not in signature.parameters:
            signature = inspect.signature(SnakeTrainer.__init__).replace(
                parameters=list(inspect.signature(SnakeTrainer.__init__).parameters.values())[1:]
            )
        bound = signature.bind_partial(*args, **kwargs)
        args_given = bound.arguments.get("args")
        if args_given is not None and not isinstance(args_given, SnakeConfig):
            raise TypeError(
                f"`args` is a {type(args_given).__name__}; {type(self).__name__} needs a config that is also a "
                "SnakeConfig (snake_config(YourConfigClass), e.g. SnakeSFTConfig), or the parent would drop Snake's "
                "settings."
            )
        if args_given is not None:
            self.check_snake_options(args_given)  # before the parent's data preparation
        self._snake_checked = args_given is not None
        datasets_given = bound.arguments.get("train_dataset")
        self._snake_rest = []
        if isinstance(datasets_given, (list, tuple)) and datasets_given and not isinstance(datasets_given[0], dict):
            bound.arguments["train_dataset"], *self._snake_rest = datasets_given  # one dataset per node
        self._snake_peft_config = None
        if peft_config is not None:
            if "peft_config" in inspect.signature(parent_init).parameters:
                bound.arguments["peft_config"] = peft_config
            else:
                self._snake_peft_config = peft_config
        self._snake_partitioner = partitioner
        self._snake_loss_reached = False
        parent_init(*bound.args, **bound.kwargs)

    def _composed_inputs(self, args, peft_config, partitioner, train_dataset):
        # Called by SnakeTrainer.__init__ with what the parent passed on to Trainer.__init__: the prepared data.
        if not self._snake_checked:
            self.check_snake_options(args)
        if self._snake_rest:
            train_dataset = [train_dataset, *(self.prepare_node_dataset(d, args) for d in self._snake_rest)]
            self._snake_rest = []
        return peft_config or self._snake_peft_config, partitioner or self._snake_partitioner, train_dataset

    def prepare_node_dataset(self, dataset, args):
        """One more node's dataset, prepared as the parent prepared the first one with `args` (default: as it is)."""
        return dataset

    def check_snake_options(self, args) -> None:
        """Refuses Snake options that cannot apply under the parent trainer (default: none)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._snake_loss_reached = False
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        args = self.args
        own_loss = args.distill_alpha > 0 or args.lm_loss_chunk_tokens or args.logit_adjustment > 0
        if model.training and (own_loss or args.restrict_to_node_classes) and not self._snake_loss_reached:
            parent = type(self).__mro__[type(self).__mro__.index(SnakeMixin) + 1].__name__
            raise RuntimeError(
                f"{parent}.compute_loss did not reach SnakeTrainer.compute_loss (it never calls super().compute_loss), "
                "so Snake's loss options (distill_alpha, lm_loss_chunk_tokens, logit_adjustment, "
                "restrict_to_node_classes) would be ignored; turn them off, or call super().compute_loss in it."
            )
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Snake's per-stage record goes straight to Trainer.log: a parent that merges its running metrics into the
        # next log (TRL's token accuracy, entropy) keeps them for its own next training log.
        if "stage_loss" in logs:
            Trainer.log(self, logs, start_time)
        else:
            super().log(logs, start_time)

    def create_model_card(self, *args, **kwargs) -> None:
        """The parent's model card (with `snake-learning` among the tags) and the Snake section after it.

        Takes the parent's arguments and Snake's (`finetuned_from`, `tasks`, `dataset`, `metrics_before`): the parent
        gets those its own `create_model_card` takes, the Snake section all. A parent that takes `model_name` gets the
        output folder's name when none is given, as the Snake section's title does (TRL's card would say "None")."""
        accepted = inspect.signature(super().create_model_card).parameters
        if "model_name" in accepted and not args and kwargs.get("model_name") is None:
            kwargs["model_name"] = Path(self.args.output_dir).name
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        super().create_model_card(*args, **{k: v for k, v in kwargs.items() if takes_any or k in accepted})
        card = Path(self.args.output_dir) / "README.md"
        if not self.is_world_process_zero() or not card.is_file() or "## Snake Learning" in card.read_text():
            return
        parent_card = card.read_text()
        snake_card = write_model_card(self, **kwargs)  # the whole Snake card, then the parent's put back first
        section = snake_section(snake_card.read_text())
        card.write_text(parent_card.rstrip("\n") + "\n\n" + section)


def snake_trainer(parent: type[Trainer], name: str | None = None, prepare_node_dataset=None) -> type:
    """The Snake version of `parent`: `class Snake<Parent>(SnakeMixin, parent, SnakeTrainer)`.

    Args:
        parent (`type[Trainer]`): a `Trainer` subclass whose `__init__` ends in `super().__init__(...)` with
            `Trainer`'s keywords, and whose `compute_loss` (if it has one) calls `super().compute_loss`.
        name (`str`, *optional*): the class name (default `"Snake" + parent.__name__`).
        prepare_node_dataset (`Callable[[trainer, dataset, args], dataset]`, *optional*): prepares each further dataset of a
            per-node list as the parent prepared the first one.
    """
    body = {"__module__": parent.__module__, "__doc__": f"`{parent.__name__}` with Snake Learning (snake_hf)."}
    if prepare_node_dataset is not None:
        body["prepare_node_dataset"] = prepare_node_dataset
    return type(name or f"Snake{parent.__name__}", (SnakeMixin, parent, SnakeTrainer), body)


def snake_config(parent: type[TrainingArguments], name: str | None = None, defaults: dict | None = None) -> type:
    """A dataclass that is both a [`SnakeConfig`] and `parent` (a `TrainingArguments` subclass), with `parent`'s
    defaults kept.

    `dataclass(class X(SnakeConfig, Parent))` alone reverts them: a dataclass takes each field from the last base
    in reverse MRO that declares it, and SnakeConfig carries `TrainingArguments`' fields with `TrainingArguments`'
    defaults (e.g. TRL's SFTConfig sets learning_rate 2e-5, logging_steps 10, gradient_checkpointing True, bf16 None).
    Every field whose default `parent` changed is declared again here with `parent`'s field; `defaults` (field name
    -> value) sets the few that Snake must change, each for a stated reason.
    """
    base = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    snake_own = {f.name for f in dataclasses.fields(SnakeConfig)} - set(base)
    clashes = snake_own & {f.name for f in dataclasses.fields(parent)}
    if clashes:
        raise TypeError(f"{parent.__name__} and SnakeConfig both declare {sorted(clashes)}; rename one of them.")
    kept = []
    for f in dataclasses.fields(parent):
        mine = base.get(f.name)
        if mine is not None and (f.default, f.default_factory) != (mine.default, mine.default_factory):
            kept.append((f.name, f.type, _copy_field(f, (defaults or {}).get(f.name, f.default))))
    return dataclasses.make_dataclass(
        name or f"Snake{parent.__name__}", kept, bases=(SnakeConfig, parent), namespace={"__module__": __name__}
    )


def _copy_field(f: dataclasses.Field, default) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata, repr=f.repr)
    return dataclasses.field(default=default, metadata=f.metadata, repr=f.repr)
