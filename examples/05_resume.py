"""05 — Resume an interrupted run from its last checkpoint.

Checkpoints are the standard `Trainer` ones (`save_strategy="steps"`, `checkpoint-N` folders, named by the plan's
global step). Here the first run is stopped after 6 of its 12 steps (as a crash would stop it); a second trainer
with the same settings picks up the last checkpoint with `train(resume_from_checkpoint=True)` and finishes the plan.
The resumed adapters are compared with those of an uninterrupted run.

    python examples/05_resume.py
"""

from __future__ import annotations

import datasets
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, set_seed

from snake_hf import SnakeConfig, SnakeTrainer


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps (standing in for a crash right after a checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def make_trainer(output_dir: str, callbacks=None) -> SnakeTrainer:
    set_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    ids = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = SnakeConfig(
        num_train_epochs=1,  # one plan epoch (Trainer's default is 3)
        output_dir=output_dir,
        num_nodes=3,
        num_block_groups=2,
        stage_steps=2,  # 6 stages x 2 steps = 12 steps
        save_strategy="steps",
        save_steps=2,  # a checkpoint at every stage boundary
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    return SnakeTrainer(model, args, train_dataset=data, peft_config=lora, callbacks=callbacks)


def main(output_dir: str = "outputs/05_resume") -> dict:
    reference = make_trainer(f"{output_dir}/uninterrupted")
    reference.train()

    make_trainer(f"{output_dir}/resumed", callbacks=[StopAt(6)]).train()  # "crashes" after step 6
    resumed = make_trainer(f"{output_dir}/resumed")
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint-N under output_dir

    a, b = get_peft_model_state_dict(reference.model), get_peft_model_state_dict(resumed.model)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"resumed at step 6, finished at step {resumed.state.global_step}; adapters identical: {identical}")
    return {"global_step": resumed.state.global_step, "identical": identical}


if __name__ == "__main__":
    main()
