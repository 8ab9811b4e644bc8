"""Every measured number README.md and docs/ quote, generated from the committed results in benchmarks/results/.

    python scripts/readme_numbers.py           # check: exit 1 if a page disagrees with the results (CI runs this)
    python scripts/readme_numbers.py --write   # rewrite the generated parts of the pages from the results

A page holds generated parts between `<!-- numbers:NAME -->` and `<!-- /numbers:NAME -->`; `BLOCKS[NAME]` writes each
from results JSON files, and ends it with the files it read, their commands, machine and date
(benchmarks/results/provenance.json). Outside those parts a page quotes no measured number: the check also fails on a
decimal number, a number with thousands separators, or a number with a unit (MiB, %, s, minutes) in prose outside
code, except the settings `ALLOWED` lists. One script, one source per figure: sections cannot disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from functools import cache
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [
    "README.md",
    "docs/benchmarks.md",
    "docs/non_iid.md",
    "docs/distributed.md",
    "docs/fault_tolerance.md",
    "docs/memory_and_nodes.md",
    "docs/outputs.md",
    "docs/layout.md",
    "docs/trainer_conformance.md",
    "docs/payload_compression.md",
    "docs/security.md",
    "docs/trl.md",
    "docs/precision_and_devices.md",
]
MiB = 2**20

# Numbers prose may carry: settings and names, not measurements.
ALLOWED = [
    r"α=\d+(\.\d+)?",
    r"alpha[ =]\d+(\.\d+)?",
    r"Dirichlet\(?α?=?\d+(\.\d+)?\)?",
    r"Dirichlet \d+(\.\d+)?",
    r"torch[ =]=?\d+(\.\d+)+",
    r"Python \d+(\.\d+)+",
    r"2405\.03372",
    r"\d+e-\d+",
    r"=\d+\.\d+",
    r"\d+(\.\d+)? seconds? per",
]


@cache
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def source(*names: str) -> str:
    """`(from <file>: `<command>`, <machine>, <date>; ...)` for the results files a part read."""
    provenance = load("provenance.json")
    parts = []
    for name in names:
        info = provenance[name]
        if name == "main_job.json":
            run = load(name)
            machine = run["machine"]
            info = {
                "command": run["command"].replace("bash scripts/main_job.sh", "time bash scripts/main_job.sh").strip(),
                "machine": f"{machine['cpu_count']} shared CPU cores ({machine['cpu']}), torch {machine['torch']}",
                "date": run["date"][:10],
            }
        parts.append(f"`benchmarks/results/{name}`: `{info['command']}`, {info['machine']}, {info['date']}")
    return "<sub>Source: " + "; ".join(parts) + ".</sub>"


def acc(value: float) -> str:
    return f"{value:.3f}"


def mib(num_bytes: float, digits: int = 2) -> str:
    return f"{num_bytes / MiB:,.{digits}f}"


def method(name: str, key: str):
    return load(name)["methods"][key]


IID, D01, D1 = (
    "compare_minilm_rt_iid_full.json",
    "compare_minilm_rt_dirichlet0.1_full.json",
    "compare_minilm_rt_dirichlet1_full.json",
)
BF16, LM = "compare_minilm_rt_iid_full_bfloat16.json", "compare_smollm2_lm_full.json"
MEM6, MEM10 = "compare_memory_full_full.json", "memory_full_10_nodes/compare_memory_full_full.json"
NONIID, DIST, VISION, MAIN = "non_iid_full.json", "distributed_overhead.json", "vision_quick.json", "main_job.json"
BASELINES = ("centralized", "fedavg_lora")


def memory_full(name: str) -> tuple[float, float, float, int]:
    """(ratio, Snake's largest node peak, full fine-tuning's peak, nodes) of a memory_full run, peaks in bytes."""
    data = load(name)
    snake, full = data["methods"]["snake_full"], data["methods"]["full_finetune"]
    return (
        data["summary"]["memory_ratio"],
        snake["peak_memory_max"],
        full["peak_memory_max"],
        data["settings"]["num_nodes"],
    )


# ---- the generated parts ----------------------------------------------------------------------------------------


def headline() -> str:
    snake, fedavg, split = (method(IID, m) for m in ("snake_serpentine", "fedavg_lora", "split"))
    central = method(IID, "centralized")
    to_target = snake["bytes_to_target"] / split["bytes_to_target"]
    ratio6, snake6, full6, nodes6 = memory_full(MEM6)
    ratio10, _, _, nodes10 = memory_full(MEM10)
    mitigated, fed1, central1 = (method(D1, m) for m in ("snake_serpentine+mitigation", "fedavg_lora", "centralized"))
    return "\n".join(
        [
            f"* **Bytes**: over the same {load(IID)['total_steps']} steps Snake moves {mib(snake['bytes_total'])} MiB "
            f"between nodes, {snake['bytes_total'] / fedavg['bytes_total']:.2f}x FedAvg-LoRA's "
            f"{mib(fedavg['bytes_total'])} MiB, and reaches centralized accuracy minus 1 point after "
            f"{mib(snake['bytes_to_target'])} MiB, 1/{1 / to_target:.0f} of split learning's "
            f"{mib(split['bytes_to_target'])} MiB (MiniLM + LoRA, Rotten Tomatoes, 4 IID nodes).",
            f"* **Memory**: fine-tuning every weight of SmolLM2-135M, a Snake node needs {ratio6:.3f}x the memory of "
            f"full fine-tuning with {nodes6} nodes ({mib(snake6, 0)} vs {mib(full6, 0)} MiB above the loaded model) "
            f"and {ratio10:.3f}x with {nodes10} nodes.",
            f"* **Accuracy**: on IID nodes Snake reaches {acc(snake['final_metric'])} against centralized training's "
            f"{acc(central['final_metric'])} and FedAvg-LoRA's {acc(fedavg['final_metric'])}; on label-skewed nodes "
            f"(Dirichlet α=1.0) with the classification recipe's default mitigation, {acc(mitigated['final_metric'])} "
            f"against centralized {acc(central1['final_metric'])} and FedAvg-LoRA {acc(fed1['final_metric'])}.",
            "",
            source(IID, D1, MEM6, MEM10),
        ]
    )


def main_job() -> str:
    run = load(MAIN)
    comm = run["communication"]
    minutes, seconds = divmod(round(run["total_seconds"]), 60)
    peaks = [n["peak_above_model_bytes"] for n in run["memory"]["per_node"]]
    machine = run["machine"]
    low, high = mib(min(peaks), 0), mib(max(peaks), 0)
    memory = low if low == high else f"{low}-{high}"
    return "\n".join(
        [
            f"Measured: held-out accuracy **{acc(run['before']['eval_accuracy'])} → {acc(run['after']['eval_accuracy'])}**"
            f" on {run['eval_examples']:,} sentences after {run['total_steps']} steps; {mib(comm['bytes_total'])} MiB "
            f"moved between nodes in {comm['num_hops']} hops, {comm['bytes_total'] / comm['fedavg_lora_bytes']:.2f}x "
            f"what FedAvg-LoRA would move for the same steps ({mib(comm['fedavg_lora_bytes'])} MiB); "
            f"{memory} MiB per node above the loaded model. **{minutes} min "
            f"{seconds} s** of wall time, of which {run['recipe_cpu_seconds'] / 60:.1f} min of CPU time (one torch "
            f"thread), on {machine['cpu_count']} CPU cores shared with the test suite and other jobs (load average "
            f"{run['load_average_1m_at_start']:.1f} at the start, {machine['load_average_1m']:.1f} at the end); "
            + (
                "installation skipped (`SKIP_INSTALL=1`: everything was installed)."
                if run["command"].startswith("SKIP_INSTALL=1")
                else "installation included."
            ),
            "",
            f"The same plan in the benchmarks' own runs reached {acc(method(D1, 'snake_serpentine+mitigation')['final_metric'])}"
            f" (`compare.py`) and {acc(load(NONIID)['results']['1']['logit_adj+min_share']['final_metric'])} "
            "(`non_iid.py`): one seed each, and on this evaluation set one standard error is about "
            f"{100 * (0.75 * 0.25 / run['eval_examples']) ** 0.5:.1f} points.",
            "",
            source(MAIN, D1, NONIID),
        ]
    )


def minilm_table() -> str:
    rows = [
        "| method | IID acc. | IID MiB moved | IID MiB to target | Dirichlet 0.1 acc. | Dirichlet 1.0 acc. "
        "| peak MiB per node above the loaded model (IID) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = list(load(D01)["methods"])
    for name in names:
        iid = load(IID)["methods"].get(name)
        cells = [f"`{name}`"]
        if iid is None:
            cells += ["-", "-", "-"]
        else:
            to_target = iid["bytes_to_target"]
            cells += [
                acc(iid["final_metric"]),
                mib(iid["bytes_total"]),
                "never" if to_target is None else mib(to_target),
            ]
        cells += [acc(method(D01, name)["final_metric"]), acc(method(D1, name)["final_metric"])]
        cells.append("-" if iid is None else mib(iid["peak_memory_max"], 0))
        rows.append("| " + " | ".join(cells) + " |")
    settings = load(IID)["settings"]
    return "\n".join(
        [
            f"{settings['num_nodes']} nodes, {load(IID)['total_steps']} steps of batch {settings['batch_size']} for "
            f"every method, accuracy on {settings['eval_size']:,} held-out sentences; target = centralized minus 1 "
            "point.",
            "",
            *rows,
            "",
            source(IID, D01, D1),
        ]
    )


def minilm_notes() -> str:
    snake, fedavg, split, central = (
        method(IID, m) for m in ("snake_serpentine", "fedavg_lora", "split", "centralized")
    )
    bf16 = method(BF16, "snake_serpentine")
    mitigated01, central01 = method(D01, "snake_serpentine+mitigation"), method(D01, "centralized")
    mitigated1, central1 = method(D1, "snake_serpentine+mitigation"), method(D1, "centralized")
    return "\n".join(
        [
            f"* **Bytes**: Snake reached the target after {mib(snake['bytes_to_target'])} MiB, 1/"
            f"{split['bytes_to_target'] / snake['bytes_to_target']:.0f} of split learning's "
            f"{mib(split['bytes_to_target'])} MiB; FedAvg-LoRA never reached it. Over the whole run Snake moved "
            f"{snake['bytes_total'] / fedavg['bytes_total']:.2f}x FedAvg-LoRA's bytes and 1/"
            f'{split["bytes_total"] / snake["bytes_total"]:.0f} of split learning\'s. With `payload_dtype="bfloat16"` '
            f"Snake reached {acc(bf16['final_metric'])} and the target after {mib(bf16['bytes_to_target'])} MiB "
            f"({mib(bf16['bytes_total'])} MiB in all).",
            f"* **Accuracy**: IID, Snake {acc(snake['final_metric'])} against centralized {acc(central['final_metric'])}."
            f" Under Dirichlet 0.1 every method that trains node after node without a mitigation, and FedAvg, ends at or "
            f"near the majority class; Snake with the recipe's default mitigation reaches {acc(mitigated01['final_metric'])}"
            f" (centralized {acc(central01['final_metric'])}). Under Dirichlet 1.0 it reaches "
            f"{acc(mitigated1['final_metric'])} (centralized {acc(central1['final_metric'])}). The centralized runs "
            "differ only in the pooled shards' order, so their gap shows the noise at this size.",
            "",
            source(IID, BF16, D01, D1),
        ]
    )


def smollm2() -> str:
    data = load(LM)
    m = data["methods"]
    names = ["centralized", "split", "cyclic", "snake_serpentine", "snake_designated", "fedavg_lora"]
    figures = ", ".join(f"`{n}` {m[n]['final_metric']:.2f} ({mib(m[n]['bytes_total'], 1)} MiB)" for n in names)
    settings = data["settings"]
    return "\n".join(
        [
            f"Perplexity on held-out blocks after {data['total_steps']} steps of batch {settings['batch_size']} x "
            f"{settings['max_length']} tokens (bytes moved in brackets): {figures}. Each of Snake's groups trains for "
            "a third of the steps that cyclic and split learning give every layer; no Snake run reached the target "
            "(centralized x 1.01) at this budget.",
            "",
            source(LM),
        ]
    )


LM_STUDY = "lm_study_cpu.json"
_LM_NAMES = {"centralized": "centralized LoRA", "snake_serpentine": "Snake (serpentine)", "cyclic": "cyclic transfer",
             "split": "split learning", "fedavg_lora": "FedAvg-LoRA"}  # fmt: skip


def _gap(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def lm_study_table() -> str:
    """README's causal-LM table: each method at its own best learning rate, and Snake's best lever."""
    data = load(LM_STUDY)
    summary, lrs = data["summary"], data["best_learning_rate"]
    rows = summary["methods"]
    central = rows["centralized"]["perplexity"]
    lines = [
        "| method | best lr | perplexity (± s.e.) | gap at equal steps | MiB moved | peak MiB per node |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {_LM_NAMES.get(name, name)} | {lrs[name]:g} | {row['perplexity']:.2f} ± {row['standard_error']:.2f} | "
            f"{_gap(row['gap_at_equal_steps'])} | {mib(row['bytes_total'], 2)} | {mib(row['peak_memory_max'], 0)} |"
        )
    full = data["levers"].get("full mode (its best lr)")
    longer = {n: r for n, r in data["levers"].items() if r["steps"] > data["total_steps"]}
    if data["levers"]:
        name, best = _lm_best_lever(data)
        lines += ["", f"Snake's best LoRA lever at the same steps: {name}, perplexity {best['final_metric']:.2f} "
                  f"({_gap(best['final_metric'] / central - 1)} against centralized, "
                  f"{mib(best['bytes_total'], 2)} MiB moved)"
                  + "".join(f"; given {r['steps']} steps ({n}), {r['final_metric']:.2f} "
                            f"({_gap(r['final_metric'] / central - 1)})" for n, r in longer.items())
                  + (f"; full mode (the blocks' own weights, at {data['best_learning_rate']['snake_full']:g}), "
                     f"{full['final_metric']:.2f} ({_gap(full['final_metric'] / central - 1)}) with "
                     f"{mib(full['bytes_total'], 0)} MiB moved and {mib(full['peak_memory_max'], 0)} MiB per node"
                     if full else "")
                  + ". Centralized's bytes are the pooled tokenized training set, which Snake's nodes never send."]  # fmt: skip
    s = data["settings"]
    lines += ["", f"SmolLM2-135M-Instruct + LoRA on the King James Bible, {s['num_nodes']} nodes, {data['total_steps']} "
              f"optimizer steps of {s['batch_size']} x {s['max_length']} tokens per method, each at the best of its own "
              f"learning-rate sweep; held-out perplexity over {s['eval_size']} blocks. {source(LM_STUDY)}"]  # fmt: skip
    return "\n".join(lines)


def lm_study_levers() -> str:
    """docs/benchmarks.md: the sweeps, the levers at one rate, and the gaps at equal wall time and equal bytes."""
    data = load(LM_STUDY)
    rows, central = data["summary"]["methods"], data["summary"]["methods"]["centralized"]["perplexity"]
    lines = ["| method | learning rate: final perplexity |", "| --- | --- |"]
    sweeps = (
        {**data["sweeps"], "snake full mode": data["full_mode_sweep"]} if data["full_mode_sweep"] else data["sweeps"]
    )
    for name, runs in sweeps.items():
        cells = ", ".join(f"{lr}: {r['final_metric']:.2f}" for lr, r in runs.items())
        lines.append(f"| {_LM_NAMES.get(name, name)} | {cells} |")
    edge = [_LM_NAMES.get(m, m) for m in data.get("best_on_edge", [])]
    if edge:
        lines += ["", f"Best rate still on the edge of the rates run: {', '.join(edge)}; a larger "
                  "or smaller rate may do better there, so Snake's gaps to them are if anything understated."]  # fmt: skip
    not_run = [m for m in data["missing"] if m.startswith("snake full mode")]
    if not_run:
        lines += ["", f"Not run in time: {', '.join(not_run)} (full mode against LoRA at equal per-node memory)."]
    lever_lr = data["lever_learning_rate"]
    plain = data["sweeps"]["snake_serpentine"][f"{lever_lr:g}"]
    lines += ["", f"Snake's levers, each at learning rate {lever_lr:g} (the best of Snake's first grid):", "",
              "| variant | steps | perplexity | gap to centralized | MiB moved | trainable state MiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in {"serpentine, plain": plain, **data["levers"]}.items():
        lines.append(
            f"| {name} | {r['steps']} | {r['final_metric']:.2f} | {_gap(r['final_metric'] / central - 1)} | "
            f"{mib(r['bytes_total'], 2)} | {mib(r['trainable_state_bytes'], 2)} |"
        )
    snake = rows["snake_serpentine"]
    at_time = ", ".join(f"{_LM_NAMES.get(n, n)} {r['perplexity_at_snake_wall_time']:.2f}" for n, r in rows.items()
                        if r["perplexity_at_snake_wall_time"] is not None)  # fmt: skip
    at_bytes = ", ".join(f"{_LM_NAMES.get(n, n)} {r['perplexity_at_snake_bytes']:.2f}" for n, r in rows.items()
                         if r["perplexity_at_snake_bytes"] is not None)  # fmt: skip
    lines += ["", f"At Snake's training time ({snake['wall_seconds']:.0f} s, nodes one after the other; the runs shared a "
              "loaded machine, so wall times are indicative only) the methods "
              f"stood at: {at_time}. At Snake's bytes ({mib(snake['bytes_total'], 2)} MiB): {at_bytes} (a method "
              "missing there had moved more before its first measurement).", "", source(LM_STUDY)]  # fmt: skip
    return "\n".join(lines)


LM_LONG = "lm_study_cpu_long.json"


def _lm_best_lever(data: dict, max_bytes: float | None = None) -> tuple[str, dict]:
    """The lever with the lowest perplexity at the study's own step budget (LoRA: full mode is another trade), of those
    moving at most `max_bytes` when given."""
    same = {n: r for n, r in data["levers"].items() if r["steps"] == data["total_steps"] and not n.startswith("full")
            and (max_bytes is None or r["bytes_total"] <= max_bytes)}  # fmt: skip
    return min(same.items(), key=lambda kv: kv[1]["final_metric"])


def _lm_lever_cell(data: dict, central: dict, max_bytes: float | None = None) -> tuple[str, dict]:
    name, r = _lm_best_lever(data, max_bytes)
    return f"{name}: {r['final_metric']:.2f}, {_gap(r['final_metric'] / central['perplexity'] - 1)}", r


def lm_study_budget() -> str:
    """docs/benchmarks.md: the gap at the CPU size and at 3x its steps, to tell whether it closes with the budget."""
    rows = ["| budget | centralized (lr) | Snake plain (lr) | gap | Snake's best lever at the plain run's bytes | "
            "Snake's best lever (MiB moved) |", "| --- | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    for name in (LM_STUDY, LM_LONG):
        data = load(name)
        methods, lrs = data["summary"]["methods"], data["best_learning_rate"]
        central, snake = methods["centralized"], methods["snake_serpentine"]

        free, _ = _lm_lever_cell(data, central, snake["bytes_total"] * 1.01)  # framing differs by a few bytes
        best, r = _lm_lever_cell(data, central)
        rows.append(
            f"| {data['total_steps']} steps of {data['settings']['batch_size']} x {data['settings']['max_length']} | "
            f"{central['perplexity']:.2f} ({lrs['centralized']:g}) | {snake['perplexity']:.2f} "
            f"({lrs['snake_serpentine']:g}) | {_gap(snake['gap_at_equal_steps'])} ± {snake['gap_standard_error']:.1%} | "
            f"{free} | {best} ({mib(r['bytes_total'], 2)} MiB against {mib(snake['bytes_total'], 2)}) |"
        )
    data = load(LM_LONG)
    groups, total = data["settings"]["num_groups"], data["total_steps"]
    central_curve = data["best"]["centralized"]["curve"]
    early = next((p for p in central_curve if p["step"] == total // groups), None)
    snake = data["summary"]["methods"]["snake_serpentine"]
    if early is not None:
        rows += ["", f"Each of Snake's {groups} groups trains in 1/{groups} of the steps: at {total} steps every LoRA "
                 f"weight of Snake's took {total // groups} updates and Snake reached {snake['perplexity']:.2f}; "
                 f"centralized, whose every weight takes every update, stood at {early['metric']:.2f} after its first "
                 f"{early['step']} steps of the same run."]  # fmt: skip
    return "\n".join(rows + ["", source(LM_STUDY, LM_LONG)])


LM_RECIPE = ROOT / "recipes" / "configs" / "smollm2_bible.yaml"
_RECIPE_LEVER = "2 groups, descending, one schedule per group"  # what the recipe's config sets (checked below)


def _recipe_setting(key: str) -> str:
    return next(line.split(":")[1].split("#")[0].strip() for line in LM_RECIPE.read_text().splitlines()
                if line.startswith(f"{key}:"))  # fmt: skip


def lm_recipe_default() -> str:
    """docs/benchmarks.md: the lever the causal-LM recipe's config keeps, at both budgets, against the others."""
    settings = {k: _recipe_setting(k) for k in ("num_nodes", "num_block_groups", "group_order", "lr_schedule_scope")}
    groups = int(settings["num_block_groups"])
    if (groups, settings["group_order"], settings["lr_schedule_scope"]) != (2, "descending", "group"):
        raise ValueError(f"{LM_RECIPE.name} no longer sets the lever '{_RECIPE_LEVER}' this part describes")
    short, long = load(LM_STUDY), load(LM_LONG)

    def gap(data, name):
        central = data["summary"]["methods"]["centralized"]["perplexity"]
        r = (
            data["sweeps"]["snake_serpentine"][f"{data['lever_learning_rate']:g}"]
            if name is None
            else data["levers"][name]
        )
        return f"{r['final_metric']:.2f} ({_gap(r['final_metric'] / central - 1)})"

    def both(name):
        return f"{gap(short, name)} at {short['total_steps']} steps and {gap(long, name)} at {long['total_steps']}"

    kept, plain = (
        short["levers"][_RECIPE_LEVER],
        short["sweeps"]["snake_serpentine"][f"{short['lever_learning_rate']:g}"],
    )
    passes = short["levers"]["descending, 2 passes, half the steps, one schedule per group"]
    cyclic = short["summary"]["methods"]["cyclic"]
    full, full_lr = short["levers"].get("full mode (its best lr)"), short["best_learning_rate"].get("snake_full")
    return (
        f"`{LM_RECIPE.relative_to(ROOT)}` trains {groups} block groups over its {settings['num_nodes']} nodes, top-down, "
        "each group with its own learning-rate schedule (`num_block_groups`, `group_order: descending`, "
        f"`lr_schedule_scope: group`). In the study ({short['settings']['num_nodes']} nodes; "
        f"{short['settings']['num_groups']} groups in its other Snake runs) that lever gave "
        f"{both(_RECIPE_LEVER)}, against the plain serpentine's {both(None)} and top-down alone's "
        f"{both('descending (top-down)')}; one schedule per group with top-down and the study's groups gave "
        f"{both('one schedule per group, descending')}. Fewer groups means fewer hand-overs, so it moved fewer bytes "
        f"({mib(kept['bytes_total'], 2)} MiB against {mib(plain['bytes_total'], 2)}); each node trains half the "
        f"adapters instead of a third: trainable state {mib(kept['trainable_state_bytes'], 2)} MiB against "
        f"{mib(plain['trainable_state_bytes'], 2)} and a peak of {mib(kept['peak_memory_max'], 0)} MiB per node against "
        f"{mib(plain['peak_memory_max'], 0)} (LoRA's state is small beside the frozen model; in full mode a group's "
        "share of the model is the memory, and fewer groups cost in proportion). Two passes of half the steps "
        f"with top-down and one schedule per group reached {gap(short, 'descending, 2 passes, half the steps, one schedule per group')} "
        f"at {short['total_steps']} steps but moved {mib(passes['bytes_total'], 2)} MiB, as much as cyclic transfer "
        f"({mib(cyclic['bytes_total'], 2)} MiB, {cyclic['perplexity']:.2f})."
        + (
            f" Full mode (the blocks' own weights, at its own best rate {full_lr:g}) reached "
            f"{gap(short, 'full mode (its best lr)')}, but moved {full['bytes_total'] / plain['bytes_total']:.0f}x the "
            f"LoRA run's bytes ({mib(full['bytes_total'], 0)} MiB) and peaked at {mib(full['peak_memory_max'], 0)} MiB "
            f"per node against {mib(plain['peak_memory_max'], 0)}: a different trade, not a default for the LoRA recipe."
            if full
            else ""
        )
        + " `SnakeConfig`'s own defaults stay (one group per node, ascending, one schedule over the run): the evidence "
        f"is one model and one data set. {source(LM_STUDY, LM_LONG)}"
    )


def lm_warm_start() -> str:
    """docs/benchmarks.md: what sending each stage's AdamW moments with its group would cost, from the study's run."""
    data = load(LM_STUDY)
    snake = data["best"]["snake_serpentine"]
    report = snake["snake_report"]
    group = max(report["part_nbytes"].values())
    carried = snake["tensor_bytes"] // group
    with_moments = 3 * snake["tensor_bytes"]
    cyclic = data["summary"]["methods"]["cyclic"]["bytes_total"]
    passes = data["levers"]["2 passes, half the steps"]["bytes_total"]
    return (
        f"Measured in the study's runs: a group of {report['group_boundaries'][1]} blocks' adapters is "
        f"{group:,} bytes in float32 ({group // 4:,} LoRA parameters); the plain serpentine run carries {carried} "
        f"groups over {len(report['hops'])} hops, {snake['tensor_bytes']:,} tensor bytes ({snake['bytes_total']:,} "
        f"with framing). With the moments each carried group becomes {group:,} + 2 x {group:,} = {3 * group:,} bytes: "
        f"{with_moments:,} tensor bytes for the run, {mib(with_moments, 1)} MiB against cyclic transfer's "
        f"{mib(cyclic, 2)} MiB, i.e. Snake would move {with_moments / cyclic:.2f}x cyclic's bytes instead of "
        f"{snake['bytes_total'] / cyclic:.2f}x, and the target of at most half of cyclic's bytes could not be met. "
        f"The two-pass lever would go from {mib(passes, 1)} to about {mib(3 * passes, 0)} MiB. {source(LM_STUDY)}"
    )


def memory_full_part() -> str:
    ratio6, snake6, full6, nodes6 = memory_full(MEM6)
    ratio10, snake10, _, nodes10 = memory_full(MEM10)
    return "\n".join(
        [
            f"Per-node peak above the loaded model, Snake / full fine-tuning: **{ratio6:.3f} with {nodes6} nodes** "
            f"({mib(snake6, 0)} vs {mib(full6, 0)} MiB) and **{ratio10:.3f} with {nodes10} nodes** "
            f"({mib(snake10, 0)} MiB); the paper reports {load(MEM6)['summary']['paper_memory_ratio']:.2f}.",
            "",
            source(MEM6, MEM10),
        ]
    )


def distributed_part() -> str:
    runs = load(DIST)["runs"]
    shares = [r["distributed"]["hop_share"] * 100 for r in runs]
    ratios = [r["distributed"]["hop_nbytes"] / r["distributed"]["hop_min_nbytes"] for r in runs]
    return "\n".join(
        [
            f"With 2-4 processes on loopback, hops take {min(shares):.1f}-{max(shares):.1f}% of a run's wall time, and "
            f"a payload is {max(ratios):.4f}x the bytes of the tensors it carries.",
            "",
            source(DIST),
        ]
    )


def vision_part() -> str:
    data = load(VISION)["splits"]["iid"]["methods"]
    snake, fedavg = data["snake"], data["fedavg"]
    return "\n".join(
        [
            f"VGG-11 (width x0.25) on Fashion-MNIST, 3 IID nodes, full mode: Snake {snake['curve'][-1][1]:.3f} against "
            f"FedAvg {fedavg['curve'][-1][1]:.3f}, moving {fedavg['bytes_moved'] / snake['bytes_moved']:.1f}x fewer "
            "bytes.",
            "",
            source(VISION),
        ]
    )


NONIID_CAL = "non_iid_calibration_full.json"
VISION_HALF, VISION_ALL = "vision_half.json", "vision_all.json"
FASHION_MNIST_TRAIN = 60_000  # images in Fashion-MNIST's training set


def vision_half() -> str:
    return vision_larger(VISION_HALF)


def vision_all() -> str:
    return vision_larger(VISION_ALL)


def vision_larger(name: str) -> str:
    """A larger vision comparison: every method against FedAvg (accuracy and bytes) and centralized, per split."""
    results, quick = load(name), load(VISION)
    s = results["settings"]
    steps = results["total_steps"] / quick["total_steps"]
    share = (
        f"all {FASHION_MNIST_TRAIN:,}"
        if s["train_size"] >= FASHION_MNIST_TRAIN
        else f"the first {s['train_size']:,} of its {FASHION_MNIST_TRAIN:,}"
    )
    rows = [
        "| split | method | final accuracy | accuracy / FedAvg's | MiB moved | FedAvg's bytes / these "
        "| gap to centralized (points) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split, entry in results["splits"].items():
        methods = entry["methods"]
        final = {k: r["curve"][-1][1] for k, r in methods.items()}
        fedavg, central = methods["fedavg"], final["centralized"]
        for key, r in methods.items():
            if key == "centralized":
                rows.append(f"| {split} | centralized (the data moves) | {acc(central)} | "
                            f"{final[key] / final['fedavg']:.2f}x | {mib(r['bytes_moved'])} | - | - |")  # fmt: skip
                continue
            rows.append(
                f"| {split} | {key} | {acc(final[key])} | {final[key] / final['fedavg']:.2f}x | "
                f"{mib(r['bytes_moved'])} | {fedavg['bytes_moved'] / r['bytes_moved']:.1f}x | "
                f"{100 * (final[key] - central):+.1f} |"
            )
    return "\n".join(
        [
            f"VGG-11 (width x{s['width']}) from scratch on Fashion-MNIST: {share} training images (quick uses "
            f"{quick['settings']['train_size']:,}), {s['num_nodes']} nodes, "
            f"{results['total_steps']} optimizer steps per method ({steps:.0f} times quick's, for "
            f"{s['train_size'] / quick['settings']['train_size']:.0f} times its data), batch {s['batch_size']}, "
            f"AdamW lr {s['learning_rate']} with linear decay; accuracy on {s['eval_size']:,} held-out test images after "
            f"the run (after the final pass where there is one). Snake: {s['num_groups']} groups x {s['num_passes']} "
            f"passes x {s['stage_steps']} steps per stage; FedAvg: {s['num_groups'] * s['num_passes']} rounds of "
            f"{s['stage_steps']} local steps on every node; cyclic: the whole model from node to node, "
            f"{s['num_groups'] * s['num_passes']} cycles of {s['stage_steps']} steps per node; centralized: the "
            "pooled data (its bytes are the training set's). One seed.",
            "",
            *rows,
            "",
            source(name),
        ]
    )


def _vision_skew_rows(name: str, prefix: str = "dirichlet") -> tuple[list[str], dict]:
    """Rows of one split of a vision results file: every method's final accuracy, bytes and byte ratio."""
    results = load(name)
    split = next(k for k in results["splits"] if k.startswith(prefix))
    methods = results["splits"][split]["methods"]
    fedavg = methods["fedavg"]["bytes_moved"]
    rows = ["| method | final accuracy | MiB moved | FedAvg's bytes / these |", "| --- | ---: | ---: | ---: |"]
    for key, r in methods.items():
        ratio = "-" if key == "centralized" else f"{fedavg / r['bytes_moved']:.1f}x"
        label = "centralized (the data moves)" if key == "centralized" else key
        rows.append(f"| {label} | {acc(r['curve'][-1][1])} | {mib(r['bytes_moved'])} | {ratio} |")
    return rows, results


def vision_skew() -> str:
    rows, results = _vision_skew_rows(VISION)
    s = results["settings"]
    return "\n".join(
        [
            f"VGG-11 (width x{s['width']}) from scratch on Fashion-MNIST ({s['train_size']:,} training images), "
            f"{s['num_nodes']} nodes with Dirichlet α={s['alpha']} label shards, {results['total_steps']} optimizer "
            f"steps per method, batch {s['batch_size']}; accuracy on {s['eval_size']:,} held-out images after the "
            "run (after the final pass where there is one). Snake: "
            f"{s['num_groups']} groups x {s['num_passes']} passes x {s['stage_steps']} steps per stage.",
            "",
            *rows,
            "",
            "The IID split, with pooled batch norm and full calibration:",
            "",
            *_vision_skew_rows(VISION, "iid")[0],
            "",
            source(VISION),
        ]
    )


def label_skew_headline() -> str:
    results = load(VISION_ALL)  # the largest vision run (vision_skew has every quick variant)
    split = next(k for k in results["splits"] if k.startswith("dirichlet"))
    methods = results["splits"][split]["methods"]
    final = {k: r["curve"][-1][1] for k, r in methods.items()}
    best = max((k for k in methods if k.startswith("snake")), key=final.get)
    ratio = methods["fedavg"]["bytes_moved"] / methods[best]["bytes_moved"]
    text = load(NONIID_CAL)
    runs, central = text["results"]["0.1"], text["centralized"]["final_metric"]
    text_best = max((k for k in runs if k not in BASELINES), key=lambda k: runs[k]["final_metric"])
    return "\n".join(
        [
            f"Vision (VGG-11 x{results['settings']['width']} on {results['settings']['train_size']:,} Fashion-MNIST "
            f"training images, {results['settings']['num_nodes']} nodes, Dirichlet α={results['settings']['alpha']}, "
            f"{results['total_steps']:,} steps): {best} reaches {acc(final[best])} against plain Snake "
            f"{acc(final['snake'])}, FedAvg {acc(final['fedavg'])} (which moves {ratio:.1f}x the bytes), cyclic "
            f"{acc(final['cyclic'])} and centralized {acc(final['centralized'])}. Text (MiniLM + LoRA on Rotten "
            "Tomatoes, Dirichlet α=0.1): Snake + "
            f"`{text['variants'][text_best]}` reaches {acc(runs[text_best]['final_metric'])} against centralized "
            f"{acc(central)} ({100 * (runs[text_best]['final_metric'] - central):+.1f} points).",
            "",
            source(VISION_ALL, NONIID_CAL),
        ]
    )


def text_calibration() -> str:
    data = load(NONIID_CAL)
    runs = data["results"]["0.1"]
    central = data["centralized"]["final_metric"]
    rows = ["| method (same steps) | accuracy | vs centralized | bytes moved |", "| --- | ---: | ---: | ---: |"]
    for variant, r in runs.items():
        options = data["variants"].get(variant)
        label = "FedAvg-LoRA" if variant == "fedavg_lora" else (f"Snake + `{options}`" if options else "Snake, naive")
        rows.append(
            f"| {label} | {acc(r['final_metric'])} | {100 * (r['final_metric'] - central):+.1f} pt "
            f"| {r['bytes_total']:,} |"
        )
    s = data["settings"]
    return "\n".join(
        [
            f"all-MiniLM-L6-v2 + LoRA on Rotten Tomatoes, {s['num_nodes']} nodes, Dirichlet α=0.1, "
            f"{data['total_steps']} steps of batch {s['batch_size']}; accuracy on {s['eval_size']:,} held-out "
            f"sentences, one seed. Centralized LoRA: **{acc(central)}**.",
            "",
            *rows,
            "",
            source(NONIID_CAL),
        ]
    )


def non_iid_table() -> str:
    data = load(NONIID)
    alphas = [str(a).removesuffix(".0") if str(a).endswith(".0") and a != 1.0 else str(a) for a in data["alphas"]]
    keys = list(data["results"])
    rows = ["| method (same steps) | " + " | ".join(f"Dirichlet α={a}" for a in data["alphas"]) + " |"]
    rows.append("| --- |" + " ---: |" * len(keys))
    for variant, options in {"fedavg_lora": "FedAvg-LoRA", **data["variants"]}.items():
        label = options if variant == "fedavg_lora" else (f"Snake + `{options}`" if options else "Snake, naive")
        cells = [acc(data["results"][k][variant]["final_metric"]) for k in keys]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    del alphas
    settings = data["settings"]
    return "\n".join(
        [
            f"{settings['num_nodes']} nodes, {data['total_steps']} steps of batch {settings['batch_size']}, accuracy "
            f"on {settings['eval_size']:,} held-out sentences (standard error about "
            f"{100 * (0.75 * 0.25 / settings['eval_size']) ** 0.5:.1f} points; one seed). Centralized LoRA on the "
            f"pooled shards: **{acc(data['centralized']['final_metric'])}**; majority class: "
            f"{acc(data['majority_accuracy'])}.",
            "",
            *rows,
            "",
            source(NONIID),
        ]
    )


def shards_table() -> str:
    shards = method(D01, "snake_serpentine")["shards"]
    rows = ["| node | size | rotten | fresh | entropy (bits) |", "| ---: | ---: | ---: | ---: | ---: |"]
    for row in shards["rows"]:
        counts = row["label_counts"]
        rows.append(f"| {row['node']} | {row['size']:,} | {counts['0']:,} | {counts['1']:,} | {row['entropy']:.3f} |")
    return "\n".join([*rows, "", source(D01)])


def _payload_rows(partition: str, alpha_label: str) -> list[str]:
    """One comparison's rows of docs/payload_compression.md: Snake at each payload scheme, then the baselines."""
    stem = f"compare_minilm_rt_{partition}_full"
    base = load(f"{stem}.json")
    f32 = base["methods"]["snake_serpentine"]
    split, fedavg = base["methods"]["split"], base["methods"]["fedavg_lora"]
    n = base["settings"]["eval_size"]
    rows = [
        f"**{alpha_label}** (target accuracy {acc(base['summary']['target'])}; accuracy on {n:,} held-out sentences, ± "
        "its binomial standard error)",
        "",
        "| Snake payload | bytes over the run | vs float32 | tensor bytes vs float32 | vs FedAvg-LoRA | bytes to target "
        "| vs split's bytes to target | final accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scheme, name in (("float32", f"{stem}.json"), ("bfloat16", f"{stem}_bfloat16.json"),
                         ("int8", f"{stem}_int8.json"), ("int4", f"{stem}_int4.json")):  # fmt: skip
        if not (RESULTS / name).is_file():
            rows.append(f"| {scheme} | not run | | | | | | |")
            continue
        m = load(name)["methods"]["snake_serpentine"]
        error = (m["final_metric"] * (1 - m["final_metric"]) / n) ** 0.5
        to_target = m.get("bytes_to_target")
        versus_split = (
            f"1/{split['bytes_to_target'] / to_target:.0f}" if to_target and split.get("bytes_to_target") else "—"
        )
        rows.append(
            f"| {scheme} | {m['bytes_total']:,} | {m['bytes_total'] / f32['bytes_total']:.3f} "
            f"| {m['tensor_bytes'] / f32['tensor_bytes']:.3f} | {m['bytes_total'] / fedavg['bytes_total']:.3f} "
            f"| {f'{to_target:,}' if to_target else 'not reached'} | {versus_split} "
            f"| {acc(m['final_metric'])} ± {acc(error)} |"
        )
    for label, m in (("FedAvg-LoRA", fedavg), ("split learning", split)):
        to_target = m.get("bytes_to_target")
        rows.append(f"| {label} | {m['bytes_total']:,} | | | | {f'{to_target:,}' if to_target else 'not reached'} | "
                    f"| {acc(m['final_metric'])} |")  # fmt: skip
    return rows


def payload_compression() -> str:
    names = [
        f"compare_minilm_rt_{p}_full{suffix}.json" for p in ("iid", "dirichlet1") for suffix in ("", "_int8", "_int4")
    ]
    iid = {
        s: load(f"compare_minilm_rt_iid_full{s}.json")["methods"]["snake_serpentine"] for s in ("", "_int8", "_int4")
    }
    ratio8, ratio4 = (iid[s]["bytes_total"] / iid[""]["bytes_total"] for s in ("_int8", "_int4"))
    return "\n".join(
        _payload_rows("iid", "IID")
        + [""]
        + _payload_rows("dirichlet1", "Dirichlet α=1.0")
        + [
            "",
            f"Bytes over the run against float32 (IID): int8 **{ratio8:.3f}**, int4 **{ratio4:.3f}** (targets of issue "
            "#20, reported, not asserted: at most 0.25 and 0.14); the float16 block scales and the manifest are what int8 "
            "pays above a quarter. " + source(*names),
        ]
    )


LM_QUICK = "compare_smollm2_lm_quick"


def payload_compression_lm() -> str:
    """docs/payload_compression.md on the SmolLM2 LM task (quick size): Snake at each payload scheme, the baselines."""
    base = load(f"{LM_QUICK}.json")
    f32, m = base["methods"]["snake_serpentine"], base["methods"]
    split, fedavg, s = m["split"], m["fedavg_lora"], base["settings"]
    rows = [
        f"**SmolLM2-135M, causal LM, quick size** ({base['total_steps']} steps of batch {s['batch_size']} x "
        f"{s['max_length']} tokens; perplexity on {s['eval_size']} held-out blocks; target perplexity "
        f"{base['summary']['target']:.2f}, centralized x 1.01)",
        "",
        "| Snake payload | bytes over the run | vs float32 | tensor bytes vs float32 | vs FedAvg-LoRA | vs split learning "
        "| bytes to target | final perplexity |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = [f"{LM_QUICK}.json"]
    for scheme in ("float32", "bfloat16", "int8", "int4"):
        name = f"{LM_QUICK}.json" if scheme == "float32" else f"{LM_QUICK}_{scheme}.json"
        if not (RESULTS / name).is_file():
            rows.append(f"| {scheme} | not run | | | | | | |")
            continue
        names += [name] if name not in names else []
        r = load(name)["methods"]["snake_serpentine"]
        to_target = r.get("bytes_to_target")
        rows.append(
            f"| {scheme} | {r['bytes_total']:,} | {r['bytes_total'] / f32['bytes_total']:.3f} "
            f"| {r['tensor_bytes'] / f32['tensor_bytes']:.3f} | {r['bytes_total'] / fedavg['bytes_total']:.3f} "
            f"| {r['bytes_total'] / split['bytes_total']:.4f} | {f'{to_target:,}' if to_target else 'not reached'} "
            f"| {r['final_metric']:.3f} |"
        )
    for label, r in (("FedAvg-LoRA", fedavg), ("split learning", split)):
        to_target = r.get("bytes_to_target")
        rows.append(f"| {label} | {r['bytes_total']:,} | | | | | {f'{to_target:,}' if to_target else 'not reached'} "
                    f"| {r['final_metric']:.3f} |")  # fmt: skip
    measured = {n.removesuffix(".json").rsplit("_", 1)[-1]: load(n)["methods"]["snake_serpentine"] for n in names[1:]}
    summary = "; ".join(
        f"{scheme} **{r['bytes_total'] / f32['bytes_total']:.3f}** of the bytes, perplexity "
        f"{r['final_metric'] - f32['final_metric']:+.4f}"
        for scheme, r in measured.items()
    )
    return "\n".join(rows + ["", f"Against float32 Snake: {summary}. " + source(*names)])


def security_cost() -> str:
    data = load("distributed_overhead_auth_quick.json")
    runs = {(r["world_size"], r["topology"], r["auth"]): r["distributed"] for r in data["runs"]}
    ratios = [on["warm_hop_ms_mean"] / runs[(w, t, "off")]["warm_hop_ms_mean"]
              for (w, t, auth), on in runs.items() if auth == "on"]  # fmt: skip
    extra = [on["warm_hop_ms_mean"] - runs[(w, t, "off")]["warm_hop_ms_mean"]
             for (w, t, auth), on in runs.items() if auth == "on"]  # fmt: skip
    hops = [r["warm_hop_ms_mean"] for r in runs.values()]
    per_mib = next(c for c in data["seal_costs"] if c["nbytes"] == MiB)
    largest = max(data["seal_costs"], key=lambda c: c["nbytes"])
    return (
        f"An authenticated hop took {min(ratios):.2f} to {max(ratios):.2f} times an unauthenticated one in the same "
        f"runs (quick size, 2 and 3 ranks, p2p and cs): {max(min(extra), 0):.1f} to {max(extra):.1f} ms more on hops of "
        f"{min(hops):.0f}-{max(hops):.0f} ms, mostly the extra store read. Sealing alone costs "
        f"{per_mib['seal_ms']:.1f} ms per MiB ({largest['nbytes'] // MiB} MiB in {largest['seal_ms']:.0f} ms). "
        + source("distributed_overhead_auth_quick.json")
    )


def sft() -> str:
    data = load("sft_smollm2.json")
    before, after, settings = data["before"], data["after"], data["settings"]
    return (
        f"Measured ({data['total_steps']} steps of {settings['batch_size']} pairs over {settings['num_nodes']} nodes x "
        f"{settings['num_block_groups']} groups, split by book; trl {data['trl']}): on the {data['eval_pairs']} "
        f"held-out pairs the completion loss went from {before['eval_loss']:.3f} to {after['eval_loss']:.3f}, "
        f"perplexity {before['eval_perplexity']:.2f} to {after['eval_perplexity']:.2f}; "
        f"{mib(data['total_bytes'])} MiB of adapters moved in {data['num_hops']} hops; "
        f"{data['wall_seconds'] / 60:.0f} minutes for the whole run. " + source("sft_smollm2.json")
    )


LEVERS = "recompute_above_group, lm_loss_chunk_tokens=128 (full fine-tuning: chunked loss too)"
# docs/precision_and_devices.md: SmolLM2-135M full mode, one block per group (30 nodes), by the frozen base's dtype.
PRECISION_RUNS = [
    ("precision/compare_memory_full_quick.json", "float32", "-"),
    ("precision/compare_memory_full_quick_base-bfloat16.json", "bfloat16", "-"),
    ("precision/levers/compare_memory_full_quick.json", "float32", LEVERS),
    ("precision/levers/compare_memory_full_quick_base-bfloat16.json", "bfloat16", LEVERS),
    ("precision/levers/compare_memory_full_quick_base-bfloat16_frozen-embedding.json", "bfloat16",
     LEVERS + "; Snake leaves the tied input embedding frozen (only blocks train, as in the paper's count)"),
]  # fmt: skip


def precision_memory() -> str:
    rows = [
        "| frozen base | Snake options | (a) model state | (b) measured peak, weights included | peak above the loaded "
        "model | Snake's largest node, MiB (weights + peak) | full fine-tuning, MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    used = [run for run in PRECISION_RUNS if (RESULTS / run[0]).is_file()]
    for name, dtype, options in used:
        data = load(name)
        summary, snake, full = data["summary"], data["methods"]["snake_full"], data["methods"]["full_finetune"]
        rows.append(
            f"| {dtype} | {options} | {summary['model_state_ratio']:.3f} | {summary['peak_with_weights_ratio']:.3f} "
            f"| {summary['memory_ratio']:.3f} | {mib(snake['weight_bytes'] + snake['peak_memory_max'], 0)} "
            f"| {mib(full['weight_bytes'] + full['peak_memory_max'], 0)} |"
        )
    settings = load(used[0][0])["settings"]
    return "\n".join(
        [
            f"SmolLM2-135M, full mode, {settings['num_nodes']} nodes, one block per group, {settings['stage_steps']} "
            f"step per stage, batch {settings['batch_size']} x {settings['max_length']} tokens, CPU; each ratio is "
            "Snake's largest node over full fine-tuning (float32, every parameter training).",
            "",
            *rows,
            "",
            source(*(name for name, _, _ in used)),
        ]
    )


BLOCKS: dict[str, Callable[[], str]] = {
    "headline": headline,
    "main_job": main_job,
    "minilm_table": minilm_table,
    "minilm_notes": minilm_notes,
    "smollm2": smollm2,
    "lm_study": lm_study_table,
    "lm_study_levers": lm_study_levers,
    "lm_recipe_default": lm_recipe_default,
    "lm_warm_start": lm_warm_start,
    "lm_study_budget": lm_study_budget,
    "memory_full": memory_full_part,
    "distributed": distributed_part,
    "vision": vision_part,
    "non_iid_table": non_iid_table,
    "vision_skew": vision_skew,
    "label_skew_headline": label_skew_headline,
    "vision_half": vision_half,
    "vision_all": vision_all,
    "text_calibration": text_calibration,
    "shards": shards_table,
    "payload_compression": payload_compression,
    "payload_compression_lm": payload_compression_lm,
    "security_cost": security_cost,
    "sft": sft,
    "precision_memory": precision_memory,
}
_PART = re.compile(r"<!-- numbers:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /numbers:(?P=name) -->", re.S)
_MEASURED = re.compile(r"\d+(?:\.\d+)?\s?(?:MiB|MB|GiB|GB|KiB|%|s\b|minutes?\b|min\b)|\d+\.\d+|\d{1,3}(?:,\d{3})+")


def _wrap(text: str) -> str:
    """Paragraphs and bullets wrapped at 119 columns, as the pages' own text; tables as they are."""
    lines = []
    for line in text.split("\n"):
        if line.startswith("|") or not line.strip():
            lines.append(line)
        else:
            indent = "  " if line.startswith("* ") else ""
            lines.append(textwrap.fill(line, width=119, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(lines)


def render(text: str) -> str:
    """`text` with every generated part rewritten from the results."""

    def part(match: re.Match) -> str:
        name = match.group("name")
        return f"<!-- numbers:{name} -->\n{_wrap(BLOCKS[name]())}\n<!-- /numbers:{name} -->"

    return _PART.sub(part, text)


def stray_numbers(text: str) -> list[str]:
    """Measured-looking numbers in `text` outside generated parts, code blocks, inline code and `ALLOWED` settings."""
    text = _PART.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    for pattern in ALLOWED:
        text = re.sub(pattern, "", text)
    return [m.group(0) for m in _MEASURED.finditer(text)]


def check_page(path: Path) -> list[str]:
    """What is wrong with one page: unknown parts, parts that disagree with the results, stray numbers."""
    text = path.read_text()
    problems = [
        f"{path.name}: unknown part `{m.group('name')}`" for m in _PART.finditer(text) if m.group("name") not in BLOCKS
    ]
    if problems:
        return problems
    if render(text) != text:
        problems.append(f"{path.relative_to(ROOT)}: generated numbers disagree with benchmarks/results (run --write)")
    problems += [
        f"{path.relative_to(ROOT)}: a measured number outside a generated part: {n!r}" for n in stray_numbers(text)
    ]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated parts from the results")
    cli = parser.parse_args()
    pages = [ROOT / page for page in PAGES if (ROOT / page).is_file()]
    if cli.write:
        for page in pages:
            page.write_text(render(page.read_text()))
    problems = [problem for page in pages for problem in check_page(page)]
    for problem in problems:
        print(problem, file=sys.stderr)
    used = {m.group("name") for page in pages for m in _PART.finditer(page.read_text())}
    print(f"{len(pages)} pages, {len(used)} generated parts, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
