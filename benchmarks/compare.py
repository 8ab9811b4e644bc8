"""Snake Learning side by side with centralized LoRA, FedAvg-LoRA, cyclic weight transfer and split learning.

Every method runs on the same model, data, node split, seed and budget of optimizer steps (summed over nodes:
T = nodes x groups x passes x stage_steps), each in its own process so that their memory does not mix:

| method | what it is |
| --- | --- |
| `centralized` | plain `Trainer` + PEFT LoRA on the pooled data (the accuracy ceiling) |
| `fedavg_lora` | groups x passes rounds; every node trains all adapters for stage_steps, the server averages |
| `cyclic` | the whole adapter passed node to node (groups x passes cycles), every node trains every layer |
| `split` | split learning at `cut_layer`: activations and their gradients cross every step |
| `snake_serpentine`, `snake_designated` | `SnakeTrainer` with that schedule (designated: one group per node) |
| `snake_serpentine+mitigation` | on a label-skewed split: serpentine plus the `--mitigation` SnakeConfig options |

Recorded per method: the final metric (accuracy; perplexity = exp(eval loss) for the causal LM), a curve of
(steps, metric, bytes moved so far) after every stage/round, total bytes, bytes to reach the target, peak memory
per node above the loaded model, wall time (evaluation excluded) and samples per second. The target is the
centralized accuracy minus 1 point; for perplexity, the centralized perplexity times 1.01 (its loss + ln 1.01: one
per cent, the analogue of one point). `--task memory_full` measures the per-node peak memory of Snake full-parameter
training (designated: one group of blocks per node) against full fine-tuning with `Trainer`.

Usage (results in benchmarks/results/compare_<task>[_<partition>]_<size>.{json,md,png}):
    python benchmarks/compare.py --task minilm_rt --partition dirichlet --alpha 0.1 --quick   # ~7 min, 2 CPU cores
    python benchmarks/compare.py --task minilm_rt --partition iid --threads 1                 # ~30 min, 2 cores
    python benchmarks/compare.py --task smollm2_lm --threads 1                                # ~55 min, 2 cores
    python benchmarks/compare.py --task memory_full --recompute true --lm_loss_chunk 128      # ~5 min
    python benchmarks/compare.py --task memory_full --quick --recompute true    # Snake: recompute_above_group
    python benchmarks/compare.py --task memory_full --quick --recompute true --lm_loss_chunk 128  # + chunked LM loss
    python benchmarks/compare.py --task memory_full --quick --base_dtype bfloat16    # Snake's frozen base in bf16
    python benchmarks/compare.py --task minilm_rt --partition iid --quick --payload_dtype bfloat16  # *_bfloat16.*
    python benchmarks/compare.py --task minilm_rt --threads 1 --payload_dtype int4 --methods snake_serpentine  # *_int4.*
    python benchmarks/compare.py --task minilm_rt --tiny --output_dir /tmp/bench              # seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # baselines.py, when run as a script or imported by path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("minilm_rt", "smollm2_lm", "memory_full")
LORA_METHODS = ("centralized", "fedavg_lora", "cyclic", "split", "snake_serpentine", "snake_designated")
MEMORY_METHODS = ("full_finetune", "snake_full")
MITIGATED = "snake_serpentine+mitigation"
# As recipes/configs/minilm_rotten_tomatoes.yaml: every linear layer inside the blocks (not the pooler, which trains).
MINILM_LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass
class Settings:
    """One benchmark run; every field is also a command-line flag."""

    task: str = "minilm_rt"
    size: str = "full"
    partition: str = "iid"
    alpha: float = 1.0
    num_nodes: int = 4
    num_groups: int = 2
    num_passes: int = 2
    stage_steps: int = 20
    batch_size: int = 32
    max_length: int = 64
    train_size: int = 0  # 0: the whole training split
    eval_size: int = 1000
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    lora_r: int = 8
    cut_layer: int = 0  # 0: half the blocks
    mitigation: str = "logit_adjustment=1.0,node_class_min_share=0.01"  # the classification recipe's default
    methods: str = ""  # comma-separated subset; empty: every method of the task
    seed: int = 42
    threads: int = 2
    payload_dtype: str = "float32"  # Snake's wire dtype (SnakeConfig.payload_dtype); the baselines count float32
    recompute: bool = False  # Snake: SnakeConfig.recompute_above_group
    lm_loss_chunk: int = 0  # causal LM, Snake and full fine-tuning alike: loss in chunks of this many tokens (0: off)
    curve: bool = True  # Snake: measure after every stage (False: only after the last one, to save evaluation time)
    curve_every: int = 0  # Snake: measure only at stage ends that are multiples of this many steps (0: every one)
    snake_options: str = ""  # extra SnakeConfig options of the Snake methods, e.g. "group_order=alternate"
    lora: bool = True  # smollm2_lm: False trains the blocks' own weights (Snake full mode; no adapters)
    base_dtype: str = "float32"  # memory_full: Snake's frozen base loaded in this dtype (full fine-tuning: float32)

    @property
    def total_steps(self) -> int:
        return self.num_nodes * self.num_groups * self.num_passes * self.stage_steps

    @property
    def kind(self) -> str:
        return "accuracy" if self.task == "minilm_rt" else "perplexity"


PRESETS = {
    # The main job's plan (and benchmarks/non_iid.py's): 4 nodes x 2 groups x 1 pass x 20 steps of batch 16.
    ("minilm_rt", "full"): dict(num_passes=1, stage_steps=20, batch_size=16),
    ("minilm_rt", "quick"): dict(train_size=2000, eval_size=200, num_passes=1, stage_steps=5, batch_size=16,
                                 learning_rate=3e-3, threads=1),
    ("minilm_rt", "tiny"): dict(train_size=160, eval_size=32, num_passes=1, stage_steps=2, batch_size=4, max_length=16,
                                threads=1),
    ("smollm2_lm", "full"): dict(num_groups=3, num_passes=1, stage_steps=4, batch_size=8, max_length=128,
                                 train_size=2000, eval_size=64, learning_rate=5e-4),
    ("smollm2_lm", "quick"): dict(num_groups=3, num_passes=1, stage_steps=2, batch_size=4, max_length=128,
                                  train_size=256, eval_size=16, learning_rate=5e-4, threads=1),
    ("smollm2_lm", "tiny"): dict(num_passes=1, stage_steps=2, batch_size=4, max_length=16, train_size=160,
                                 eval_size=32, learning_rate=5e-3, threads=1),
    ("memory_full", "full"): dict(num_nodes=6, num_groups=6, num_passes=1, stage_steps=2, batch_size=8,
                                  max_length=256, learning_rate=1e-5, train_size=96, eval_size=0),
    ("memory_full", "quick"): dict(num_nodes=6, num_groups=6, num_passes=1, stage_steps=2, batch_size=4,
                                   max_length=128, learning_rate=1e-5, train_size=48, eval_size=0, threads=1),
    ("memory_full", "tiny"): dict(num_nodes=4, num_groups=4, num_passes=1, stage_steps=2, batch_size=4,
                                  max_length=16, learning_rate=1e-3, train_size=32, eval_size=0, threads=1),
}  # fmt: skip


def methods_for(s: Settings) -> list[str]:
    if s.methods:
        return s.methods.split(",")
    if s.task == "memory_full":
        return list(MEMORY_METHODS)
    mitigated = [MITIGATED] if s.kind == "accuracy" and s.partition != "iid" and s.mitigation else []
    return list(LORA_METHODS) + mitigated


# ---- the task: model, adapters, data (rebuilt identically in every worker process) ----


@dataclass
class Task:
    model: torch.nn.Module  # with adapters in LoRA mode, seeded: every method starts from the same weights
    shards: list
    eval_set: object
    collator: object
    train_mode: str


def _load_model(s: Settings):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from snake_hf.recipes import assets, tiny_config

    set_seed(s.seed)  # the new classification head's initial weights
    if s.size == "tiny":
        if s.task == "minilm_rt":
            return AutoModelForSequenceClassification.from_config(tiny_config("bert", "sequence_classification")), None
        return AutoModelForCausalLM.from_config(tiny_config("llama", "causal_lm")), None
    if s.task == "minilm_rt":
        return assets.load_minilm_classifier(num_labels=2)
    return assets.load_smollm2()


def _load_data(s: Settings, tokenizer):
    from snake_hf.recipes import assets, synthetic_causal_lm, synthetic_classification, tokenize_classification

    total = s.train_size + s.eval_size
    if s.size == "tiny":
        make = synthetic_classification if s.task == "minilm_rt" else synthetic_causal_lm
        data = make(max(total, s.num_nodes * s.batch_size), length=s.max_length, seed=s.seed)
        return data.select(range(s.train_size)), data.select(range(s.train_size, total)) if s.eval_size else None
    if s.task == "minilm_rt":
        splits = assets.load_rotten_tomatoes(seed=s.seed)
        train, test = splits["train"], splits["test"].shuffle(seed=s.seed).select(range(s.eval_size))
        if s.train_size:
            train = train.shuffle(seed=s.seed).select(range(s.train_size))
        tokenize = lambda d: tokenize_classification(d, tokenizer, s.max_length)  # noqa: E731
        return tokenize(train), tokenize(test)
    # Causal LM: packed blocks of the King James Bible; the blocks after the training ones are held out.
    blocks = assets.text_corpus_dataset(assets.load_bible_text(), tokenizer, s.max_length, max_blocks=total or None)
    cut = s.train_size or len(blocks) - s.eval_size
    return blocks.select(range(cut)), blocks.select(range(cut, len(blocks))) if s.eval_size else None


def build_task(s: Settings) -> Task:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, default_data_collator, set_seed

    from snake_hf.data.shards import make_partitioner

    model, tokenizer = _load_model(s)
    train, eval_set = _load_data(s, tokenizer)
    if s.kind == "accuracy":
        kwargs = {"alpha": s.alpha, "min_size": s.batch_size} if s.partition == "dirichlet" else {}
        shards = make_partitioner(s.partition, s.num_nodes, seed=s.seed, **kwargs).split(train)
        collator = DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator
    else:
        if s.partition != "iid":
            raise ValueError(f"`partition` ({s.partition!r}): packed text blocks have no labels; use iid.")
        shards, collator = make_partitioner("iid", s.num_nodes, seed=s.seed).split(train), default_data_collator
    if s.task == "memory_full":
        return Task(model, shards, eval_set, collator, "full")
    if not s.lora:  # the blocks' own weights train; the (tied) embedding stays frozen, as a memory-minded user sets it
        model.get_input_embeddings().weight.requires_grad_(False)
        return Task(model, shards, eval_set, collator, "full")
    targets = ["q_proj", "v_proj"] if s.task == "smollm2_lm" else MINILM_LORA_TARGETS
    config = LoraConfig(
        r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.05, target_modules=targets,
        modules_to_save=["pooler"] if s.kind == "accuracy" else None,
        task_type="SEQ_CLS" if s.kind == "accuracy" else "CAUSAL_LM",
    )  # fmt: skip
    set_seed(s.seed)  # LoRA's initial A matrices
    return Task(get_peft_model(model, config), shards, eval_set, collator, "lora")


# ---- one method, in a worker process ----


def _trainer_args(s: Settings, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        seed=s.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )


def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        value = value.strip()
        if ";" in value:  # a list, e.g. group_learning_rate_scale=1;1.5;2
            options[key.strip()] = [float(x) for x in value.split(";")]
        elif value.lower() in ("true", "false"):
            options[key.strip()] = json.loads(value.lower())
        else:
            try:
                options[key.strip()] = float(value)
            except ValueError:  # a word, e.g. scale_steps_by=data
                options[key.strip()] = value
    return options


def run_snake(s: Settings, task: Task, budget, measure, peaks, output_dir: str, schedule: str, **options) -> dict:
    from baselines import Curve, CurveCallback, method_result
    from transformers import PrinterCallback

    from snake_hf import SnakeConfig, SnakeTrainer
    from snake_hf.blocks import part_nbytes
    from snake_hf.capacity.model_state import snake_node_state
    from snake_hf.recipes.vision import stage_end_steps

    # Designated: one group per node, and groups x passes passes so that the step budget matches; in full mode
    # (memory_full) each node trains its own group `num_passes` times.
    designated = schedule == "designated" or s.task == "memory_full"
    passes = s.num_groups * s.num_passes if schedule == "designated" else s.num_passes
    args = SnakeConfig(
        num_train_epochs=1,
        num_nodes=s.num_nodes,
        num_block_groups=s.num_nodes if designated else s.num_groups,
        num_passes=passes,
        stage_steps=s.stage_steps,
        schedule="designated" if designated else "serpentine",
        train_mode=task.train_mode,
        warmup_steps=budget.warmup(s.total_steps),
        engine="simulation",
        payload_dtype=s.payload_dtype,
        recompute_above_group=s.recompute,
        lm_loss_chunk_tokens=s.lm_loss_chunk,
        **options,
        **_trainer_args(s, output_dir),
    )
    trainer = SnakeTrainer(task.model, args, train_dataset=task.shards, data_collator=task.collator)
    trainer.remove_callback(PrinterCallback)
    # Steps scaled by shard size round per node, so the total may differ from the budget by a few steps.
    if task.train_mode == "lora" and trainer.total_steps != s.total_steps and "scale_steps_by" not in options:
        raise RuntimeError(f"Snake plans {trainer.total_steps} steps, the budget is {s.total_steps}.")
    curve = Curve(measure)
    if measure is not None:
        ends = stage_end_steps(trainer.plan) if s.curve else stage_end_steps(trainer.plan)[-1:]
        if s.curve_every:
            ends = [end for end in ends if end % s.curve_every == 0 or end == ends[-1]]
        trainer.add_callback(CurveCallback(curve, ends, lambda: trainer.snake_report.total_bytes))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    report = trainer.snake_report
    for node, peak in report.peak_memory_per_node().items():
        peaks.record(node, peak)
    model_nbytes = part_nbytes(trainer.part_map, trainer.model)  # in the model's dtype (the report's are wire bytes)
    state = snake_node_state(trainer.model, trainer.part_map)  # analytic: weights + gradients + AdamW of a node
    return method_result(
        curve, report.total_bytes, trainer.total_steps, budget, seconds, peaks,
        messages=len(report.hops), tensor_bytes=sum(h.tensor_nbytes for h in report.hops),
        adapter_bytes=sum(model_nbytes.values()), train_loss=output.training_loss,
        trainable_state_bytes=3 * max(model_nbytes.values()),  # gradients + AdamW moments of the largest part
        options=options, snake_report=report.to_dict(), model_state=dataclasses.asdict(state),
        weight_bytes=state.weights,
    )  # fmt: skip


def run_full_finetune(s: Settings, task: Task, budget, peaks, output_dir: str) -> dict:
    """Full fine-tuning with plain `Trainer` (every parameter trains), for the memory comparison."""
    import baselines
    from baselines import Curve, method_result
    from datasets import concatenate_datasets
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from snake_hf.capacity.model_state import full_finetune_state
    from snake_hf.frozen_base import base_weights

    args = TrainingArguments(max_steps=s.stage_steps, **_trainer_args(s, output_dir))
    kind = _chunked_loss_trainer(s.lm_loss_chunk) if s.lm_loss_chunk else Trainer
    trainer = kind(task.model, args, train_dataset=concatenate_datasets(task.shards), data_collator=task.collator)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    with peaks.track(0):
        output = trainer.train()
    return method_result(
        Curve(None), 0, s.stage_steps, budget, time.perf_counter() - start, peaks, train_loss=output.training_loss,
        trainable_state_bytes=3 * baselines.nbytes(p for p in task.model.parameters() if p.requires_grad),
        model_state=dataclasses.asdict(full_finetune_state(task.model)),
        weight_bytes=base_weights(task.model).weight_bytes,
    )  # fmt: skip


def _chunked_loss_trainer(chunk_tokens: int):
    """`Trainer` whose training loss is Snake's chunked causal-LM loss, so both sides of the memory comparison compute
    the loss the same way."""
    from transformers import Trainer

    from snake_hf.lm_loss import chunked_causal_lm_loss

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None  # as SnakeTrainer.compute_loss
            loss = chunked_causal_lm_loss(model, inputs, chunk_tokens, count)
            return (loss, None) if return_outputs else loss

    return ChunkedLossTrainer


@torch.no_grad()
def _warm_up(task: Task, device: torch.device) -> None:
    """One no-grad forward of two training rows: the runtime's one-time allocations (kernels, thread pools) are then
    part of the baseline, not of the first node's peak. Draws no random numbers (eval mode)."""
    batch = task.collator([task.shards[0][i] for i in range(2)])
    training = task.model.training
    task.model.eval()
    task.model(**{k: v.to(device) for k, v in batch.items()})
    task.model.train(training)


def _release_free_memory(device: torch.device) -> None:
    """Collects garbage and hands the C allocator's free pages back to the system (glibc's `malloc_trim`), so that the
    resident set the baseline records is live memory only.

    Otherwise a run in a process that has already freed more than the run needs (earlier methods with `--in_process`,
    earlier tests in the same process) allocates inside those still-resident pages, never raises the high-water mark,
    and reads a peak of 0 above the baseline. A worker process (`run_in_subprocess`, whose `MALLOC_*` settings return
    freed memory at once) has little to give back."""
    gc.collect()
    if device.type == "cpu":
        with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline may then include free memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_method(method: str, s: Settings) -> dict:
    import baselines
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(s.threads)
    task = build_task(s)
    if method.startswith("snake") and s.base_dtype != "float32":  # a base loaded in half precision, as users do
        task.model.to(getattr(torch, s.base_dtype))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task.model.to(device)
    _warm_up(task, device)
    _release_free_memory(device)
    peaks = baselines.NodePeaks(device)  # peaks are measured above the loaded model, data and warmed-up runtime
    budget = baselines.Budget(s.num_nodes, s.num_groups * s.num_passes, s.stage_steps, s.batch_size, s.learning_rate,
                              s.warmup_ratio, seed=s.seed)  # fmt: skip
    measure, example_losses = None, []  # the latest perplexity evaluation's loss per held-out example
    if s.eval_size:
        # A causal LM's evaluation logits (batch x tokens x vocabulary) are larger than its training step's: at the
        # training batch size they stay under the training peak, which a curve point inside a node's turn counts.
        batch = max(s.batch_size, 32) if s.kind == "accuracy" else s.batch_size

        def measure() -> float:
            example_losses.clear()
            losses = example_losses if s.kind == "perplexity" else None
            return baselines.evaluate(task.model, task.eval_set, task.collator, batch, s.kind, losses)

    # Gradients + AdamW moments of what a node trains: the whole adapter for the LoRA baselines (split: its client
    # part on a node, the server part on the server; this counts both); Snake reports its largest part itself.
    state = 3 * baselines.nbytes(p for p in task.model.parameters() if p.requires_grad)
    result = _run(method, s, task, budget, measure, peaks)
    result.setdefault("trainable_state_bytes", state)
    if example_losses:  # equally long packed blocks: their mean losses give the perplexity's standard error
        result["eval_example_losses"] = list(example_losses)
        result["perplexity_standard_error"] = baselines.perplexity_standard_error(example_losses)
    result["shard_sizes"] = [len(shard) for shard in task.shards]
    result["torch_threads"] = s.threads  # its own: a run assembled from cached methods may have timed them apart
    if s.kind == "accuracy":
        from snake_hf.data.summary import shard_summary

        result["shards"] = shard_summary(task.shards, "label").to_dict()
    return result


def _run(method: str, s: Settings, task: Task, budget, measure, peaks) -> dict:
    import baselines
    from datasets import concatenate_datasets

    common = (task.model, task.shards, budget, task.collator, measure, peaks)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "centralized":
            pooled = concatenate_datasets(task.shards)
            return baselines.run_centralized(task.model, pooled, budget, task.collator, measure, peaks, tmp)
        if method == "fedavg_lora":
            return baselines.run_fedavg(*common)
        if method == "cyclic":
            return baselines.run_cyclic(*common)
        if method == "split":
            blocks = len(baselines.find_block_list(task.model)[1])
            return baselines.run_split(*common, cut=s.cut_layer or blocks // 2)
        extra = _parse_options(s.snake_options)
        if method in ("snake_serpentine", "snake_designated", "snake_full"):
            return run_snake(s, task, budget, measure, peaks, tmp, method.removeprefix("snake_"), **extra)
        if method == MITIGATED:
            options = {**_parse_options(s.mitigation), **extra}
            return run_snake(s, task, budget, measure, peaks, tmp, "serpentine", **options)
        if method == "full_finetune":
            return run_full_finetune(s, task, budget, peaks, tmp)
    raise ValueError(f"Unknown method {method!r} for task {s.task!r}.")


def run_in_subprocess(method: str, s: Settings, workdir: Path) -> dict:
    """Runs one method in a fresh Python process (its memory measured alone); returns its result."""
    settings, out = workdir / "settings.json", workdir / f"{method}.json"
    settings.write_text(json.dumps(dataclasses.asdict(s)))
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # Large tensors get their own mappings and freed memory goes back to the system at once, so the resident-set
    # high-water mark of one node's turn is not inflated by what an earlier turn left in the allocator (CPU).
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    command = [sys.executable, __file__, "--worker", method, "--settings", str(settings), "--out", str(out)]
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


# ---- comparison ----


def _memory_ratio(methods: dict) -> tuple[float | None, str | None]:
    """Snake's largest per-node peak over full fine-tuning's peak, or None and the reason there is none."""
    full, snake = methods["full_finetune"]["peak_memory_max"], methods["snake_full"]["peak_memory_max"]
    if full is None or snake is None:
        return None, "no peak memory was measured (on CPU it needs Linux's /proc/self/status)"
    if full == 0:
        return None, (
            "full fine-tuning's peak measured 0 bytes above the loaded model: its run fit in memory the process "
            "already held (with --in_process every method shares one process; run without it to measure memory)"
        )
    return snake / full, None


def _memory_ratios_with_weights(methods: dict) -> dict:
    """The two numbers of docs/precision_and_devices.md, Snake's largest node over full fine-tuning: (a) model-state
    bytes (weights as loaded + gradients + optimizer state, analytic) and (b) the measured peak with the weights
    (weights as loaded + the peak above the loaded model; the Python runtime is left out of both)."""
    full, snake = methods["full_finetune"], methods["snake_full"]
    if "model_state" not in full or "model_state" not in snake:  # results from before these fields
        return {}
    state = lambda m: sum(m["model_state"].values())  # noqa: E731
    peak = lambda m: None if m["peak_memory_max"] is None else m["weight_bytes"] + m["peak_memory_max"]  # noqa: E731
    ratios = {"model_state_ratio": state(snake) / state(full)}
    if peak(full) and peak(snake) is not None:
        ratios["peak_with_weights_ratio"] = peak(snake) / peak(full)
    return ratios


def summarise(s: Settings, methods: dict) -> dict:
    """Target, bytes and steps to reach it for every method, and the headline ratios."""
    if s.task == "memory_full":
        ratio, missing = _memory_ratio(methods)
        return {"memory_ratio": ratio, "memory_ratio_missing": missing, "paper_memory_ratio": 3.13 / 19.37,
                **_memory_ratios_with_weights(methods)}  # fmt: skip
    better = (lambda m, t: m >= t) if s.kind == "accuracy" else (lambda m, t: m <= t)
    reference = methods["centralized"]["final_metric"] if "centralized" in methods else None
    target = None if reference is None else (reference - 0.01 if s.kind == "accuracy" else reference * 1.01)
    for result in methods.values():
        reached = [p for p in result["curve"] if target is not None and better(p["metric"], target)]
        result["bytes_to_target"] = reached[0]["bytes"] if reached else None
        result["steps_to_target"] = reached[0]["step"] if reached else None
        gap = None if reference is None else result["final_metric"] - reference
        result["gap_to_centralized"] = gap if s.kind == "accuracy" else None if gap is None else gap / reference

    def ratio(a: str, b: str, key: str):
        x, y = (methods.get(a) or {}).get(key), (methods.get(b) or {}).get(key)
        return x / y if x is not None and y else None

    ratios = {}
    for snake in [m for m in methods if m.startswith("snake")]:
        for other in ("fedavg_lora", "split", "cyclic"):
            ratios[f"{snake}/{other} bytes_to_target"] = ratio(snake, other, "bytes_to_target")
            ratios[f"{snake}/{other} bytes_total"] = ratio(snake, other, "bytes_total")
    return {"target": target, "reference_metric": reference, "ratios": ratios}


def result_stem(s: Settings) -> str:
    """`compare_<task>[_<partition>]_<size>[_<payload dtype>][_base-<base dtype>]`: the results' file names (and their run cache's)."""
    split = f"_{s.partition}" + (f"{s.alpha:g}" if s.partition == "dirichlet" else "") if s.kind == "accuracy" else ""
    wire = f"_{s.payload_dtype}" if s.payload_dtype != "float32" else ""  # never overwrite the float32 results
    base = f"_base-{s.base_dtype}" if s.base_dtype != "float32" else ""
    return f"compare_{s.task}{split}_{s.size}{wire}{base}"  # not Path.with_suffix: "dirichlet0.1" has a dot


_LATER_SETTINGS = ("base_dtype",)  # added after committed caches (results/lm_study_runs/) were made


def _cache_key(s: Settings) -> dict:
    """The settings a method's result depends on: all but which methods run and how many threads time them. A setting
    added later is left out while at its default, so the caches made before it stay valid."""
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    return {
        k: v
        for k, v in dataclasses.asdict(s).items()
        if k not in ("methods", "threads") and not (k in _LATER_SETTINGS and v == defaults[k])
    }


def run(s: Settings, in_process: bool = False, cache: Path | None = None) -> dict:
    """Every method of the task. With `cache`, each method's result is kept there as it finishes and reused by a
    later run with the same settings: an interrupted run redoes only what is missing, and runs of disjoint
    `--methods` subsets (e.g. one per core) can be assembled by a final run of all of them."""
    methods = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods_for(s):
            cached = cache / f"{method}.json" if cache is not None else None
            if cached is not None and cached.exists():
                kept = json.loads(cached.read_text())
                if kept["settings"] == _cache_key(s):
                    print(f"{method}: {_fmt_metric(kept['result']['final_metric'])} (cached in {cached})")
                    methods[method] = kept["result"]
                    continue
            print(f"\n=== {s.task} ({s.size}): {method} ===", flush=True)
            start = time.perf_counter()
            methods[method] = run_method(method, s) if in_process else run_in_subprocess(method, s, Path(tmp))
            print(f"{method}: {_fmt_metric(methods[method]['final_metric'])} in {time.perf_counter() - start:.0f} s")
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps({"settings": _cache_key(s), "result": methods[method]}))
    return {
        "task": s.task,
        "settings": dataclasses.asdict(s),
        "total_steps": s.total_steps,
        "metric": s.kind if s.task != "memory_full" else "train_loss",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": s.threads,
        "isolated_processes": not in_process,
        "commit": _commit(),
        "methods": methods,
        "summary": summarise(s, methods),
    }


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent)  # fmt: skip
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _fmt_metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.2f}"


def _snake_options(s: dict) -> str:
    """The Snake library options of the run, when not the defaults (older result files have neither field)."""
    options = []
    if s.get("payload_dtype", "float32") != "float32":
        options.append(f"payloads in {s['payload_dtype']} (the baselines count float32 tensors)")
    if s.get("base_dtype", "float32") != "float32":
        options.append(f"frozen base loaded in {s['base_dtype']} (full fine-tuning: float32)")
    if s.get("recompute"):
        options.append("blocks above the active group recomputed in backward (`recompute_above_group`)")
    if s.get("lm_loss_chunk"):
        options.append(f"causal-LM loss in chunks of {s['lm_loss_chunk']} tokens (`lm_loss_chunk_tokens`; full "
                       "fine-tuning too)")  # fmt: skip
    return f" Snake: {'; '.join(options)}." if options else ""


def to_markdown(results: dict) -> str:
    s, summary = results["settings"], results["summary"]
    steps = "/".join(f"{r['steps']}" for r in results["methods"].values())
    steps = results["total_steps"] if results["task"] != "memory_full" else f"{steps} ({'/'.join(results['methods'])})"
    head = (
        f"Task `{s['task']}` ({s['size']}), {s['num_nodes']} nodes, partition {s['partition']}"
        + (f" (alpha {s['alpha']})" if s["partition"] == "dirichlet" else "")
        + f", {steps} optimizer steps per method, batch {s['batch_size']} x {s['max_length']} tokens, lr "
        f"{s['learning_rate']}, "
        f"seed {s['seed']}, {results['device']} ({s['threads']} torch threads); peak memory is per node above the "
        "loaded model (CPU: resident-set high-water mark)." + _snake_options(s)
    )
    if results["task"] == "memory_full":
        rows = [
            "| method | peak MiB per node (above model) | max | grads+AdamW MiB (largest) | train loss | seconds |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in results["methods"].items():
            per_node = ", ".join(_mib(v) for v in r["peak_memory_per_node"].values())
            rows.append(f"| {name} | {per_node} | {_mib(r['peak_memory_max'])} | {_mib(r['trainable_state_bytes'])} "
                        f"| {r['train_loss']:.4f} | {r['wall_seconds']:.0f} |")  # fmt: skip
        value = summary["memory_ratio"]
        value = f"**{value:.3f}**" if value is not None else f"none ({summary.get('memory_ratio_missing')})"
        ratio = f"\n\nSnake / full fine-tuning peak memory: {value} (paper: 0.16)."
        if "model_state_ratio" in summary:  # docs/precision_and_devices.md: the two numbers, weights included
            with_weights = summary.get("peak_with_weights_ratio")
            ratio += (
                f" With the weights as loaded: model state (weights + gradients + AdamW, analytic) "
                f"**{summary['model_state_ratio']:.3f}**, measured peak "
                + (f"**{with_weights:.3f}**." if with_weights is not None else "not measured.")
            )
        return head + "\n\n" + "\n".join(rows) + ratio
    rows = [
        f"| method | final {results['metric']} | gap to centralized | MiB moved | MiB to target | steps to target "
        "| peak MiB per node (max) | seconds | samples/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["methods"].items():
        gap = r.get("gap_to_centralized")
        gap = (
            "-"
            if gap is None
            else (f"{100 * gap:+.2f} pt" if results["metric"] == "accuracy" else f"{100 * gap:+.2f}%")
        )
        rows.append(
            f"| {name} | {_fmt_metric(r['final_metric'])} | {gap} | {_mib(r['bytes_total'])} "
            f"| {_mib(r.get('bytes_to_target'))} | {r.get('steps_to_target') or '-'} | {_mib(r['peak_memory_max'])} "
            f"| {r['wall_seconds']:.0f} | {r['samples_per_second']:.1f} |"
        )
    target = summary["target"]
    first = next(iter(results["methods"].values()))
    if first.get("shards"):
        counts = [f"node {r['node']}: {r['size']} {r['label_counts']}" for r in first["shards"]["rows"]]
        head += " Shards (size, label counts): " + "; ".join(counts) + "."
    ratios = [f"- {k}: {v:.4g}" for k, v in summary["ratios"].items() if v is not None and "serpentine/" in k]
    return (
        head
        + f" Target: {_fmt_metric(target)} (centralized "
        + ("minus 1 point" if results["metric"] == "accuracy" else "perplexity x 1.01")
        + "); centralized moves the pooled training set.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(ratios)
    )


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = results["methods"]
    fig = Figure(figsize=(16, 4.6) if results["task"] != "memory_full" else (9, 4.6))
    FigureCanvasAgg(fig)
    if results["task"] == "memory_full":
        _plot_memory(results, fig.subplots(1, 1))
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        return
    axes = fig.subplots(1, 3)
    for name, r in methods.items():
        if not r["curve"]:
            continue
        steps, metric, moved = zip(*((p["step"], p["metric"], p["bytes"]) for p in r["curve"]))
        axes[0].plot(steps, metric, marker="o", markersize=3, label=name)
        sent = [(b / 2**20, m) for b, m in zip(moved, metric) if b > 0]  # a log axis has no 0: nothing sent yet
        if sent:
            axes[1].plot(*zip(*sent), marker="o", markersize=3, label=name)
    target = results["summary"]["target"]
    for ax, xlabel in ((axes[0], "optimizer steps (all nodes)"), (axes[1], "MiB moved so far (log)")):
        ax.set(xlabel=xlabel, ylabel=results["metric"], title=f"{results['task']}: {results['metric']}")
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize="small")
    names = list(methods)
    axes[2].bar(range(len(names)), [(methods[n]["peak_memory_max"] or 0) / 2**20 for n in names], color="tab:green")
    axes[2].set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize="small")
    axes[2].set(ylabel="MiB", title="peak memory per node above the loaded model (max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _plot_memory(results: dict, ax) -> None:
    """Full fine-tuning's peak beside each Snake node's, the trainable state (gradients + AdamW moments) hatched
    inside each bar, and the paper's ratio as a line."""
    full, snake = results["methods"]["full_finetune"], results["methods"]["snake_full"]
    names = ["full fine-tuning"] + [f"Snake node {node}" for node in snake["peak_memory_per_node"]]
    peaks = [full["peak_memory_max"], *snake["peak_memory_per_node"].values()]
    state = [full["trainable_state_bytes"]] + [snake["trainable_state_bytes"]] * len(snake["peak_memory_per_node"])
    x = range(len(names))
    ax.bar(x, [(p or 0) / 2**20 for p in peaks], color=["tab:gray"] + ["tab:green"] * (len(names) - 1), label="peak")
    ax.bar(x, [s / 2**20 for s in state], fill=False, hatch="//", edgecolor="black", linewidth=0.5,
           label="of which gradients + AdamW moments (largest group)")  # fmt: skip
    ratio = results["summary"]["memory_ratio"]
    if ratio is not None:
        paper = results["summary"]["paper_memory_ratio"] * full["peak_memory_max"] / 2**20
        label = "paper's ratio (0.16) x full fine-tuning"
        ax.axhline(paper, color="tab:red", linestyle="--", linewidth=1, label=label)
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="MiB above the loaded model", title="peak memory per node: Snake / full fine-tuning = "
           + (f"{ratio:.3f}" if ratio is not None else "none (see the JSON's memory_ratio_missing)"))  # fmt: skip
    ax.legend(fontsize="small")


# ---- command line ----


def parse_settings(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="under 10 minutes on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help="tiny models from configs and synthetic data (seconds)")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where the JSON, markdown and plot go")
    parser.add_argument(
        "--in_process", action="store_true", help="every method in this process (quick tests; memory not isolated)"
    )
    parser.add_argument(
        "--no_cache", action="store_true", help="rerun every method (default: reuse results/compare_runs/<stem>/)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    for field in dataclasses.fields(Settings):
        if field.name != "size":
            kind = _flag if isinstance(field.default, bool) else type(field.default)  # bool("false") is True
            parser.add_argument(f"--{field.name}", type=kind, default=None)
    options = vars(parser.parse_args(argv))
    if options["worker"]:
        return Settings(**json.loads(Path(options["settings"]).read_text())), argparse.Namespace(**options)
    size = "tiny" if options["tiny"] else "quick" if options["quick"] else "full"
    task = options["task"] or "minilm_rt"
    if task not in TASKS:
        parser.error(f"--task must be one of {TASKS}")
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = {k: v for k, v in options.items() if k in fields and v is not None}
    return Settings(**{**PRESETS.get((task, size), {}), **given, "task": task, "size": size}), argparse.Namespace(
        **options
    )


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")
    return text.lower() in ("true", "1")


def main(argv: list[str] | None = None) -> dict:
    s, options = parse_settings(argv)
    if options.worker:
        result = run_method(options.worker, s)
        Path(options.out).write_text(json.dumps(result))
        return result
    folder, stem = Path(options.output_dir), result_stem(s)
    cache = None if options.no_cache else folder / "compare_runs" / stem
    results = run(s, options.in_process, cache)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=2))
    table = to_markdown(results)
    (folder / f"{stem}.md").write_text(f"# Snake vs the baselines: {s.task} ({s.size})\n\n{table}\n")
    plot(results, folder / f"{stem}.png")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
