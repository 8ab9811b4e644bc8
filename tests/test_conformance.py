"""`SnakeTrainer` against `Trainer`: the behaviours transformers' own `tests/trainer/` checks, in two modes.

* **1 node, 1 group, 1 pass** (`TestOneNode`): `SnakeTrainer` is `Trainer`. The same arguments give the same losses,
  adapters or weights, epochs, checkpoints, best model and resume, step for step. Bit-identical: the same kernels run
  in the same order on CPU.
* **2 nodes x 2 groups** (`TestTwoByTwo`): each `Trainer` feature works as docs/trainer_conformance.md defines it,
  or is refused before any work with a message that names the option.

Models: tiny GPT-2 with LoRA (PEFT), tiny GPT-2 in full mode (some tensors frozen by the user), and an MLP with no
list of repeated blocks. Each test builds its own tiny model and data (offline, seconds).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import (
    EarlyStoppingCallback,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from conftest import assert_same_state, lm_dataset, losses, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.trainer.checkpoint import CheckpointError
from snake_hf.trainer.options import check_trainer_options


QUIET = dict(report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, learning_rate=1e-2)


class TinyMLP(nn.Module):
    """A model with no list of repeated blocks: it trains as one group."""

    def __init__(self, seed: int = 0):
        super().__init__()
        set_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def mlp_dataset(n: int = 24) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=generator)
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": x[:, :3].argmax(-1).tolist()}).with_format("torch")


def lora():
    return LoraConfig(r=4, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM", lora_dropout=0.1)


def gpt2_user_frozen():
    model = tiny_gpt2()
    model.transformer.h[1].mlp.requires_grad_(False)  # the user froze these: they must stay frozen
    model.transformer.wpe.requires_grad_(False)
    return model


# (name, model factory, dataset factory, peft_config factory or None): the configurations every parity test runs.
MODELS = {
    "gpt2-lora": (tiny_gpt2, lambda: lm_dataset(n=24), lora),
    "gpt2-full": (gpt2_user_frozen, lambda: lm_dataset(n=24), None),
    "mlp-no-blocks": (TinyMLP, mlp_dataset, None),
}


def build(kind: str, name: str, tmp_path: Path, model=None, data=None, **overrides):
    """A plain `Trainer` (`kind="plain"`; PEFT-wrapped as a user would) or a `SnakeTrainer` at 1/1/1 from the same
    arguments."""
    make_model, make_data, make_peft = MODELS[name]
    values = dict(QUIET, output_dir=str(tmp_path / kind), per_device_train_batch_size=4, save_strategy="no")
    values.update(overrides)
    trainer_kwargs = values.pop("trainer_kwargs", {})
    model = model if model is not None else make_model()
    data = data if data is not None else make_data()
    peft = make_peft() if make_peft else None
    if kind == "plain":
        model = get_peft_model(model, peft) if peft is not None else model
        return Trainer(model, TrainingArguments(**values), train_dataset=data, **trainer_kwargs)
    args = SnakeConfig(**values, num_nodes=1, num_block_groups=1, num_passes=1)
    return SnakeTrainer(model, args, train_dataset=data, peft_config=peft, **trainer_kwargs)


def trained_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EventCounter(TrainerCallback):
    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.events.append(("epoch_end", state.global_step))

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_evaluate(self, args, state, control, **kwargs):
        self.events.append(("evaluate", state.global_step))


def checkpoints(folder: str) -> list[str]:
    return sorted((p.name for p in Path(folder).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


# ---------------------------------------------------------------------------------------------------------------------
# Mode 1: one node, one group, one pass is Trainer.
# ---------------------------------------------------------------------------------------------------------------------


class TestOneNode:
    def test_signature_is_trainers_with_snake_arguments_keyword_only(self):
        ours = inspect.signature(SnakeTrainer.__init__).parameters
        theirs = inspect.signature(Trainer.__init__).parameters
        assert list(ours)[: len(theirs)] == list(theirs)
        assert all(ours[name].default == theirs[name].default for name in theirs if name != "args")
        extra = [p for name, p in ours.items() if name not in theirs]
        assert extra and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)

    @pytest.mark.parametrize("name", list(MODELS))
    @pytest.mark.parametrize(
        "length",
        [dict(), dict(num_train_epochs=1.5), dict(max_steps=4), dict(max_steps=14)],
        ids=["default-3-epochs", "fractional-epochs", "max-steps-in-epoch", "max-steps-over-epochs"],
    )
    def test_training_equals_trainer_step_for_step(self, tmp_path, name, length):
        counters = EventCounter(), EventCounter()
        plain = build("plain", name, tmp_path, **length, trainer_kwargs=dict(callbacks=[counters[0]]))
        snake = build("snake", name, tmp_path, **length, trainer_kwargs=dict(callbacks=[counters[1]]))
        plain.train()
        snake.train()
        assert snake.state.max_steps == plain.state.max_steps and snake.state.global_step == plain.state.global_step
        assert losses(snake) == losses(plain)
        assert [h["epoch"] for h in snake.state.log_history if "loss" in h] == [
            h["epoch"] for h in plain.state.log_history if "loss" in h
        ]
        assert counters[1].events == counters[0].events  # epoch ends at the same steps
        assert_same_state(trained_state(snake), trained_state(plain))
        assert snake.state.log_history[-1]["train_loss"] == plain.state.log_history[-1]["train_loss"]

    def test_user_frozen_tensors_stay_frozen_in_full_mode(self, tmp_path):
        snake = build("snake", "gpt2-full", tmp_path, max_steps=2)
        before = {k: v.clone() for k, v in snake.model.state_dict().items()}
        snake.train()
        after = snake.model.state_dict()
        assert torch.equal(before["transformer.h.1.mlp.c_fc.weight"], after["transformer.h.1.mlp.c_fc.weight"])
        assert torch.equal(before["transformer.wpe.weight"], after["transformer.wpe.weight"])
        assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])  # outside blocks
        assert snake.model.transformer.wte.weight.requires_grad  # requires_grad as the user left it
        assert not snake.model.transformer.wpe.weight.requires_grad

    @pytest.mark.parametrize("name", ["gpt2-lora", "mlp-no-blocks"])
    def test_checkpoints_at_the_same_steps_and_resume_equals_an_uninterrupted_run(self, tmp_path, name):
        steps = dict(save_strategy="steps", save_steps=4, num_train_epochs=2)
        plain = build("plain", name, tmp_path, **steps)
        plain.train()
        snake = build("snake", name, tmp_path, **steps)
        snake.train()
        assert checkpoints(snake.args.output_dir) == checkpoints(plain.args.output_dir) != []
        resumed = build("snake", name, tmp_path, **steps)
        resumed.train(resume_from_checkpoint=str(Path(snake.args.output_dir) / "checkpoint-4"))  # inside the stage
        assert losses(resumed)[-8:] == losses(plain)[-8:]
        assert_same_state(trained_state(resumed), trained_state(plain))

    def test_resume_true_picks_the_last_checkpoint_as_trainer_does(self, tmp_path):
        steps = dict(save_strategy="steps", save_steps=5, num_train_epochs=2)
        snake = build("snake", "gpt2-lora", tmp_path, **steps)
        snake.train()
        again = build("snake", "gpt2-lora", tmp_path, **steps)
        again.train(resume_from_checkpoint=True)  # the checkpoint at the end: nothing left to train
        assert again.state.global_step == snake.state.global_step
        assert_same_state(trained_state(again), trained_state(snake))

    def test_load_best_model_at_end_loads_the_same_checkpoint_as_trainer(self, tmp_path):
        data = lm_dataset(n=24)
        best = dict(
            eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
            metric_for_best_model="loss", greater_is_better=True,  # "worst loss": not the last epoch's
        )  # fmt: skip
        plain = build("plain", "gpt2-lora", tmp_path, data=data, **best, trainer_kwargs=dict(eval_dataset=data))
        snake = build("snake", "gpt2-lora", tmp_path, data=data, **best, trainer_kwargs=dict(eval_dataset=data))
        plain.train()
        snake.train()
        assert Path(snake.state.best_model_checkpoint).name == Path(plain.state.best_model_checkpoint).name
        assert snake.state.best_model_checkpoint != checkpoints(snake.args.output_dir)[-1]
        assert_same_state(trained_state(snake), trained_state(plain))

    def test_save_strategy_best_saves_where_trainer_does(self, tmp_path):
        data = lm_dataset(n=24)
        best = dict(eval_strategy="steps", eval_steps=3, save_strategy="best", metric_for_best_model="loss")
        plain = build("plain", "gpt2-lora", tmp_path, data=data, **best, trainer_kwargs=dict(eval_dataset=data))
        snake = build("snake", "gpt2-lora", tmp_path, data=data, **best, trainer_kwargs=dict(eval_dataset=data))
        plain.train()
        snake.train()
        assert checkpoints(snake.args.output_dir) == checkpoints(plain.args.output_dir) != []

    def test_early_stopping_stops_at_the_same_step(self, tmp_path):
        data = lm_dataset(n=24)
        stop = dict(
            eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
            metric_for_best_model="loss", greater_is_better=True, max_steps=30,
        )  # fmt: skip
        made = [
            build(kind, "gpt2-lora", tmp_path, data=data, **stop,
                  trainer_kwargs=dict(eval_dataset=data, callbacks=[EarlyStoppingCallback(early_stopping_patience=2)]))
            for kind in ("plain", "snake")
        ]  # fmt: skip
        for trainer in made:
            trainer.train()
        assert made[1].state.global_step == made[0].state.global_step < 30
        assert_same_state(trained_state(made[1]), trained_state(made[0]))

    def test_stateful_callbacks_are_restored_on_resume_as_with_trainer(self, tmp_path):
        data = lm_dataset(n=24)
        stop = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, max_steps=8,
                    metric_for_best_model="loss", greater_is_better=True, load_best_model_at_end=True,
                    restore_callback_states_from_checkpoint=True)  # fmt: skip
        counters = []
        for kind in ("plain", "snake"):
            # A threshold no change reaches: every evaluation after the first counts against patience.
            first = build(kind, "gpt2-lora", tmp_path / "a", data=data, **stop, trainer_kwargs=dict(
                eval_dataset=data, callbacks=[EarlyStoppingCallback(9, early_stopping_threshold=10.0)]))  # fmt: skip
            first.train()
            stopper = EarlyStoppingCallback(9, early_stopping_threshold=10.0)
            again = build(kind, "gpt2-lora", tmp_path / "b", data=data, **stop,
                          trainer_kwargs=dict(eval_dataset=data, callbacks=[stopper]))  # fmt: skip
            again.train(resume_from_checkpoint=str(Path(first.args.output_dir) / "checkpoint-6"))
            restored = next(c for c in again.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback))
            counters.append(restored.early_stopping_patience_counter)  # Trainer restores into a new instance
        assert counters[1] == counters[0] == 3  # 2 restored from checkpoint-6, +1 at step 8 (1 if not restored)

    @pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
    def test_custom_optimizer_equals_trainer(self, tmp_path, how):
        made = []
        for kind in ("plain", "snake"):
            if how == "optimizers":  # built by the user over a PeftModel they wrapped, as with Trainer
                model = get_peft_model(tiny_gpt2(), lora())
                optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
                values = dict(QUIET, output_dir=str(tmp_path / kind), save_strategy="no", max_steps=4,
                              per_device_train_batch_size=4)  # fmt: skip
                args = TrainingArguments(**values) if kind == "plain" else SnakeConfig(**values)
                made.append((Trainer if kind == "plain" else SnakeTrainer)(
                    model, args, train_dataset=lm_dataset(n=24), optimizers=(optimizer, None)
                ))  # fmt: skip
            else:
                kwargs = dict(optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}))
                made.append(build(kind, "gpt2-lora", tmp_path, max_steps=4, trainer_kwargs=kwargs))
        for trainer in made:
            trainer.train()
        assert type(made[1].optimizer.optimizer) is torch.optim.SGD
        assert losses(made[1]) == losses(made[0])
        assert_same_state(trained_state(made[1]), trained_state(made[0]))

    def test_model_init_equals_trainer(self, tmp_path):
        # Trainer draws its data order and dropout from the global RNG as this model_init leaves it (it reseeds);
        # Snake's data order follows data_seed or seed and each node's RNG stream starts from seed. Equal here with
        # data_seed set and a model without dropout (docs/trainer_conformance.md).
        def model_init():
            set_seed(5)
            config = GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
            return get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0))

        values = dict(QUIET, max_steps=3, save_strategy="no", data_seed=0)
        plain = Trainer(args=TrainingArguments(**values, output_dir=str(tmp_path / "p")), train_dataset=lm_dataset(),
                        model_init=model_init)  # fmt: skip
        snake = SnakeTrainer(args=SnakeConfig(**values, output_dir=str(tmp_path / "s")), train_dataset=lm_dataset(),
                             model_init=model_init)  # fmt: skip
        plain.train()
        snake.train()
        assert losses(snake) == losses(plain)
        assert_same_state(trained_state(snake), trained_state(plain))

    def test_evaluate_and_predict_without_train_dataset(self, tmp_path):
        data = mlp_dataset()
        plain = Trainer(TinyMLP(), TrainingArguments(**QUIET, output_dir=str(tmp_path / "p")), eval_dataset=data)
        snake = SnakeTrainer(TinyMLP(), SnakeConfig(**QUIET, output_dir=str(tmp_path / "s")), eval_dataset=data)
        assert snake.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]
        assert torch.equal(
            torch.as_tensor(snake.predict(data).predictions), torch.as_tensor(plain.predict(data).predictions)
        )
        with pytest.raises(ValueError, match="requires a train_dataset"):
            snake.train()

    def test_a_list_of_examples_is_one_dataset(self, tmp_path):
        rows = [{"x": torch.randn(6), "labels": torch.tensor(i % 3)} for i in range(12)]
        plain = Trainer(
            TinyMLP(), TrainingArguments(**QUIET, output_dir=str(tmp_path / "p"), max_steps=3), train_dataset=rows
        )
        snake = SnakeTrainer(
            TinyMLP(), SnakeConfig(**QUIET, output_dir=str(tmp_path / "s"), max_steps=3), train_dataset=rows
        )
        plain.train()
        snake.train()
        assert snake.node_data.sizes == [12]
        assert losses(snake) == losses(plain)

    def test_iterable_dataset_with_max_steps_equals_trainer(self, tmp_path):
        stream = lm_dataset(n=24).to_iterable_dataset()
        plain = build("plain", "gpt2-lora", tmp_path, data=stream, max_steps=8)  # restarts the stream after 6 steps
        snake = build("snake", "gpt2-lora", tmp_path, data=stream, max_steps=8)
        plain.train()
        snake.train()
        assert losses(snake) == losses(plain) and len(losses(snake)) == 8
        assert_same_state(trained_state(snake), trained_state(plain))

    def test_iterable_dataset_over_groups_shares_max_steps_and_needs_it(self, tmp_path):
        stream = lm_dataset(n=24).to_iterable_dataset()
        values = dict(QUIET, output_dir=str(tmp_path / "s"), save_strategy="no", max_steps=7)
        snake = SnakeTrainer(tiny_gpt2(), SnakeConfig(**values, num_block_groups=2), train_dataset=stream,
                             peft_config=lora())  # fmt: skip
        assert [s.steps for s in snake.plan] == [4, 3]
        snake.train()
        assert snake.state.global_step == 7 and [r.group for r in snake.snake_report.stages] == [0, 1]
        with pytest.raises(ValueError, match="`max_steps` must say how long"):
            SnakeTrainer(tiny_gpt2(), SnakeConfig(**{**values, "max_steps": -1}), train_dataset=stream,
                         peft_config=lora())  # fmt: skip

    def test_public_methods_callable_outside_train_as_with_trainer(self, tmp_path):
        outcomes = []
        for kind in ("plain", "snake"):
            trainer = build(kind, "gpt2-lora", tmp_path)
            batch = next(iter(trainer.get_train_dataloader()))
            trainer.create_optimizer_and_scheduler(num_training_steps=3)
            try:
                outcome = trainer.training_step(trainer.model, batch).item()
            except Exception as error:  # Trainer's own training_step needs state that train() sets up
                outcome = type(error)
            outcomes.append((batch["input_ids"].shape, outcome))
        assert outcomes[1] == outcomes[0]

    def test_log_history_ends_with_trainers_summary(self, tmp_path):
        snake = build("snake", "gpt2-lora", tmp_path, max_steps=3)
        snake.train()
        assert {"train_loss", "train_runtime"} <= set(snake.state.log_history[-1])
        assert any("stage_loss" in h for h in snake.state.log_history[:-1])


# ---------------------------------------------------------------------------------------------------------------------
# Mode 2: two nodes, two groups — every feature works as documented, or is refused by name.
# ---------------------------------------------------------------------------------------------------------------------


def two_by_two(
    tmp_path: Path, model=None, peft_config="lora", data=None, trainer_kwargs=None, **overrides
) -> SnakeTrainer:
    values = dict(QUIET, output_dir=str(tmp_path / "snake"), per_device_train_batch_size=4, save_strategy="no",
                  num_nodes=2, num_block_groups=2, num_train_epochs=1)  # fmt: skip
    values.update(overrides)
    return SnakeTrainer(
        model if model is not None else tiny_gpt2(), SnakeConfig(**values), train_dataset=data or lm_dataset(n=32),
        peft_config=lora() if peft_config == "lora" else peft_config, **(trainer_kwargs or {}),
    )  # fmt: skip


class OptimizerLog(TrainerCallback):
    def __init__(self):
        self.seen, self.rates = [], []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        self.seen.append((type(inner), inner.defaults.get("lr"), inner.defaults.get("momentum")))
        self.rates.append(inner.param_groups[0]["lr"])


class TestTwoByTwo:
    def test_epochs_repeat_the_plan_and_fire_trainers_epoch_events(self, tmp_path):
        counter = EventCounter()
        trainer = two_by_two(tmp_path, num_train_epochs=2, trainer_kwargs=dict(callbacks=[counter]))
        epoch_steps = trainer.epoch_steps  # 2 nodes x 2 groups x one pass over each 16-example shard (4 steps)
        assert epoch_steps == 16 and trainer.total_steps == 32
        trainer.train()
        assert [e for e in counter.events if e[0] == "epoch_end"] == [("epoch_end", 16), ("epoch_end", 32)]
        assert {(s.node, s.group) for s in trainer.plan} == {(0, 0), (1, 0), (0, 1), (1, 1)}

    def test_max_steps_shorter_than_an_epoch_shrinks_every_stage(self, tmp_path):
        trainer = two_by_two(tmp_path, max_steps=6)
        assert (
            sum(s.steps for s in trainer.plan) == 6
            and len(trainer.plan) == 4
            and min(s.steps for s in trainer.plan) >= 1
        )
        trainer.train()
        assert trainer.state.global_step == 6

    def test_max_steps_longer_than_an_epoch_cuts_the_repeated_plan(self, tmp_path):
        trainer = two_by_two(tmp_path, max_steps=18)  # one plan epoch of 16 steps, then 2 of the next
        assert sum(s.steps for s in trainer.plan) == 18 and [s.steps for s in trainer.plan][-2:] == [4, 2]

    def test_max_steps_inside_an_epoch_with_fixed_stage_steps_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match=r"`max_steps` \(6\).*stage_steps"):
            two_by_two(tmp_path, max_steps=6, stage_steps=4)

    @pytest.mark.parametrize(
        "objective", [{}, {"proximal_mu": 0.5}, {"distill_alpha": 0.5}], ids=["plain", "proximal", "distill"]
    )
    def test_checkpoint_inside_a_stage_resumes_bit_identically(self, tmp_path, objective):
        # proximal/distill: the stage's start values (anchor, teacher) come back from the checkpoint, not the resume
        steps = dict(save_strategy="steps", save_steps=3, stage_steps=4, learning_rate=5e-2, **objective)
        full = two_by_two(tmp_path / "a", **steps)
        full.train()
        names = checkpoints(full.args.output_dir)
        # Trainer's steps (3, 6, 9, ...), every stage boundary (4, 8, 12) and the end (16).
        assert names == [f"checkpoint-{n}" for n in (3, 4, 6, 8, 9, 12, 15, 16)]
        state = json.loads((Path(full.args.output_dir) / "checkpoint-6" / "snake_state.json").read_text())
        assert state["in_stage"] is not None and state["next_stage"] == 1
        kept = (Path(full.args.output_dir) / "checkpoint-6" / "snake_stage_start.safetensors").is_file()
        assert kept == bool(objective) and bool(state["in_stage"]["start_values"]) == bool(objective)
        resumed = two_by_two(tmp_path / "a", **steps)
        resumed.train(resume_from_checkpoint=str(Path(full.args.output_dir) / "checkpoint-6"))
        assert_same_state(trained_state(resumed), trained_state(full))
        assert [r.train_loss for r in resumed.snake_report.stages] == [r.train_loss for r in full.snake_report.stages]
        assert resumed.snake_report.total_bytes == full.snake_report.total_bytes

    def test_dataloader_options_reach_the_plan_loader_as_trainer_passes_them(self, tmp_path):
        options = dict(dataloader_num_workers=2, dataloader_prefetch_factor=3, dataloader_persistent_workers=True,
                       dataloader_multiprocessing_context="spawn", dataloader_in_order=False,
                       dataloader_pin_memory=False)  # fmt: skip
        loader = two_by_two(tmp_path, **options).get_train_dataloader()  # not iterated: no workers start
        assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 3, True)
        assert loader.multiprocessing_context.get_start_method() == "spawn"
        assert loader.in_order is False and loader.pin_memory is False

    def test_resume_with_ignore_data_skip_is_refused_before_any_work(self, tmp_path):
        # Trainer would restart the data at the plan's first batch: node 0's batches in node 1's resumed stage.
        steps = dict(save_strategy="steps", save_steps=3, stage_steps=4)
        full = two_by_two(tmp_path / "a", **steps)
        full.train()
        folder = Path(full.args.output_dir) / "checkpoint-6"
        resumed = two_by_two(tmp_path / "a", **steps, ignore_data_skip=True)
        before = trained_state(resumed)
        with pytest.raises(ValueError, match=r"`ignore_data_skip` \(True\).*another node's.*ignore_data_skip=False"):
            resumed.train(resume_from_checkpoint=str(folder))
        assert_same_state(trained_state(resumed), before)  # nothing was loaded or trained
        two_by_two(tmp_path / "b", ignore_data_skip=True).train()  # a fresh run: nothing to skip, nothing refused

    @pytest.mark.parametrize("written_by", ["older_snake_hf", "file_lost"])
    def test_an_in_stage_checkpoint_without_its_start_values_warns_or_is_refused(self, tmp_path, caplog, written_by):
        steps = dict(save_strategy="steps", save_steps=3, stage_steps=4, proximal_mu=0.5)
        full = two_by_two(tmp_path / "a", **steps)
        full.train()
        folder = Path(full.args.output_dir) / "checkpoint-6"
        (folder / "snake_stage_start.safetensors").unlink()
        resumed = two_by_two(tmp_path / "a", **steps)
        if written_by == "file_lost":  # the state lists them: a damaged checkpoint, refused before any work
            with pytest.raises(CheckpointError, match=r"checkpoint-6 \(snake_stage_start.safetensors\).*proximal/0"):
                resumed.train(resume_from_checkpoint=str(folder))
            return
        state = json.loads((folder / "snake_state.json").read_text())
        del state["in_stage"]["start_values"]  # as written before the start values were kept
        (folder / "snake_state.json").write_text(json.dumps(state))
        caplog.set_level(logging.WARNING, logger="snake_hf.trainer.stage")
        resumed.train(resume_from_checkpoint=str(folder))
        assert any("not bit-identical" in r.getMessage() and "checkpoint-6" in r.getMessage() for r in caplog.records)

    def test_epoch_based_early_stopping_stops_at_a_plan_epoch_end(self, tmp_path):
        data = lm_dataset(n=32)
        stopper = EarlyStoppingCallback(early_stopping_patience=1)
        trainer = two_by_two(
            tmp_path, data=data, num_train_epochs=5, stage_steps=1, eval_strategy="epoch", save_strategy="epoch",
            load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # loss falls: stop
            trainer_kwargs=dict(eval_dataset=data, callbacks=[stopper]),
        )  # fmt: skip
        trainer.train()
        assert trainer.state.global_step == 8  # best after plan epoch 1, no better after epoch 2: stop (4 steps each)
        assert checkpoints(trainer.args.output_dir)[-1] == "checkpoint-8"

    def test_load_best_model_at_end_loads_the_best_stage_checkpoint(self, tmp_path):
        data = lm_dataset(n=32)
        trainer = two_by_two(
            tmp_path, data=data, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
            stage_steps=4, load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
            trainer_kwargs=dict(eval_dataset=data),
        )  # fmt: skip
        trainer.train()
        best = Path(trainer.state.best_model_checkpoint)
        assert best.name != "checkpoint-16"
        from safetensors.torch import load_file

        saved = load_file(str(best / "adapter_model.safetensors"))
        now = get_peft_model_state_dict(trainer.model)
        assert all(torch.equal(saved[k], now[k]) for k in saved)

    @pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
    def test_custom_optimizer_is_rebuilt_per_stage_never_swapped(self, tmp_path, how):
        log = OptimizerLog()
        model = get_peft_model(tiny_gpt2(), lora())
        if how == "optimizers":
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.5)
            kwargs = dict(optimizers=(optimizer, None))
        else:
            kwargs = dict(optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5, "momentum": 0.5}))
        args = SnakeConfig(
            **QUIET,
            output_dir=str(tmp_path / "s"),
            save_strategy="no",
            num_nodes=2,
            num_block_groups=2,
            num_train_epochs=1,
            stage_steps=2,
        )  # fmt: skip (args' lr is 1e-2)
        trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(n=32), callbacks=[log], **kwargs)
        trainer.train()
        assert len(log.seen) == 8 and set(log.seen) == {(torch.optim.SGD, 0.5, 0.5)}
        assert log.rates == pytest.approx([0.5 * (1 - k / 8) for k in range(1, 9)])  # one linear schedule from 0.5

    def test_optimizer_with_per_group_hyperparameters_is_refused(self, tmp_path):
        model = get_peft_model(tiny_gpt2(), lora())
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([{"params": trainable[:2], "lr": 0.1}, {"params": trainable[2:]}], lr=0.5)
        with pytest.raises(ValueError, match="param groups"):
            two_by_two(tmp_path, model=model, peft_config=None, trainer_kwargs=dict(optimizers=(optimizer, None)))

    def test_full_mode_trains_outside_weights_with_their_nearest_group_and_keeps_user_frozen_tensors(self, tmp_path):
        trainer = two_by_two(tmp_path, model=gpt2_user_frozen(), peft_config=None, stage_steps=1)
        params = trainer.part_map.params
        assert "transformer.wte.weight" in params["g0"] and "transformer.ln_f.weight" in params["g1"]
        assert not params.get("shared") and not any("wpe" in n for part in params.values() for n in part)
        assert not any(".h.1.mlp." in name for part in trainer.part_map.parts for name in params[part])
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        after = trainer.model.state_dict()
        assert torch.equal(before["transformer.h.1.mlp.c_fc.weight"], after["transformer.h.1.mlp.c_fc.weight"])
        assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])

    def test_model_without_blocks_runs_as_one_group_over_nodes(self, tmp_path):
        trainer = two_by_two(tmp_path, model=TinyMLP(), peft_config=None, num_block_groups=None, data=mlp_dataset(32))
        assert trainer.groups.num_groups == 1 and [s.node for s in trainer.plan] == [0, 1]
        trainer.train()
        with pytest.raises(ValueError, match="no list of repeated blocks|block list"):
            two_by_two(tmp_path, model=TinyMLP(), peft_config=None, num_block_groups=2, data=mlp_dataset(32))

    @pytest.mark.parametrize(
        "peft_config,message",
        [
            (AdaLoraConfig(r=4, target_modules=["c_attn"], total_step=10), "AdaLoRA"),
            (PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "prompt learning"),
        ],
        ids=["adalora", "prefix-tuning"],
    )
    def test_peft_methods_snake_cannot_cut_are_refused(self, tmp_path, peft_config, message):
        with pytest.raises(ValueError, match=message):
            two_by_two(tmp_path, peft_config=peft_config)

    @pytest.mark.parametrize(
        "option,value",
        [("auto_find_batch_size", True), ("train_sampling_strategy", "sequential")],
    )
    def test_options_snake_cannot_honour_are_refused_by_name(self, tmp_path, option, value):
        with pytest.raises(ValueError, match=f"`{option}`"):
            two_by_two(tmp_path, **{option: value})

    @pytest.mark.parametrize(
        "option,value",
        [("eval_strategy", "epoch"), ("save_strategy", "best"), ("load_best_model_at_end", True)],
    )
    def test_distributed_refuses_what_a_rank_cannot_see(self, option, value):
        args = SimpleNamespace(auto_find_batch_size=False, train_sampling_strategy="random", fsdp=None,
                               deepspeed=None, eval_strategy="no", save_strategy="steps", load_best_model_at_end=False)  # fmt: skip
        setattr(args, option, value)
        with pytest.raises(ValueError, match=f"`{option}`.*distributed"):
            check_trainer_options(args, SimpleNamespace(distributed=True), None)
        check_trainer_options(args, SimpleNamespace(distributed=False), None)  # simulation: fine

    def test_early_stopping_is_refused_in_distributed_mode(self):
        args = SimpleNamespace(auto_find_batch_size=False, train_sampling_strategy="random", fsdp=None,
                               deepspeed=None, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)  # fmt: skip
        with pytest.raises(ValueError, match="EarlyStoppingCallback"):
            check_trainer_options(args, SimpleNamespace(distributed=True), [EarlyStoppingCallback()])

    def test_iterable_dataset_is_refused_with_the_fix(self, tmp_path):
        stream = lm_dataset(n=32).to_iterable_dataset()
        with pytest.raises(TypeError, match="IterableDataset.*Materialise"):
            two_by_two(tmp_path, data=stream)

    def test_log_history_ends_with_trainers_summary(self, tmp_path):
        trainer = two_by_two(tmp_path, stage_steps=1)
        trainer.train()
        assert "train_loss" in trainer.state.log_history[-1]
        assert [h["stage"] for h in trainer.state.log_history if "stage_loss" in h] == [0, 1, 2, 3]
