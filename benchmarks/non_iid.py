"""Snake Learning under label skew: naive Snake, each non-IID mitigation alone and in combination, against
centralized LoRA and FedAvg-LoRA at the same optimizer-step budget (issue #7's measured table).

all-MiniLM-L6-v2 + LoRA + a new head on Rotten Tomatoes, 4 nodes with Dirichlet label shards, serpentine plan of
4 nodes x 2 groups x 1 pass x `stage_steps` (the main job's plan); every method runs in its own process through
`benchmarks/compare.py`'s workers (same model, data, shards, seed and step budget). Centralized training pools the
shards, whose union is the same training set for every alpha, so it runs once. Majority-class accuracy is that of
the held-out set.

| variant | `SnakeConfig` options |
| --- | --- |
| `naive` | none |
| `distill` | `distill_alpha=0.5` (T = 2): the model as it arrived at the stage is the teacher |
| `logit_adj` | `logit_adjustment=1.0`: train on logits + log(node's own label prior) |
| `restrict` | `restrict_to_node_classes=True`: absent classes masked out of the node's softmax |
| `head_lr` | `head_learning_rate=...` (2.5 x the base rate) for the always-trainable head |
| `data_steps` | `scale_steps_by="data"`: steps per stage proportional to the node's shard size (total about the same) |
| `logit_adj+min_share`, `restrict+min_share` | with `node_class_min_share=0.01`: a class under 1% of a node's labels counts as absent there |
| `proximal` | `proximal_mu=0.01`: μ/2·‖w − w_stage_start‖² on the stage's tensors |
| `calibration`, `calibration_full` | `head_calibration="diagonal"` / `"full"`: after the last stage the head is re-fit on virtual features from the nodes' pooled per-class Gaussians (CCVR) |
| `logit_adj+head_lr`, `logit_adj+distill`, `logit_adj+distill+head_lr`, `logit_adj+min_share+distill`, `logit_adj+min_share+proximal`, `logit_adj+min_share+calibration(_full)` | combinations |

Usage (results in benchmarks/results/non_iid_<size>.{json,md,png}; per-run results are kept in --workdir, so an
interrupted run picks up where it stopped):
    python benchmarks/non_iid.py                                  # alpha 1.0 and 0.1, ~1 h on 2 CPU cores
    python benchmarks/non_iid.py --alphas 0.1 --variants naive,logit_adj
    python benchmarks/non_iid.py --tiny --output_dir /tmp/bench   # tiny model, synthetic data (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402


VARIANTS = {
    "naive": "",
    "distill": "distill_alpha=0.5",
    "logit_adj": "logit_adjustment=1.0",
    "restrict": "restrict_to_node_classes=true",
    "head_lr": "head_learning_rate={head_lr}",
    "data_steps": "scale_steps_by=data",
    "logit_adj+min_share": "logit_adjustment=1.0,node_class_min_share=0.01",
    "restrict+min_share": "restrict_to_node_classes=true,node_class_min_share=0.01",
    "logit_adj+head_lr": "logit_adjustment=1.0,head_learning_rate={head_lr}",
    "logit_adj+distill": "logit_adjustment=1.0,distill_alpha=0.5",
    "logit_adj+distill+head_lr": "logit_adjustment=1.0,distill_alpha=0.5,head_learning_rate={head_lr}",
    "logit_adj+min_share+distill": "logit_adjustment=1.0,node_class_min_share=0.01,distill_alpha=0.5",
    "proximal": "proximal_mu=0.01",
    "calibration": "head_calibration=diagonal",
    "calibration_full": "head_calibration=full",
    "logit_adj+min_share+proximal": "logit_adjustment=1.0,node_class_min_share=0.01,proximal_mu=0.01",
    "logit_adj+min_share+calibration": "logit_adjustment=1.0,node_class_min_share=0.01,head_calibration=diagonal",
    "logit_adj+min_share+calibration_full": "logit_adjustment=1.0,node_class_min_share=0.01,head_calibration=full",
}
# A variant that equals another one, run for run, when every node holds every class above a share (nothing masked).
EQUIVALENT = {
    "logit_adj+min_share+distill": ("logit_adj+distill", 0.01),
    "restrict": ("naive", 0.0),
    "logit_adj+min_share": ("logit_adj", 0.01),
    "restrict+min_share": ("restrict", 0.01),
}
BASELINES = ("centralized", "fedavg_lora")
PRESETS = {
    # One evaluation per Snake run (after its last stage): the table needs final accuracies, and 1,000 sentences
    # after each of 8 stages would double the run time on 2 CPU cores.
    "full": dict(
        num_passes=1, stage_steps=20, batch_size=16, learning_rate=2e-3, eval_size=1000, threads=2, curve=False
    ),
    "tiny": compare.PRESETS[("minilm_rt", "tiny")],
}


def settings_for(size: str, alpha: float, **overrides) -> compare.Settings:
    """The benchmark's settings for one Dirichlet split (the main job's plan shape)."""
    fields = {"task": "minilm_rt", "size": size, "partition": "dirichlet", "alpha": alpha, **PRESETS[size]}
    return compare.Settings(**{**fields, **overrides})


def run_one(name: str, s: compare.Settings, workdir: Path, in_process: bool) -> dict:
    """One method or variant; its result is cached in `workdir` under a name that includes every setting."""
    split = s.partition + (f"{s.alpha:g}" if s.partition == "dirichlet" else "")
    key = f"{name}_{split}_{s.size}_{s.stage_steps}x{s.batch_size}_seed{s.seed}"
    cached = workdir / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    print(f"\n=== {name}, {s.partition} alpha={s.alpha:g} ===", flush=True)
    start = time.perf_counter()
    if name in BASELINES:
        method = name
    else:
        options = VARIANTS[name].format(head_lr=2.5 * s.learning_rate)
        method = compare.MITIGATED if options else "snake_serpentine"
        s = dataclasses.replace(s, mitigation=options)
    if in_process:
        result = compare.run_method(method, s)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = compare.run_in_subprocess(method, s, Path(tmp))
    result["wall_with_eval_seconds"] = time.perf_counter() - start
    cached.write_text(json.dumps(result))
    print(f"{name}: accuracy {result['final_metric']:.4f} ({result['wall_with_eval_seconds']:.0f} s)", flush=True)
    return result


def majority_accuracy(s: compare.Settings) -> float:
    """Accuracy of always predicting the held-out set's most frequent label."""
    from collections import Counter

    model, tokenizer = compare._load_model(s)
    _, eval_set = compare._load_data(s, tokenizer)
    counts = Counter(eval_set["label"])
    return max(counts.values()) / sum(counts.values())


def run(size: str, alphas: list[float], variants: list[str], workdir: Path, in_process: bool, **overrides) -> dict:
    base = settings_for(size, alphas[0], **overrides)
    centralized = run_one("centralized", dataclasses.replace(base, partition="iid"), workdir, in_process)
    table: dict[str, dict[str, dict]] = {}
    # Variants outer, alphas inner: an interrupted run has every alpha for the variants it reached.
    for name in ["fedavg_lora", *variants]:
        for alpha in alphas:
            s = dataclasses.replace(base, alpha=alpha)
            runs = table.setdefault(f"{alpha:g}", {})
            same, share = EQUIVALENT.get(name, (None, 0.0))
            if same in runs and _every_node_holds_every_class(runs[same], share):
                # Masking absent classes changes nothing when no class is absent: the run would equal `same`'s.
                runs[name] = {**runs[same], "same_as": same}
                continue
            runs[name] = _summary(run_one(name, s, workdir, in_process))
    return {
        "settings": dataclasses.asdict(base),
        "alphas": alphas,
        "variants": {name: VARIANTS[name].format(head_lr=2.5 * base.learning_rate) for name in variants},
        "total_steps": base.total_steps,
        "majority_accuracy": majority_accuracy(base),
        "centralized": _summary(centralized),
        "results": table,
        "commit": compare._commit(),
    }


def _summary(result: dict) -> dict:
    keep = ("final_metric", "curve", "steps", "bytes_total", "wall_seconds", "options", "shards")
    summary = {k: result[k] for k in keep if k in result}
    stages = (result.get("snake_report") or {}).get("stages") or []
    shares = [st["extra"]["distill_share"] for st in stages if "distill_share" in st.get("extra", {})]
    if shares:
        summary["distill_share_mean"] = sum(shares) / len(shares)
    return summary


def _every_node_holds_every_class(summary: dict, min_share: float = 0.0) -> bool:
    """Whether every node of `summary`'s shards holds every class, at `min_share` of its labels or more (the rule of
    `snake_hf.losses.node_label_priors`)."""
    rows = summary["shards"]["rows"]
    classes = set().union(*(row["label_counts"] for row in rows))
    return all(
        all(0 < row["label_counts"].get(c, 0) >= min_share * row["size"] for c in classes) and row["size"]
        for row in rows
    )


def best_variant(results: dict, alpha: str) -> str:
    """The Snake variant with the highest final accuracy at `alpha`."""
    snake = {k: v["final_metric"] for k, v in results["results"][alpha].items() if k not in BASELINES}
    return max(snake, key=snake.get)


def to_markdown(results: dict) -> str:
    s = results["settings"]
    alphas = [f"{a:g}" for a in results["alphas"]]
    central, majority = results["centralized"]["final_metric"], results["majority_accuracy"]
    head = (
        f"all-MiniLM-L6-v2 + LoRA r={s['lora_r']} on Rotten Tomatoes ({s['size']}), {s['num_nodes']} nodes, "
        f"Dirichlet shards, serpentine {s['num_nodes']} nodes x {s['num_groups']} groups x {s['num_passes']} pass x "
        f"{s['stage_steps']} steps = {results['total_steps']} optimizer steps per method, batch {s['batch_size']} x "
        f"{s['max_length']} tokens, lr {s['learning_rate']}, seed {s['seed']}; held-out accuracy on {s['eval_size']} "
        f"sentences. Centralized LoRA: **{central:.4f}**; majority class: {majority:.4f}."
    )
    rows = ["| method | " + " | ".join(f"alpha={a} accuracy | vs centralized" for a in alphas) + " |"]
    rows.append("| --- |" + " ---: | ---: |" * len(alphas))
    names = list(next(iter(results["results"].values())))
    for name in names:
        cells = []
        for a in alphas:
            r = results["results"][a].get(name)
            cells += (
                ["-", "-"]
                if r is None
                else [f"{r['final_metric']:.4f}", f"{100 * (r['final_metric'] - central):+.1f} pt"]
            )
        label = name if name in BASELINES else f"snake {name}"
        same = {results["results"][a].get(name, {}).get("same_as") for a in alphas} - {None}
        label += f" (= {same.pop()} where no class is masked)" if same else ""
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    best = [f"alpha={a}: **{best_variant(results, a)}**" for a in alphas]
    options = "\n".join(f"- `{k}`: `{v or '(none)'}`" for k, v in results["variants"].items())
    return f"{head}\n\n" + "\n".join(rows) + f"\n\nBest Snake variant: {', '.join(best)}.\n\nVariants:\n{options}\n"


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    alphas = [f"{a:g}" for a in results["alphas"]]
    names = list(next(iter(results["results"].values())))
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(alphas)
    for i, a in enumerate(alphas):
        values = [results["results"][a].get(n, {}).get("final_metric", 0.0) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=f"Dirichlet alpha={a}")
    ax.axhline(results["centralized"]["final_metric"], color="black", linestyle="--", label="centralized LoRA")
    ax.axhline(results["majority_accuracy"], color="gray", linestyle=":", label="majority class")
    ax.set_xticks([x + width * (len(alphas) - 1) / 2 for x in range(len(names))], names, rotation=20, ha="right")
    ax.set(ylabel="held-out accuracy", ylim=(0.4, 0.9), title="Snake under label skew: mitigations vs baselines")
    ax.legend(fontsize="small", loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model from a config, synthetic data (seconds)")
    parser.add_argument("--alphas", default="1.0,0.1", help="comma-separated Dirichlet alphas")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated Snake variants")
    parser.add_argument("--stage_steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the preset's)")
    parser.add_argument("--output_dir", default=str(compare.RESULTS))
    parser.add_argument("--workdir", default=None, help="per-run results (default: <output_dir>/non_iid_runs_<size>)")
    parser.add_argument("--in_process", action="store_true", help="every method in this process (tests)")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    given = (("stage_steps", args.stage_steps), ("seed", args.seed), ("threads", args.threads))
    overrides = {k: v for k, v in given if v is not None}
    output = Path(args.output_dir)
    workdir = Path(args.workdir) if args.workdir else output / f"non_iid_runs_{size}"
    workdir.mkdir(parents=True, exist_ok=True)
    alphas = [float(a) for a in args.alphas.split(",")]
    results = run(size, alphas, variants, workdir, args.in_process, **overrides)
    (output / f"non_iid_{size}.json").write_text(json.dumps(results, indent=2))
    table = to_markdown(results)
    (output / f"non_iid_{size}.md").write_text(f"# Snake under label skew: mitigations ({size})\n\n{table}")
    plot(results, output / f"non_iid_{size}.png")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
