"""The main job's closing summary, from the run's results.json; also writes main_job.json beside it.

    python scripts/main_job_summary.py outputs/minilm_rotten_tomatoes --recipe_seconds 412 --total_seconds 431

main_job.json holds what README.md quotes from a measured run (benchmarks/results/main_job.json is such a file):
accuracy before and after, bytes moved and FedAvg-LoRA's for the same steps, memory per node, wall times, and the
command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    """The machine a run measured on: CPU model and count, load average, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line), cpu
        )
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)}
    info["python"] = platform.python_version()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def summary_lines(run: dict) -> list[str]:
    """The closing lines: accuracy, bytes against FedAvg-LoRA, memory per node, files."""
    before, after = run["before"]["eval_accuracy"], run["after"]["eval_accuracy"]
    comm = run["communication"]
    ratio = comm["bytes_total"] / comm["fedavg_lora_bytes"]
    lines = [
        "[main_job] summary",
        f"  held-out accuracy: {before:.3f} before -> {after:.3f} after ({run['eval_examples']:,} sentences)",
        f"  moved between nodes: {comm['bytes_total'] / 2**20:.2f} MiB in {comm['num_hops']} hops; FedAvg-LoRA would "
        f"move {comm['fedavg_lora_bytes'] / 2**20:.2f} MiB for the same {comm['total_steps']} steps ({ratio:.2f}x)",
    ]
    nodes = run["memory"]["per_node"]
    if nodes:
        figures = ", ".join(f"node {n['node']} {n['peak_above_model_bytes'] / 2**20:.0f}" for n in nodes)
        lines.append(f"  memory per node above the loaded model (MiB, largest stage peak): {figures}")
    lines.append(f"  files: {run['output_dir']} (adapter, README.md model card, snake_report.png, shards.png, ...)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--recipe_seconds", type=float, required=True)
    parser.add_argument("--total_seconds", type=float, required=True)
    parser.add_argument("--command", default="bash scripts/main_job.sh")
    parser.add_argument("--load_at_start", type=float, default=None, help="1-minute load average when it started")
    cli = parser.parse_args()
    results = json.loads((Path(cli.output_dir) / "results.json").read_text())
    report = json.loads((Path(cli.output_dir) / "snake_report.json").read_text())
    run = {
        "command": ("SKIP_INSTALL=1 " if os.environ.get("SKIP_INSTALL") else "") + cli.command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "recipe_seconds": cli.recipe_seconds,
        "total_seconds": cli.total_seconds,
        "train_seconds": round(results["train_seconds"], 1),
        "recipe_cpu_seconds": round(results["process_cpu_seconds"], 1),
        "load_average_1m_at_start": cli.load_at_start,
        "output_dir": results["output_dir"],
        "eval_examples": results.get("eval_examples", 0),
        "total_steps": results["total_steps"],
        "before": results["before"],
        "after": results["after"],
        "communication": results["communication"],
        "memory": results["memory"],
        "shard_sizes": report["shard_sizes"],
    }
    (Path(cli.output_dir) / "main_job.json").write_text(json.dumps(run, indent=2) + "\n")
    print("\n" + "\n".join(summary_lines(run)))
    print(
        f"[main_job] wall time {cli.total_seconds:.0f} s (recipe {cli.recipe_seconds:.0f} s, of it "
        f"{run['recipe_cpu_seconds']:.0f} s of CPU time)"
    )


if __name__ == "__main__":
    main()
