"""Causal-LM fine-tuning, where Snake is worth choosing: every method at its own best learning rate, then Snake's levers.

SmolLM2-135M-Instruct + LoRA (q_proj, v_proj, r=8) on the King James Bible in packed blocks, 4 nodes, the same budget of
optimizer steps for every method (`benchmarks/compare.py`'s harness, each run in its own process):

1. **Sweep.** Centralized LoRA, FedAvg-LoRA, cyclic weight transfer, split learning and Snake (serpentine) each over a
   grid of at least three learning rates; a grid is extended in the direction of its best value while that value
   sits on its edge (at most three more rates). Each method is then quoted at its own best rate.
2. **Levers**, Snake at its best rate, against the gap at equal optimizer steps: group order (descending = top-down;
   `alternate` needs two passes), fewer steps per stage with more passes (more hops: the bytes go up), a
   learning-rate factor per block group, one learning-rate schedule per block group (`lr_schedule_scope="group"`:
   under one run-wide decay the group trained last trains at a fraction of the first one's rate), the designated schedule (one group per node), full mode (the blocks' own
   weights, swept over its own rates), Snake given 1.5x centralized's steps, and the two best levers combined
   (descending order with 2 passes of half the steps, at Snake's rate and at half of it).
3. **Memory**: per-node peak (evaluation at the training batch size, which stays under the training step's peak) and
   the trainable-state bytes (gradients + AdamW moments) of each method.

Reported: the gap to centralized at equal steps, at equal training wall time (the simulation runs nodes one after the
other; FedAvg's nodes would run in parallel, so its wall time is also given divided by the number of nodes) and at
equal bytes; bytes to centralized x 1.01; perplexity with its standard error over the held-out blocks.

Not a lever here: a warm start of each stage's AdamW moments. They are twice the adapter's bytes, so sending them
triples a hop, and a stage's first steps with fresh moments already move at the full learning rate (AdamW's bias
correction); a node revisiting a group in a later pass could keep its own moments locally, which only helps with
several passes and makes a node hold state for groups it is not training.

Usage (results in benchmarks/results/lm_study_<size>.{json,md,png}):
    python benchmarks/lm_study.py                 # the CPU size: 48 steps of 4 x 64 tokens, about 70 min of one core
    python benchmarks/lm_study.py --report_only   # the tables from the runs finished so far (missing ones marked)
    python benchmarks/lm_study.py --size cpu_long # 144 steps of 4 x 64 tokens: the gap at 3x the budget
    python benchmarks/lm_study.py --size full     # 288 steps of 8 x 128 tokens: for a GPU
    python benchmarks/lm_study.py --size tiny --output_dir /tmp/lm   # seconds (tests)
    python benchmarks/lm_study.py --jobs 2        # two runs at a time (one per core)
    python benchmarks/lm_study.py --only fedavg_lora --only "descending, 2 passes, half the steps"   # just these
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (benchmarks/compare.py: the harness every run goes through)


METHODS = ("centralized", "snake_serpentine", "cyclic", "split", "fedavg_lora")  # the most telling first
SIZES = {
    "tiny": dict(num_nodes=2, num_groups=2, stage_steps=2, batch_size=4, max_length=16, train_size=32, eval_size=16),
    "cpu": dict(num_nodes=4, num_groups=3, stage_steps=4, batch_size=4, max_length=64, train_size=192, eval_size=32),
    # 3x the cpu size's steps (144 of 4 x 64 tokens, each block seen once): does the gap close as groups train longer?
    "cpu_long": dict(num_nodes=4, num_groups=3, stage_steps=12, batch_size=4, max_length=64, train_size=576, eval_size=32),
    "full": dict(num_nodes=4, num_groups=3, stage_steps=24, batch_size=8, max_length=128, train_size=2304, eval_size=256),
}  # fmt: skip
GRIDS = {  # learning rates per size: the LoRA baselines, Snake (block-coordinate: larger steps), Snake full mode
    "tiny": {"lora": [2e-3, 5e-3, 1e-2], "snake_serpentine": [2e-3, 5e-3, 1e-2], "full": [1e-4, 3e-4, 1e-3]},
    "cpu": {"lora": [1e-3, 2e-3, 4e-3], "snake_serpentine": [2e-3, 4e-3, 8e-3], "full": [2e-5, 5e-5, 1e-4]},
    "cpu_long": {"lora": [2e-3, 4e-3, 8e-3], "snake_serpentine": [2e-3, 4e-3, 8e-3], "full": [5e-5, 1e-4, 2.5e-4]},
    "full": {"lora": [5e-4, 1e-3, 2e-3], "snake_serpentine": [1e-3, 2e-3, 4e-3], "full": [1e-5, 3e-5, 1e-4]},
}


def base_settings(size: str, threads: int) -> compare.Settings:
    preset = dict(SIZES[size], num_passes=1, curve_every=0, threads=threads, warmup_ratio=0.05)
    preset["curve_every"] = preset["num_nodes"] * preset["stage_steps"]  # one point per row of the serpentine
    return compare.Settings(task="smollm2_lm", size="tiny" if size == "tiny" else "full", **preset)


def levers(s: compare.Settings) -> dict[str, dict]:
    """Snake variants at its best rate: the name and the settings that differ from the plain serpentine run."""
    g, steps = s.num_groups, s.stage_steps
    variants = {  # the most telling first: a study cut short has these
        "one schedule per group": dict(snake_options="lr_schedule_scope=group"),
        "one schedule per group, lr x2": dict(snake_options="lr_schedule_scope=group", lr_factor=2.0),
        "one schedule per group, descending": dict(snake_options="lr_schedule_scope=group,group_order=descending"),
        "1.5x steps": dict(stage_steps=steps * 3 // 2),
        "1.5x steps, descending, one schedule per group": dict(
            stage_steps=steps * 3 // 2, snake_options="lr_schedule_scope=group,group_order=descending"
        ),
        "2x steps, descending, one schedule per group": dict(
            stage_steps=steps * 2, snake_options="lr_schedule_scope=group,group_order=descending"
        ),
        "lr x [0.5..2] by depth": dict(snake_options="group_learning_rate_scale=" + _ramp(0.5, 2.0, g)),
        "descending (top-down)": dict(snake_options="group_order=descending"),
    }
    if steps % 2 == 0:
        variants["2 passes, half the steps"] = dict(num_passes=2, stage_steps=steps // 2)
        variants["2 passes, half the steps, alternate"] = dict(
            num_passes=2, stage_steps=steps // 2, snake_options="group_order=alternate"
        )
        variants["descending, 2 passes, half the steps"] = dict(
            num_passes=2, stage_steps=steps // 2, snake_options="group_order=descending"
        )
        variants["descending, 2 passes, half the steps, one schedule per group"] = dict(
            num_passes=2, stage_steps=steps // 2, snake_options="lr_schedule_scope=group,group_order=descending"
        )
        variants["descending, 2 passes, half the steps, lr x0.5"] = dict(  # the combination at a neighbouring rate
            num_passes=2, stage_steps=steps // 2, snake_options="group_order=descending", lr_factor=0.5
        )
    if steps % 3 == 0:
        variants["3 passes, a third of the steps"] = dict(num_passes=3, stage_steps=steps // 3)
    variants["lr x [2..0.5] by depth"] = dict(snake_options="group_learning_rate_scale=" + _ramp(2.0, 0.5, g))
    if g > 2 and steps * g % (g - 1) == 0:  # fewer, larger groups (longer stages: the same steps in all): more steps
        # per group, and more of the model in each node's backward and optimizer
        variants[f"{g - 1} groups, descending, one schedule per group"] = dict(
            num_groups=g - 1, stage_steps=steps * g // (g - 1),
            snake_options="lr_schedule_scope=group,group_order=descending",
        )  # fmt: skip
    variants["designated"] = dict(methods="snake_designated")
    return variants


def _ramp(first: float, last: float, count: int) -> str:
    values = [first * (last / first) ** (i / max(count - 1, 1)) for i in range(count)]
    return ";".join(f"{v:.3g}" for v in values)


EXTENSIONS = 3  # a sweep whose best is on its edge gains at most this many points in that direction
REPORT_ONLY = False  # --report_only: never run, use what the cache holds (a run not there yet is None)
RUN_ONLY: set[str] | None = (
    None  # --only: run these parts (methods' sweeps, "full mode", lever names); the rest cached
)


def run_one(s: compare.Settings, folder: Path, part: str = "") -> dict | None:
    """One method's result (`s.methods` names it), cached under `folder/lm_study_runs/` by its settings: an
    interrupted study redoes only the runs it had not finished. `part` is the sweep or lever the run belongs to."""
    key = hashlib.sha256(json.dumps(compare._cache_key(s), sort_keys=True).encode()).hexdigest()[:12]
    cache = folder / "lm_study_runs" / f"{s.methods}-{key}"
    cached_only = REPORT_ONLY or (RUN_ONLY is not None and part not in RUN_ONLY)
    if cached_only and not (cache / f"{s.methods}.json").exists():
        return None
    return compare.run(s, in_process=False, cache=cache)["methods"][s.methods]


def sweeps(methods: list[str], s: compare.Settings, size: str, folder: Path, jobs: int, **change) -> dict[str, dict]:
    """`{method: {lr: result}}` over each method's grid (every run of every method in one pool, so that `jobs` runs
    are always busy), each grid extended towards its best value while that value is on its edge (at most
    `EXTENSIONS` points)."""
    grid_of = GRIDS[size]
    grids = {m: grid_of["full"] if change.get("lora") is False else grid_of.get(m, grid_of["lora"]) for m in methods}

    def run_all(points: list[tuple[str, float]]) -> list[dict | None]:
        at = [dataclasses.replace(s, methods=m, learning_rate=lr, **change) for m, lr in points]
        parts = ["full mode" if change.get("lora") is False else m for m, _ in points]
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda x, part: run_one(x, folder, part), at, parts))

    points = [(m, lr) for m in methods for lr in grids[m]]
    results = {m: {} for m in methods}
    for (m, lr), r in zip(points, run_all(points)):
        if r is not None:
            results[m][lr] = r
    for _ in range(EXTENSIONS):
        extra = []
        for m, grid in grids.items():
            if any(lr not in results[m] for lr in grid):  # --report_only before the grid finished
                continue
            best, step = _best(results[m])[0], grid[1] / grid[0]
            if best == max(results[m]):
                extra.append((m, best * step))
            elif best == min(results[m]):
                extra.append((m, best / step))
        extra = [(m, lr) for m, lr in extra if lr not in results[m]]
        if not extra:
            break
        for (m, lr), r in zip(extra, run_all(extra)):
            if r is not None:
                results[m][lr] = r
    return {m: dict(sorted(runs.items())) for m, runs in results.items()}


def _best(results: dict) -> tuple[float, dict]:
    lr = min(results, key=lambda k: results[k]["final_metric"])
    return lr, results[lr]


def best_on_edge(swept: dict[str, dict]) -> list[str]:
    """The methods whose best rate is the largest or smallest they ran: their best may lie beyond the sweep."""
    return [m for m, runs in swept.items() if _best(runs)[0] in (min(runs), max(runs))]


def _at_or_before(curve: list[dict], key: str, limit: float) -> float | None:
    """The metric of the last curve point with `key` at most `limit` (None when the first point is past it)."""
    reached = [p["metric"] for p in curve if p[key] <= limit * (1 + 1e-9)]
    return reached[-1] if reached else None


def paired_standard_error(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a - b) over the same held-out blocks: the noise of a gap between two methods."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def summarise(best: dict[str, dict], num_nodes: int) -> dict:
    """Gaps of every best-rate method to centralized at equal steps, equal wall time and equal bytes."""
    central, snake = best["centralized"], best["snake_serpentine"]
    reference = central["final_metric"]
    target = reference * 1.01
    rows = {}
    for name, r in best.items():
        seconds = r["wall_seconds"]
        row = {
            "perplexity": r["final_metric"],
            "standard_error": r.get("perplexity_standard_error"),
            "gap_at_equal_steps": r["final_metric"] / reference - 1,
            "gap_standard_error": (
                paired_standard_error(r["eval_example_losses"], central["eval_example_losses"])
                if "eval_example_losses" in r and "eval_example_losses" in central
                else None
            ),  # of the log-perplexity gap: about the relative gap's
            "bytes_total": r["bytes_total"],
            "wall_seconds": seconds,
            "parallel_wall_seconds": seconds / num_nodes if name == "fedavg_lora" else seconds,
            "perplexity_at_snake_wall_time": _at_or_before(r["curve"], "seconds", snake["wall_seconds"]),
            "perplexity_at_snake_bytes": _at_or_before(r["curve"], "bytes", snake["bytes_total"]),
            "bytes_to_target": next((p["bytes"] for p in r["curve"] if p["metric"] <= target), None),
            "steps_to_target": next((p["step"] for p in r["curve"] if p["metric"] <= target), None),
            "peak_memory_max": r["peak_memory_max"],
            "trainable_state_bytes": r.get("trainable_state_bytes"),
        }
        rows[name] = row

    def ratio(a, b, key):
        x, y = rows.get(a, {}).get(key), rows.get(b, {}).get(key)
        return x / y if x is not None and y else None

    return {
        "target": target,
        "methods": rows,
        "snake/cyclic bytes_to_target": ratio("snake_serpentine", "cyclic", "bytes_to_target"),
        "snake/split bytes_to_target": ratio("snake_serpentine", "split", "bytes_to_target"),
        "snake/cyclic bytes_total": ratio("snake_serpentine", "cyclic", "bytes_total"),
        "snake/split bytes_total": ratio("snake_serpentine", "split", "bytes_total"),
    }


def study(size: str, folder: Path, jobs: int, threads: int) -> dict:
    """Runs (or, with --report_only, collects) the sweeps and levers in the order that tells most first: centralized
    and Snake, Snake's levers, full mode, then cyclic, split and FedAvg. Missing runs are left out of the tables."""
    s = base_settings(size, threads)
    swept = sweeps(list(METHODS[:2]), s, size, folder, jobs)
    variants, snake_lr = {}, None
    grid = GRIDS[size]["snake_serpentine"]
    if all(lr in swept["snake_serpentine"] for lr in grid):
        # The levers run at the best rate of Snake's first grid, so that they can start while an extension runs.
        snake_lr = _best({lr: swept["snake_serpentine"][lr] for lr in grid})[0]
        names = list(levers(s))
        with ThreadPoolExecutor(jobs) as pool:
            variants = dict(zip(names, pool.map(lambda name: _lever(s, name, snake_lr, folder), names)))
    full_sweep = sweeps(["snake_serpentine"], s, size, folder, jobs, lora=False)["snake_serpentine"]
    if full_sweep:
        variants["full mode (its best lr)"] = _best(full_sweep)[1]
    swept |= sweeps(list(METHODS[2:]), s, size, folder, jobs)
    swept = {m: runs for m, runs in swept.items() if runs}
    best = {m: _best(runs)[1] for m, runs in swept.items()}
    return {
        "task": "smollm2_lm",
        "size": size,
        "settings": dataclasses.asdict(s),
        "total_steps": s.total_steps,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "commit": compare._commit(),
        "grids": GRIDS[size],
        "sweeps": {m: {f"{lr:g}": _brief(r) for lr, r in runs.items()} for m, runs in swept.items()},
        "full_mode_sweep": {f"{lr:g}": _brief(r) for lr, r in full_sweep.items()},
        "best_learning_rate": {m: _best(runs)[0] for m, runs in swept.items()}
        | ({"snake_full": _best(full_sweep)[0]} if full_sweep else {}),
        "lever_learning_rate": snake_lr if variants else None,
        "best": best,
        "levers": {name: _brief(r) | {"curve": r["curve"]} for name, r in variants.items() if r is not None},
        "missing": [m for m in METHODS if m not in swept]
        + [n for n, r in variants.items() if r is None]
        + [f"snake full mode at {lr:g}" for lr in GRIDS[size]["full"] if lr not in full_sweep],
        "best_on_edge": best_on_edge(swept),
        "summary": summarise(best, s.num_nodes) if {"centralized", "snake_serpentine"} <= set(best) else None,
    }


def _lever(s: compare.Settings, name: str, lr: float, folder: Path) -> dict | None:
    change = dict(levers(s)[name])
    method = change.pop("methods", "snake_serpentine")
    lr *= change.pop("lr_factor", 1.0)
    return run_one(dataclasses.replace(s, methods=method, learning_rate=lr, **change), folder, name)


def _brief(r: dict) -> dict:
    keys = ("final_metric", "perplexity_standard_error", "bytes_total", "wall_seconds", "steps", "peak_memory_max",
            "trainable_state_bytes", "options")  # fmt: skip
    return {k: r.get(k) for k in keys}


# ---- report ----


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.2f}"


def _ppl(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def to_markdown(results: dict) -> str:
    s, summary = results["settings"], results["summary"]
    lines = [
        f"{'A tiny Llama on synthetic tokens' if s['size'] == 'tiny' else 'SmolLM2-135M-Instruct on the King James Bible'}"
        f" + LoRA (q_proj, v_proj, r={s['lora_r']}), {s['num_nodes']} nodes, "
        f"{results['total_steps']} optimizer steps per method, batch {s['batch_size']} x {s['max_length']} tokens, "
        f"held-out {s['eval_size']} blocks, {results['device']} ({s['threads']} torch thread(s) per run). "
        f"Target: centralized x 1.01 = {summary['target']:.3f}.",
        "",
        "## Each method at its own best learning rate",
        "",
        "| method | best lr | perplexity (± s.e.) | gap at equal steps (± s.e.) | ppl at Snake's wall time | "
        "ppl at Snake's bytes | MiB moved | MiB to target | steps to target | peak MiB/node | "
        "trainable state MiB | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in summary["methods"].items():
        se = row["standard_error"]
        gse = row["gap_standard_error"]
        lines.append(
            f"| {name} | {results['best_learning_rate'][name]:g} | {_ppl(row['perplexity'])}"
            + (f" ± {se:.3f}" if se is not None else "")
            + f" | {row['gap_at_equal_steps']:+.2%}"
            + (f" ± {gse:.2%}" if gse is not None else "")
            + f" | {_ppl(row['perplexity_at_snake_wall_time'])} | {_ppl(row['perplexity_at_snake_bytes'])}"
            f" | {_mib(row['bytes_total'])} | {_mib(row['bytes_to_target'])} | {row['steps_to_target'] or '-'}"
            f" | {_mib(row['peak_memory_max'])} | {_mib(row['trainable_state_bytes'])} | {row['wall_seconds']:.0f} |"
        )
    lines += ["", "## Learning-rate sweeps (final perplexity)", "", "| method | " + " | ".join(["lr: perplexity"] * 1) + " |",
              "| --- | --- |"]  # fmt: skip
    for name, runs in {**results["sweeps"], "snake full mode": results["full_mode_sweep"]}.items():
        lines.append(f"| {name} | " + ", ".join(f"{lr}: {_ppl(r['final_metric'])}" for lr, r in runs.items()) + " |")
    central = summary["methods"]["centralized"]["perplexity"]
    lines += ["", f"## Snake's levers (at {results['lever_learning_rate']:g}, the best of Snake's first grid)", "",
              "| variant | steps | perplexity | gap to centralized | MiB moved | peak MiB/node | trainable state MiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    plain = results["sweeps"]["snake_serpentine"][f"{results['lever_learning_rate']:g}"]
    for name, r in {"serpentine (plain)": plain, **results["levers"]}.items():
        lines.append(
            f"| {name} | {r['steps']} | {_ppl(r['final_metric'])} | {r['final_metric'] / central - 1:+.2%} | "
            f"{_mib(r['bytes_total'])} | {_mib(r['peak_memory_max'])} | {_mib(r['trainable_state_bytes'])} |"
        )
    lines += [
        "",
        f"- Snake/cyclic bytes to target: {_ratio(summary['snake/cyclic bytes_to_target'])}; Snake/split bytes to "
        f"target: {_ratio(summary['snake/split bytes_to_target'])}.",
        f"- Snake/cyclic bytes over the run: {_ratio(summary['snake/cyclic bytes_total'])}; Snake/split: "
        f"{_ratio(summary['snake/split bytes_total'])}.",
        f"- Not run (yet): {', '.join(results['missing']) or 'none'}.",
        f"- Best rate still on the edge of the rates run (a larger or smaller rate may do better): "
        f"{', '.join(results['best_on_edge']) or 'none'}.",
        "- Wall time is training time in one process (nodes one after the other; evaluation excluded); FedAvg's nodes "
        "would train in parallel: its time divided by the number of nodes is in the JSON (`parallel_wall_seconds`).",
    ]
    return "\n".join(lines)


def _ratio(x) -> str:
    return "not reached" if x is None else f"{x:.3g}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for name, r in results["best"].items():
        curve = r["curve"]
        for ax, key, scale in zip(axes[:3], ("step", "seconds", "bytes"), (1, 1, 2**20)):
            ax.plot([p[key] / scale for p in curve], [p["metric"] for p in curve], marker="o", label=name)
    for ax, label in zip(axes[:3], ("optimizer steps", "training seconds", "MiB moved")):
        ax.set(xlabel=label, ylabel="held-out perplexity")
        ax.axhline(results["summary"]["target"], color="grey", linestyle=":", linewidth=1)
    axes[2].set_xscale("symlog")
    axes[0].legend(fontsize="small")
    for name, runs in results["sweeps"].items():
        lrs = sorted(runs, key=float)
        axes[3].plot([float(lr) for lr in lrs], [runs[lr]["final_metric"] for lr in lrs], marker="o", label=name)
    axes[3].set(xscale="log", xlabel="learning rate", ylabel="final perplexity", title="sweeps")
    fig.suptitle(f"SmolLM2 LoRA, {results['total_steps']} steps: each method at its best learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--output_dir", default=str(compare.RESULTS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report_only", action="store_true", help="no runs: tables from the finished ones")
    parser.add_argument("--only", action="append", metavar="PART",
                        help="run only this part (a method's sweep, 'full mode' or a lever's name; repeatable); "
                             "the other parts come from the finished runs")  # fmt: skip
    options = parser.parse_args(argv)
    global REPORT_ONLY, RUN_ONLY
    REPORT_ONLY = options.report_only
    RUN_ONLY = set(options.only) if options.only else None
    folder = Path(options.output_dir)
    results = study(options.size, folder, options.jobs, options.threads)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"lm_study_{options.size}"
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=2))
    if results["summary"] is None:
        print(f"Not enough finished runs for tables (missing: {', '.join(results['missing'])}).")
        return results
    table = to_markdown(results)
    (folder / f"{stem}.md").write_text(
        f"# Causal-LM fine-tuning: Snake's gap and its levers ({options.size})\n\n{table}\n"
    )
    plot(results, folder / f"{stem}.png")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
