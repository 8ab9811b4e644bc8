"""In-process baselines that Snake Learning is measured against, on any Hugging Face model with PEFT adapters.

* `run_centralized`: plain `transformers.Trainer` on the pooled data (the accuracy ceiling).
* `run_fedavg`: N nodes train every adapter in parallel rounds from the same start; a server averages them weighted
  by shard size (FlowerTune-style FedAvg on LoRA).
* `run_cyclic`: the whole adapter is passed from node to node (cyclic weight transfer); every node trains every layer.
* `run_split`: split learning at a cut block: the cut-layer activations go to the server and their gradients come
  back on every step; the client-side adapter is passed on when the next node takes over.

Every method trains the same number of optimizer steps with the same optimizer as `Trainer` (AdamW without weight
decay, linear schedule with warm-up, gradient norm clipped), a fresh optimizer whenever the trained state moves to
another node, and records a curve of `(steps, metric, bytes moved so far)` plus the peak memory of every node above
the loaded model (`NodePeaks`). Bytes are what the method must send: FedAvg 2 x N x adapter bytes per round
(download and upload), cyclic one adapter per hop, split the real cut-layer tensors of every step. Raw tensor bytes
only: no framing or manifest (Snake's payloads carry one, and it is counted for Snake).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from snake_hf.blocks import find_block_list
from snake_hf.memory import PeakMemory


@dataclass
class Budget:
    """The optimizer-step budget every method shares: `rounds` x `num_nodes` x `stage_steps` steps in all."""

    num_nodes: int
    rounds: int
    stage_steps: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 42

    @property
    def total_steps(self) -> int:
        return self.rounds * self.num_nodes * self.stage_steps

    def warmup(self, timeline: int) -> int:
        """Warm-up steps of a schedule `timeline` optimizer steps long."""
        return math.ceil(self.warmup_ratio * timeline)


def linear_lr(step: int, total: int, warmup: int, base: float) -> float:
    """`Trainer`'s linear schedule with warm-up (`get_linear_schedule_with_warmup`) at optimizer step `step`."""
    if step < warmup:
        return base * step / max(1, warmup)
    return base * max(0.0, (total - step) / max(1, total - warmup))


# ---- memory ----


class NodePeaks:
    """Peak memory of each node above what was resident when this object was made (the loaded model and data).

    CPU: the process's resident-set high-water mark (`VmHWM`, reset per node's turn); GPU:
    `torch.cuda.max_memory_allocated` above `torch.cuda.memory_allocated`.
    """

    def __init__(self, device: torch.device):
        self.meter = PeakMemory(device)
        self.kind = self.meter.kind
        cuda = self.meter.device.type == "cuda"
        self.baseline = int(torch.cuda.memory_allocated(device) if cuda else PeakMemory.current_rss() or 0)
        self.peaks: dict[int, int] = {}

    def record(self, node: int, absolute: int | None) -> None:
        if absolute is not None:
            self.peaks[node] = max(self.peaks.get(node, 0), absolute - self.baseline)

    @contextlib.contextmanager
    def track(self, node: int):
        self.meter.reset()
        yield
        self.record(node, self.meter.read())


# ---- evaluation and curves ----


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: datasets.Dataset,
    collator: Callable,
    batch_size: int,
    kind: str,
    example_losses: list[float] | None = None,
) -> float:
    """Accuracy (`kind="accuracy"`) or perplexity (`"perplexity"`: exp of the mean loss per predicted token).

    Runs in eval mode without drawing random numbers and restores every module's mode afterwards, so it can run
    between training steps without changing the run. For perplexity, `example_losses` (when given) receives each
    example's mean token loss, from which a standard error follows ([`perplexity_standard_error`]).
    """
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    model.eval()
    hits, count, loss_sum = 0, 0, 0.0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch = {k: v.to(device) for k, v in batch.items()}
            if kind == "accuracy":
                output = model(**batch)
                hits += int((output.logits.argmax(-1) == batch["labels"]).sum())
                count += len(batch["labels"])
                continue
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]  # the model shifts labels by one
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
            tokens = (targets != -100).sum(dim=1)
            loss_sum += float(losses.sum())
            count += int(tokens.sum())
            if example_losses is not None:
                example_losses.extend((losses.sum(dim=1) / tokens.clamp(min=1)).tolist())
    finally:
        for module, training in modes.items():
            module.training = training
    return hits / count if kind == "accuracy" else math.exp(loss_sum / count)


def perplexity_standard_error(example_losses: list[float]) -> float:
    """Standard error of the perplexity exp(mean loss) over equally long examples (the delta method:
    ppl x the standard error of the mean loss)."""
    n = len(example_losses)
    if n < 2:
        return float("nan")
    mean = sum(example_losses) / n
    variance = sum((x - mean) ** 2 for x in example_losses) / (n - 1)
    return math.exp(mean) * math.sqrt(variance / n)


class Curve:
    """Points `{"step", "metric", "bytes", "seconds"}` of a run, and the seconds spent measuring them.

    A point's `seconds` is the training time since the curve was made (right before training starts), the time spent
    measuring the earlier points excluded: curves against wall time compare training time alone.
    """

    def __init__(self, measure: Callable[[], float]):
        self.measure = measure
        self.points: list[dict] = []
        self.seconds = 0.0
        self.started = time.perf_counter()

    def add(self, step: int, bytes_moved: int) -> None:
        start = time.perf_counter()
        point = {"step": step, "bytes": int(bytes_moved), "seconds": start - self.started - self.seconds}
        self.points.append({**point, "metric": self.measure()})
        self.seconds += time.perf_counter() - start


class CurveCallback(TrainerCallback):
    """Adds a point to `curve` after each of `at_steps` (global optimizer steps) of a `Trainer` run."""

    def __init__(self, curve: Curve, at_steps, bytes_moved: Callable[[], int]):
        self.curve, self.at_steps, self.bytes_moved = curve, set(at_steps), bytes_moved

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at_steps:
            self.curve.add(state.global_step, self.bytes_moved())


def method_result(
    curve: Curve, bytes_total: int, steps: int, budget: Budget, seconds: float, peaks: NodePeaks, **extra
):
    """The fields every method reports (wall time and throughput exclude the time spent on evaluation)."""
    train_seconds = max(seconds - curve.seconds, 1e-9)
    return {
        "final_metric": curve.points[-1]["metric"] if curve.points else None,
        "curve": curve.points,
        "bytes_total": int(bytes_total),
        "steps": steps,
        "peak_memory_per_node": {str(node): peak for node, peak in sorted(peaks.peaks.items())},
        "peak_memory_max": max(peaks.peaks.values(), default=None),
        "memory_baseline": peaks.baseline,
        "memory_kind": peaks.kind,
        "wall_seconds": train_seconds,
        "eval_seconds": curve.seconds,
        "samples_per_second": steps * budget.batch_size / train_seconds,
        **extra,
    }


# ---- shared training loop ----


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train (LoRA adapters and PEFT's `modules_to_save`): the adapter that travels."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def node_batches(shard: datasets.Dataset, batch_size: int, collator: Callable, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of one node's shard (a new permutation every epoch, last batch kept)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(shard), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collator([shard[i] for i in order[start : start + batch_size]])


def _adamw(params) -> torch.optim.Optimizer:
    # Trainer's default optimizer (adamw_torch_fused; weight decay 0 in these benchmarks); lr is set every step.
    return torch.optim.AdamW(list(params), lr=0.0, weight_decay=0.0, fused=True)


def train_steps(model: nn.Module, batches: Iterator, lrs: list[float], budget: Budget, step_fn=None) -> float:
    """One optimizer step per entry of `lrs` with a fresh AdamW over the trainable parameters; mean loss."""
    device = next(model.parameters()).device
    params = list(trainable(model).values())
    optimizer = _adamw(params)
    model.train()
    total = 0.0
    for lr in lrs:
        optimizer.param_groups[0]["lr"] = lr
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, budget.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item()
    return total / max(len(lrs), 1)


def _load(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Average of state dicts (FedAvg), weighted; integer tensors (e.g. batch-norm counters) are rounded."""
    average = {}
    for name, first in states[0].items():
        total = sum(w * state[name].double() for w, state in zip(weights, states))
        average[name] = (total.round() if not first.is_floating_point() else total).to(first.dtype)
    return average


# ---- the methods ----


def run_centralized(model, train, budget: Budget, collator, measure, peaks: NodePeaks, output_dir: str) -> dict:
    """Plain `Trainer` on the pooled data for the whole budget; a curve point every `num_nodes * stage_steps`."""
    total = budget.total_steps
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=total,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=budget.warmup(total),
        weight_decay=0.0,
        max_grad_norm=budget.max_grad_norm,
        seed=budget.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model, args, train_dataset=train, data_collator=collator)
    trainer.remove_callback(PrinterCallback)
    curve = Curve(measure)
    data_bytes = train.data.nbytes  # the pooled training set (tokenized, as stored) had to move to one place
    every = budget.num_nodes * budget.stage_steps
    trainer.add_callback(CurveCallback(curve, range(every, total + 1, every), lambda: data_bytes))
    start = time.perf_counter()
    with peaks.track(0):
        trainer.train()
    return method_result(curve, data_bytes, total, budget, time.perf_counter() - start, peaks, messages=0)


def run_fedavg(model, shards, budget: Budget, collator, measure, peaks: NodePeaks) -> dict:
    """FedAvg on the adapters: per round each node trains `stage_steps` steps from the global adapter, then the
    server averages them weighted by shard size. Each node's schedule spans `rounds * stage_steps` local steps."""
    params = trainable(model)
    adapter_bytes = nbytes(params.values())
    sizes = [len(shard) for shard in shards]
    weights = [size / sum(sizes) for size in sizes]
    streams = [node_batches(shard, budget.batch_size, collator, budget.seed + n) for n, shard in enumerate(shards)]
    timeline = budget.rounds * budget.stage_steps
    warmup = budget.warmup(timeline)
    per_round = 2 * len(shards) * adapter_bytes  # every node downloads and uploads the whole adapter
    curve = Curve(measure)
    start = time.perf_counter()
    global_state = {name: p.detach().clone() for name, p in params.items()}
    for r in range(budget.rounds):
        states = []
        first = r * budget.stage_steps
        lrs = [linear_lr(first + j, timeline, warmup, budget.learning_rate) for j in range(budget.stage_steps)]
        for node, stream in enumerate(streams):
            _load(params, global_state)
            with peaks.track(node):
                train_steps(model, stream, lrs, budget)
            states.append({name: p.detach().clone() for name, p in params.items()})
        global_state = weighted_average(states, weights)
        _load(params, global_state)
        curve.add((r + 1) * len(shards) * budget.stage_steps, (r + 1) * per_round)
    return method_result(
        curve, budget.rounds * per_round, budget.total_steps, budget, time.perf_counter() - start, peaks,
        adapter_bytes=adapter_bytes, bytes_per_round=per_round, rounds=budget.rounds,
        messages=2 * len(shards) * budget.rounds,
    )  # fmt: skip


def _visits(budget: Budget) -> list[int]:
    """Node of every visit: 0..N-1 in every cycle (`rounds` cycles)."""
    return [node for _ in range(budget.rounds) for node in range(budget.num_nodes)]


def run_cyclic(model, shards, budget: Budget, collator, measure, peaks: NodePeaks) -> dict:
    """Cyclic weight transfer: node after node trains the whole adapter for `stage_steps` steps and hands it on."""
    adapter_bytes = nbytes(trainable(model).values())
    streams = [node_batches(shard, budget.batch_size, collator, budget.seed + n) for n, shard in enumerate(shards)]
    total, warmup, s = budget.total_steps, budget.warmup(budget.total_steps), budget.stage_steps
    curve = Curve(measure)
    moved, hops = 0, 0
    start = time.perf_counter()
    for v, node in enumerate(_visits(budget)):
        if v > 0:  # the previous node sends the whole adapter (+ head)
            moved, hops = moved + adapter_bytes, hops + 1
        lrs = [linear_lr(v * s + j, total, warmup, budget.learning_rate) for j in range(s)]
        with peaks.track(node):
            train_steps(model, streams[node], lrs, budget)
        curve.add((v + 1) * s, moved)
    return method_result(
        curve, moved, total, budget, time.perf_counter() - start, peaks,
        adapter_bytes=adapter_bytes, hops=hops, messages=hops,
    )  # fmt: skip


class _CutHook:
    """Cuts autograd at a block's output: the server's part of the graph starts from a leaf copy of the activations,
    whose gradient is what the server sends back; the client's part is then run backward from that gradient."""

    def __init__(self):
        self.client_output = self.server_input = None

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.client_output = hidden
        self.server_input = hidden.detach().requires_grad_(True)
        return (self.server_input, *output[1:]) if isinstance(output, tuple) else self.server_input


def split_parts(model: nn.Module, cut: int) -> tuple[dict, dict]:
    """Trainable parameters of the client (blocks below `cut`, and anything before the blocks) and the server."""
    path, blocks = find_block_list(model)
    if not 0 < cut < len(blocks):
        raise ValueError(
            f"`cut_layer` ({cut}) must lie between 1 and {len(blocks) - 1} (the model has {len(blocks)})."
        )
    pattern = re.compile(rf"(?:^|\.){re.escape(path)}\.(\d+)\.")
    client, server = {}, {}
    for name, param in trainable(model).items():
        match = pattern.search(name)
        below = match is not None and int(match.group(1)) < cut
        (client if below else server)[name] = param
    return client, server


def run_split(model, shards, budget: Budget, collator, measure, peaks: NodePeaks, cut: int) -> dict:
    """Split learning: node after node (as in cyclic), each step sends the activations at block `cut` (with the
    attention mask and labels) to the server and receives their gradient; the client adapter follows the nodes."""
    client, server = split_parts(model, cut)
    client_bytes = nbytes(client.values())
    blocks = find_block_list(model)[1]
    streams = [node_batches(shard, budget.batch_size, collator, budget.seed + n) for n, shard in enumerate(shards)]
    total, warmup, s = budget.total_steps, budget.warmup(budget.total_steps), budget.stage_steps
    device = next(model.parameters()).device
    server_optimizer = _adamw(server.values())  # the server trains throughout: its state persists
    curve = Curve(measure)
    per_step, handoffs = [], 0
    hook = _CutHook()
    start = time.perf_counter()
    for v, node in enumerate(_visits(budget)):
        if v > 0:
            handoffs += 1  # the previous client hands the client-side adapter to this one
        client_optimizer = _adamw(client.values())
        handle = blocks[cut - 1].register_forward_hook(hook)
        model.train()
        with peaks.track(node):
            for j in range(s):
                lr = linear_lr(v * s + j, total, warmup, budget.learning_rate)
                batch = {k: t.to(device) for k, t in next(streams[node]).items()}
                loss = model(**batch).loss
                loss.backward()  # server side, down to the cut
                gradient = hook.server_input.grad
                hook.client_output.backward(gradient)  # client side, from the gradient the server sent back
                forward = hook.server_input.nbytes + batch["labels"].nbytes + batch["attention_mask"].nbytes
                per_step.append([forward, gradient.nbytes])
                for optimizer, params in ((client_optimizer, client), (server_optimizer, server)):
                    torch.nn.utils.clip_grad_norm_(list(params.values()), budget.max_grad_norm)
                    optimizer.param_groups[0]["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        handle.remove()
        curve.add((v + 1) * s, sum(f + b for f, b in per_step) + handoffs * client_bytes)
    activation_bytes = sum(f + b for f, b in per_step)
    return method_result(
        curve, activation_bytes + handoffs * client_bytes, total, budget, time.perf_counter() - start, peaks,
        cut_layer=cut, step_bytes=per_step, activation_bytes=activation_bytes, client_adapter_bytes=client_bytes,
        handoffs=handoffs, messages=2 * len(per_step) + handoffs,
    )  # fmt: skip
