"""Snake Learning vs FedAvg vs centralized training of a VGG-11-style CNN from scratch on Fashion-MNIST.

The paper's vision case (VGG-11, full-parameter mode), with Fashion-MNIST standing in for CIFAR-10. Every method
starts from the same initial weights (seed), sees the same shards, and takes the same number of optimizer steps
(summed over nodes) with the same optimizer (AdamW, linear decay to 0, gradient norm clipped at 1.0) and batch size:

* **Snake**: `SnakeTrainer` in full mode, serpentine plan over N nodes and G block groups, P passes, s steps per
  stage: T = N*G*P*s steps. Bytes moved: every hop's payload (the groups' weights and batch-norm statistics the
  receiver lacks, plus a manifest), from the run's report.
* **FedAvg**: G*P rounds; in each, every node trains the whole model for s local steps from the global model on its
  shard (a fresh AdamW each round), then a server averages the weights AND the batch-norm buffers, weighted by shard
  size. T = rounds*N*s steps. Bytes moved: 2 x model bytes x N per round (download and upload).
* **Cyclic** (cyclic weight transfer): one model visits the nodes 0..N-1 in G*P cycles; each visit trains the whole
  model for s steps (FedAvg's local training: a fresh AdamW, the global schedule) and hands it on. T = cycles*N*s
  steps. Bytes moved: the whole model (weights and batch-norm buffers) per hop. `--cyclic 0` leaves it out.
* **Centralized**: plain `Trainer` on the pooled training data for T steps (the data itself moves to one place).

Held-out accuracy is measured after every Snake stage, every FedAvg round and every s centralized steps. Peak
memory per node is the process's resident-set high-water mark (`snake_hf.memory.PeakMemory`, VmHWM on Linux),
reset before each node's work: it includes the Python process itself, so the analytic column (gradients and AdamW
state of what trains, the part that differs between methods) is the clearer comparison.

Usage:
    python benchmarks/vision.py --quick   # minutes on 2 CPU cores: benchmarks/results/vision_quick.{json,md,png}
    python benchmarks/vision.py           # full size (60k images, wider model): about an hour per method on 2 CPU cores
    python benchmarks/vision.py --name half --train_size 30000 --eval_size 5000 --width 0.25 --batch_size 32 \
        --stage_steps 100 --threads 1   # half the training set, 5x quick's steps: minutes per method
    python benchmarks/vision.py --quick --num_nodes 5 --alpha 0.5   # any setting can be overridden
    python benchmarks/vision.py --quick --variants "bn + calibration (full),proximal 0.01" \
        --workdir benchmarks/results/vision_runs_quick   # chosen mitigations; each method's result kept and reused

Label-skew mitigations (`MITIGATIONS`, `--variants` on the Dirichlet split, `--iid_variants` on the IID one): the
SnakeConfig options (logit adjustment, restricted softmax, `proximal_mu`, `recompute_batchnorm`, `head_calibration`)
and two plan choices: the same steps as more or fewer passes of shorter or longer stages, and the most balanced shard
on the node that trains last. Accuracy is measured after the run, after the final pass where there is one; the final
pass's hops count in the bytes. `vision_<name>_skew.png` plots the Dirichlet split's accuracy against bytes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import torch
from baselines import weighted_average  # benchmarks/baselines.py (this folder is on sys.path as a script)
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.data.shards import make_partitioner
from snake_hf.data.summary import shard_summary
from snake_hf.memory import PeakMemory
from snake_hf.recipes.assets import load_fashion_mnist
from snake_hf.recipes.vision import (
    BLOCK_LIST_PATH,
    VGG11,
    AccuracyCurveCallback,
    classification_accuracy,
    stage_end_steps,
)


RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Settings:
    """One benchmark size; every field is also a command-line flag."""

    name: str = "full"
    train_size: int = 60_000
    eval_size: int = 5_000
    width: float = 0.5
    num_nodes: int = 3
    num_groups: int = 3
    num_passes: int = 2
    stage_steps: int = 80
    batch_size: int = 64
    learning_rate: float = 1e-3
    alpha: float = 0.1
    seed: int = 42
    threads: int = 2
    eval_batch_size: int = 250
    variants: str = "all"  # comma-separated names of MITIGATIONS run on the Dirichlet split, or "all" / "none"
    iid_variants: str = "none"  # the same, on the IID split
    workdir: str = ""  # keep every method's result here and reuse it on a rerun of the same settings ("": none)
    splits: str = "iid,dirichlet"  # which splits to run
    cyclic: int = 1  # also run cyclic weight transfer (1) or not (0)

    @property
    def total_steps(self) -> int:
        return self.num_nodes * self.num_groups * self.num_passes * self.stage_steps


# Snake's label-skew mitigations, run on the Dirichlet split besides plain Snake: SnakeConfig fields, plus two plan
# choices the benchmark makes itself: "passes" (the same steps as more passes of shorter stages) and "balanced_last"
# (the most balanced shard, by label entropy, on the node that trains last).
MITIGATIONS = {
    "logit adjustment": {"logit_adjustment": 1.0},
    "restricted softmax": {"restrict_to_node_classes": True},
    "proximal 0.01": {"proximal_mu": 0.01},
    "proximal 0.1": {"proximal_mu": 0.1},
    "bn recompute": {"recompute_batchnorm": True},
    "calibration (diag)": {"head_calibration": "diagonal"},
    "calibration (full)": {"head_calibration": "full"},
    "bn + calibration (full)": {"recompute_batchnorm": True, "head_calibration": "full"},
    "bn + calibration (diag)": {"recompute_batchnorm": True, "head_calibration": "diagonal"},
    "4 passes x half stages": {"passes": 2},
    "1 pass x double stages": {"passes": 0.5},
    "balanced node last": {"balanced_last": True},
    "bn + calibration + 4 passes": {"recompute_batchnorm": True, "head_calibration": "full", "passes": 2},
    "bn + calibration + 1 pass": {"recompute_batchnorm": True, "head_calibration": "full", "passes": 0.5},
    "bn + calibration + 1 pass + balanced last": {
        "recompute_batchnorm": True,
        "head_calibration": "full",
        "passes": 0.5,
        "balanced_last": True,
    },
    "bn + calibration + balanced last": {
        "recompute_batchnorm": True,
        "head_calibration": "full",
        "balanced_last": True,
    },
    "bn + calibration + logit adjustment": {
        "recompute_batchnorm": True,
        "head_calibration": "full",
        "logit_adjustment": 1.0,
    },
}
QUICK = dict(name="quick", train_size=6_000, eval_size=1_000, width=0.25, stage_steps=20, batch_size=32, threads=1)


def build_model(s: Settings) -> VGG11:
    set_seed(s.seed)  # every method starts from the same weights
    return VGG11(num_classes=10, in_channels=1, width_multiplier=s.width)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _trainable_state_bytes(parameters) -> int:
    """Gradients plus AdamW's two moments of the parameters that train (float32)."""
    return 3 * _nbytes(parameters)


def _quiet_args(s: Settings, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        lr_scheduler_type="linear",
        seed=s.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
    )


# ---- Snake ----


def _entropy(shard: datasets.Dataset) -> float:
    counts = torch.bincount(torch.as_tensor(shard["labels"]).reshape(-1)).double()
    share = counts[counts > 0] / counts.sum()
    return float(-(share * share.log2()).sum())


def _balanced_last(s: Settings, shards: list[datasets.Dataset], passes: int) -> list[datasets.Dataset]:
    """The shards reordered so that the most balanced one (label entropy) sits on the node that trains last."""
    from snake_hf.plan import serpentine_plan

    last = serpentine_plan(s.num_nodes, s.num_groups, passes, s.stage_steps)[-1].node
    best = max(range(len(shards)), key=lambda n: _entropy(shards[n]))
    order = list(range(len(shards)))
    order[last], order[best] = order[best], order[last]
    return [shards[n] for n in order]


def run_snake(
    s: Settings, shards: list[datasets.Dataset], test: datasets.Dataset, output_dir: str, **mitigation
) -> dict:
    mitigation = dict(mitigation)
    factor = mitigation.pop("passes", 1)  # more (or fewer) passes of proportionally shorter stages: the same steps
    if mitigation.pop("balanced_last", False):
        shards = _balanced_last(s, shards, round(s.num_passes * factor))
    args = SnakeConfig(
        num_train_epochs=1,
        num_nodes=s.num_nodes,
        num_block_groups=s.num_groups,
        num_passes=round(s.num_passes * factor),
        stage_steps=round(s.stage_steps / factor),
        train_mode="full",
        block_list_path=BLOCK_LIST_PATH,
        partition_label_column="labels",
        **mitigation,
        **_quiet_args(s, output_dir),
    )
    trainer = SnakeTrainer(build_model(s), args, train_dataset=shards)
    trainer.remove_callback(PrinterCallback)  # the stage table below says it all
    curve = AccuracyCurveCallback(test, stage_end_steps(trainer.plan), s.eval_batch_size)
    trainer.add_callback(curve)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if curve.curve[-1][0] != trainer.total_steps:  # (measured at the last stage's end, after any final pass)
        curve.curve.append((trainer.total_steps, classification_accuracy(trainer.model, test, s.eval_batch_size)))
    report = trainer.snake_report
    groups = [trainer.part_map.params[f"g{g}"] for g in range(trainer.groups.num_groups)]
    params = dict(trainer.model.named_parameters())
    return {
        "curve": curve.curve,
        "bytes_moved": report.total_bytes,
        "tensor_bytes_moved": sum(hop.tensor_nbytes for hop in report.hops),
        "messages": len(report.hops),
        "peak_rss_per_node": {str(k): v for k, v in report.peak_memory_per_node().items()},
        "trainable_state_bytes": max(_trainable_state_bytes(params[n] for n in names) for names in groups),
        "seconds": seconds,
        "stages": report.to_markdown(),
    }


# ---- FedAvg, in process ----


def _batches(shard: datasets.Dataset, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of one node's shard (a new permutation every epoch)."""
    data = shard[:]
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(shard), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield {"pixel_values": data["pixel_values"][index], "labels": data["labels"][index]}


def _local_training(model: VGG11, batches: Iterator, s: Settings, first_step: int, total_steps: int) -> None:
    """`s.stage_steps` AdamW steps with a fresh optimizer, on the global linear schedule (as `Trainer` does)."""
    device = next(model.parameters()).device
    model.train()
    # Trainer's default optimizer (adamw_torch_fused, no weight decay).
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=0.0, fused=True)
    for step in range(first_step, first_step + s.stage_steps):
        optimizer.param_groups[0]["lr"] = s.learning_rate * (1 - step / total_steps)
        batch = {k: v.to(device) for k, v in next(batches).items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_fedavg(s: Settings, shards: list[datasets.Dataset], test: datasets.Dataset, device: torch.device) -> dict:
    global_model = build_model(s).to(device)
    local = copy.deepcopy(global_model)
    sizes = [len(shard) for shard in shards]
    weights = [size / sum(sizes) for size in sizes]
    rounds = s.num_groups * s.num_passes
    streams = [_batches(shard, s.batch_size, s.seed + node) for node, shard in enumerate(shards)]
    meter, peaks = PeakMemory(device), [0] * len(shards)
    curve = [(0, classification_accuracy(global_model, test, s.eval_batch_size))]
    start = time.perf_counter()
    for round_index in range(rounds):
        states = []
        for node, stream in enumerate(streams):
            meter.reset()
            local.load_state_dict(global_model.state_dict())
            _local_training(local, stream, s, round_index * s.stage_steps, rounds * s.stage_steps)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            peaks[node] = max(peaks[node], meter.read() or 0)
        global_model.load_state_dict(weighted_average(states, weights))  # batch-norm buffers too
        steps = (round_index + 1) * len(shards) * s.stage_steps
        curve.append((steps, classification_accuracy(global_model, test, s.eval_batch_size)))
    model_bytes = _nbytes(global_model.state_dict().values())
    return {
        "curve": curve,
        "bytes_moved": 2 * model_bytes * len(shards) * rounds,
        "tensor_bytes_moved": 2 * model_bytes * len(shards) * rounds,
        "messages": 2 * len(shards) * rounds,
        "peak_rss_per_node": {str(n): v for n, v in enumerate(peaks)},
        "trainable_state_bytes": _trainable_state_bytes(global_model.parameters()),
        "seconds": time.perf_counter() - start,
    }


def run_cyclic(s: Settings, shards: list[datasets.Dataset], test: datasets.Dataset, device: torch.device) -> dict:
    """Cyclic weight transfer: one model visits the nodes 0..N-1 in G*P cycles; every visit trains the whole model for
    `s.stage_steps` local steps (a fresh AdamW, on the global schedule, as FedAvg's local training) and hands the whole
    model (weights and batch-norm buffers) to the next node. T = cycles*N*s steps, as every method."""
    model = build_model(s).to(device)
    cycles = s.num_groups * s.num_passes
    streams = [_batches(shard, s.batch_size, s.seed + node) for node, shard in enumerate(shards)]
    meter, peaks = PeakMemory(device), [0] * len(shards)
    curve = [(0, classification_accuracy(model, test, s.eval_batch_size))]
    total = cycles * len(shards) * s.stage_steps
    start = time.perf_counter()
    for cycle in range(cycles):
        for node, stream in enumerate(streams):
            meter.reset()
            visit = cycle * len(shards) + node
            _local_training(model, stream, s, visit * s.stage_steps, total)
            peaks[node] = max(peaks[node], meter.read() or 0)
        curve.append(
            ((cycle + 1) * len(shards) * s.stage_steps, classification_accuracy(model, test, s.eval_batch_size))
        )
    model_bytes = _nbytes(model.state_dict().values())
    hops = cycles * len(shards) - 1  # every visit but the first receives the whole model
    return {
        "curve": curve,
        "bytes_moved": model_bytes * hops,
        "tensor_bytes_moved": model_bytes * hops,
        "messages": hops,
        "peak_rss_per_node": {str(n): v for n, v in enumerate(peaks)},
        "trainable_state_bytes": _trainable_state_bytes(model.parameters()),
        "seconds": time.perf_counter() - start,
    }


# ---- centralized ----


def run_centralized(s: Settings, train: datasets.Dataset, test: datasets.Dataset, output_dir: str) -> dict:
    args = TrainingArguments(max_steps=s.total_steps, **_quiet_args(s, output_dir))
    model = build_model(s)
    trainer = Trainer(model, args, train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    curve = AccuracyCurveCallback(test, range(s.stage_steps, s.total_steps + 1, s.stage_steps), s.eval_batch_size)
    trainer.add_callback(curve)
    meter = PeakMemory(args.device)
    meter.reset()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "curve": curve.curve,
        "bytes_moved": _nbytes(train[:].values()),  # the training set itself, as stored, pooled in one place
        "tensor_bytes_moved": _nbytes(train[:].values()),
        "messages": 0,
        "peak_rss_per_node": {"0": meter.read()},
        "trainable_state_bytes": _trainable_state_bytes(model.parameters()),
        "seconds": seconds,
    }


# ---- the comparison ----


def run(s: Settings) -> dict:
    torch.set_num_threads(s.threads)
    train = load_fashion_mnist("train", s.train_size)  # raises with `apt-get install -y dataset-fashion-mnist`
    test = load_fashion_mnist("test", s.eval_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "settings": dataclasses.asdict(s),
        "total_steps": s.total_steps,
        "device": str(device),
        "snake_hf_commit": _commit(),
        "splits": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cached = partial(_cached, s)
        for split, kwargs in (
            ("iid", {}),
            (f"dirichlet-{s.alpha}", {"alpha": s.alpha, "label_column": "labels", "min_size": s.batch_size}),
        ):
            kind = split.split("-")[0]
            if kind not in s.splits.split(","):
                continue
            shards = make_partitioner(kind, s.num_nodes, seed=s.seed, **kwargs).split(train)
            summary = shard_summary(shards, "labels")
            print(f"\n{split} shards:\n{summary.to_markdown()}", flush=True)
            print(f"snake ({split}) ...", flush=True)
            snake = cached(f"{split}_snake", run_snake, s, shards, test, f"{tmp}/snake-{split}")
            print(snake.pop("stages", ""), flush=True)
            methods = {"snake": snake}
            print(f"fedavg ({split}) ...", flush=True)
            fedavg = cached(f"{split}_fedavg", run_fedavg, s, shards, test, device)
            # the library's label-skew mitigations (SnakeConfig), measured
            for name in _variants(s.variants if kind == "dirichlet" else s.iid_variants):
                print(f"snake + {name} ({split}) ...", flush=True)
                methods[f"snake + {name}"] = cached(
                    f"{split}_{name}", run_snake, s, shards, test, f"{tmp}/snake-{name}", **MITIGATIONS[name]
                )
                print(methods[f"snake + {name}"].pop("stages", ""), flush=True)
            methods["fedavg"] = fedavg
            if s.cyclic:
                print(f"cyclic ({split}) ...", flush=True)
                methods["cyclic"] = cached(f"{split}_cyclic", run_cyclic, s, shards, test, device)
            results["splits"][split] = {"shards": summary.to_dict(), "methods": methods}
        print(f"centralized: {s.total_steps} steps on {len(train)} pooled images ...", flush=True)
        centralized = cached("centralized", run_centralized, s, train, test, f"{tmp}/centralized")
        for entry in results["splits"].values():
            entry["methods"]["centralized"] = centralized
    return results


def _cached(s: Settings, key: str, compute, *args, **kwargs) -> dict:
    """`compute(*args, **kwargs)`, or its result kept in `s.workdir` by an earlier run of the same settings."""
    if not s.workdir:
        return compute(*args, **kwargs)
    what = ("name", "variants", "iid_variants", "workdir", "splits", "threads", "cyclic")  # not what a method computes
    fields = {k: v for k, v in dataclasses.asdict(s).items() if k not in what}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(s.workdir) / f"{digest}_{key.replace(' ', '_')}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = compute(*args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _variants(names: str) -> list[str]:
    if names == "all":
        return list(MITIGATIONS)
    chosen = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in chosen if n not in MITIGATIONS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(MITIGATIONS)}")
    return chosen


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def to_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"Fashion-MNIST, VGG-11-style CNN (width x{s['width']}) from scratch, {s['num_nodes']} nodes, "
        f"{results['total_steps']} optimizer steps per method (summed over nodes), batch {s['batch_size']}, AdamW "
        f"lr {s['learning_rate']} linear decay, seed {s['seed']}; {s['train_size']} training / {s['eval_size']} "
        f"held-out images; {results['device']}. Snake: {s['num_groups']} groups, {s['num_passes']} passes, "
        f"{s['stage_steps']} steps per stage. FedAvg: {s['num_groups'] * s['num_passes']} rounds of "
        f"{s['stage_steps']} local steps. Centralized: the pooled data (its bytes are the training set's).",
        "",
        "Peak RSS is the whole process's resident-set high-water mark per node (mostly the Python process itself); "
        "the grads+AdamW column is what differs between methods. Seconds are wall time on a shared machine.",
        "",
        "| split | method | final acc. | best acc. | MiB moved | messages | peak RSS per node (MiB) "
        "| grads+AdamW per node (MiB) | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for split, entry in results["splits"].items():
        for method, r in entry["methods"].items():
            accuracies = [a for _, a in r["curve"]]
            peaks = ", ".join(f"{v / 2**20:.0f}" for v in r["peak_rss_per_node"].values() if v)
            lines.append(
                f"| {split} | {method} | {accuracies[-1]:.4f} | {max(accuracies):.4f} | {r['bytes_moved'] / 2**20:.2f} "
                f"| {r['messages']} | {peaks} | {r['trainable_state_bytes'] / 2**20:.2f} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines)


COLORS = {
    "snake": "tab:blue",
    "snake + logit adjustment": "tab:cyan",
    "snake + restricted softmax": "tab:purple",
    "fedavg": "tab:orange",
    "cyclic": "tab:brown",
    "centralized": "tab:green",
}


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = results["splits"]
    fig = Figure(figsize=(5.5 * len(splits), 4.4))
    FigureCanvasAgg(fig)
    for i, (split, entry) in enumerate(splits.items()):
        ax = fig.add_subplot(1, len(splits), i + 1)
        for method, r in entry["methods"].items():
            steps, accuracies = zip(*r["curve"])
            ax.plot(steps, accuracies, marker="o", markersize=3, label=method, color=COLORS.get(method))
        ax.set(title=f"Fashion-MNIST, {split}", xlabel="optimizer steps (all nodes)", ylabel="held-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    handles, labels = max((ax.get_legend_handles_labels() for ax in fig.axes), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)


def plot_skew(results: dict, path: Path) -> None:
    """The Dirichlet split: every method's final accuracy against the bytes it moved (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    split = next((k for k in results["splits"] if k.startswith("dirichlet")), None)
    if split is None:
        return
    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, r in results["splits"][split]["methods"].items():
        x, y = r["bytes_moved"] / 2**20, r["curve"][-1][1]
        color = COLORS.get(method, "tab:red" if "calibration" in method or "bn" in method else "tab:gray")
        ax.scatter([x], [y], color=color, s=30)
        ax.annotate(method, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="MiB moved (log scale)", ylabel="held-out accuracy", ylim=(0, 1),
           title=f"Fashion-MNIST, {split}: accuracy against bytes")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=None)
    options = vars(parser.parse_args(argv))
    base = QUICK if options.pop("quick") else {}
    return Settings(**{**base, **{k: v for k, v in options.items() if v is not None}})


def main(argv: list[str] | None = None) -> dict:
    logging.set_verbosity_error()
    s = parse_settings(argv)
    results = run(s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"vision_{s.name}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = to_markdown(results)
    stem.with_suffix(".md").write_text(
        f"# Snake vs FedAvg vs centralized: VGG-11 on Fashion-MNIST ({s.name})\n\n{table}\n"
    )
    plot(results, stem.with_suffix(".png"))
    plot_skew(results, RESULTS / f"vision_{s.name}_skew.png")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
