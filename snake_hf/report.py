"""What a Snake run did, stage by stage: losses, bytes, time, memory; as JSON, a table, logged metrics and plots.

Memory is in MiB (2**20 bytes) everywhere it is shown. A stage's `peak_memory_bytes` is the peak of the whole process
(CPU: resident-set high-water mark); `extra["memory_baseline_bytes"]`, when recorded, is what the process held when
training began (the loaded model and data), so the difference is what the stage needed above the loaded model: in a
simulation, what a node would need besides its copy of the base model."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


__all__ = ["REPORT_FILE", "HopRecord", "SnakeReport", "StageRecord"]

REPORT_FILE = "snake_report.json"


@dataclass
class StageRecord:
    """One stage as it ran.

    Args:
        stage (`int`), pass_index (`int`), node (`int`), group (`int`), steps (`int`): from the plan.
        train_loss (`float`): mean training loss over the stage's optimizer steps.
        wall_seconds (`float`): wall time of the stage's training (hops excluded).
        bytes_sent (`int`): bytes of the payload this stage's node sent on to the next stage (0 without a hop).
        bytes_received (`int`): bytes of the payload that arrived for this stage.
        peak_memory_bytes (`int` or None): peak memory during the stage (see `snake_hf.memory`).
        wait_seconds (`float`): time spent waiting for and receiving the incoming payload.
        load_seconds (`float`): of that, the time to decode, verify and load it once its bytes arrived.
    """

    stage: int
    pass_index: int
    node: int
    group: int
    steps: int
    train_loss: float | None = None
    wall_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    peak_memory_bytes: int | None = None
    wait_seconds: float = 0.0
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def peak_above_model_bytes(self) -> int | None:
        """The stage's peak above what the process held when training began (`None` without a recorded baseline)."""
        baseline = self.extra.get("memory_baseline_bytes")
        if self.peak_memory_bytes is None or baseline is None:
            return None
        return max(self.peak_memory_bytes - int(baseline), 0)


@dataclass
class HopRecord:
    """One payload between two nodes: after stage `from_stage` on `sender`, for stage `to_stage` on `receiver`."""

    from_stage: int
    to_stage: int
    sender: int
    receiver: int
    parts: list[str]
    nbytes: int
    tensor_nbytes: int
    seconds: float = 0.0


@dataclass
class SnakeReport:
    """Everything recorded about a run; `snake_report.json` on disk.

    Example:
        ```python
        >>> report = SnakeReport(num_nodes=2, num_groups=2)
        >>> report.stages.append(StageRecord(stage=0, pass_index=0, node=0, group=0, steps=3, train_loss=1.5))
        >>> "| 0 | 0 | 0 | 0 | 3 |" in report.to_markdown()
        True
        ```
    """

    num_nodes: int
    num_groups: int
    train_mode: str = "lora"
    engine: str = "simulation"
    group_boundaries: list[int] = field(default_factory=list)
    part_nbytes: dict[str, int] = field(default_factory=dict)
    shard_sizes: list[int] = field(default_factory=list)
    shard_summary: dict | None = None
    designation: dict | None = None
    memory_kind: str = ""
    stages: list[StageRecord] = field(default_factory=list)
    hops: list[HopRecord] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(hop.nbytes for hop in self.hops)

    def link_bytes(self) -> dict[str, int]:
        """Bytes per directed link `"sender->receiver"`."""
        links: dict[str, int] = {}
        for hop in self.hops:
            key = f"{hop.sender}->{hop.receiver}"
            links[key] = links.get(key, 0) + hop.nbytes
        return links

    def peak_memory_per_node(self) -> dict[int, int]:
        peaks: dict[int, int] = {}
        for record in self.stages:
            if record.peak_memory_bytes is not None:
                peaks[record.node] = max(peaks.get(record.node, 0), record.peak_memory_bytes)
        return peaks

    def peak_above_model_per_node(self) -> dict[int, int]:
        """Per node, the largest stage peak above the loaded model (stages that recorded a memory baseline)."""
        peaks: dict[int, int] = {}
        for record in self.stages:
            above = record.peak_above_model_bytes
            if above is not None:
                peaks[record.node] = max(peaks.get(record.node, 0), above)
        return peaks

    def estimated_memory_per_node(self) -> dict[int, int]:
        """Per node, the largest estimate of a stage's training memory (runs with node profiles that set a budget)."""
        estimates: dict[int, int] = {}
        for record in self.stages:
            value = record.extra.get("estimated_memory_bytes")
            if value is not None:
                estimates[record.node] = max(estimates.get(record.node, 0), int(value))
        return estimates

    def plan_loss(self) -> float | None:
        """The training loss of the whole plan: the stages' mean losses weighted by their steps (every node's stages,
        also in distributed mode once the reports are merged)."""
        done = [r for r in self.stages if r.train_loss is not None and r.steps]
        steps = sum(r.steps for r in done)
        return sum(r.train_loss * r.steps for r in done) / steps if steps else None

    def log_metrics(self, record: StageRecord) -> dict[str, float | int]:
        """What a finished stage logs through `Trainer.log` (so every `report_to` integration receives it): its loss,
        stage, node and group, `comm/bytes_sent` (this stage's payload), `comm/bytes_total` (all payloads so far) and
        `mem/peak` (the stage's peak in MiB, above the loaded model when the baseline is known)."""
        metrics: dict[str, float | int] = {"stage_loss": record.train_loss, "stage": record.stage}
        metrics.update(node=record.node, group=record.group)
        metrics["comm/bytes_sent"] = record.bytes_sent
        metrics["comm/bytes_total"] = self.total_bytes
        peak = record.peak_above_model_bytes
        peak = record.peak_memory_bytes if peak is None else peak
        if peak is not None:
            metrics["mem/peak"] = round(peak / 2**20, 1)
        return metrics

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        data["link_bytes"] = self.link_bytes()
        data["peak_memory_per_node"] = {str(k): v for k, v in self.peak_memory_per_node().items()}
        data["peak_above_model_per_node"] = {str(k): v for k, v in self.peak_above_model_per_node().items()}
        return data

    def to_json(self, path: str | os.PathLike) -> Path:
        """Writes the report to `path` (a file, or a folder that gets `snake_report.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SnakeReport:
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        data = json.loads(path.read_text())
        for derived in ("total_bytes", "link_bytes", "peak_memory_per_node", "peak_above_model_per_node"):
            data.pop(derived, None)
        data["stages"] = [StageRecord(**s) for s in data.get("stages", [])]
        data["hops"] = [HopRecord(**h) for h in data.get("hops", [])]
        return cls(**data)

    def to_markdown(self) -> str:
        """The per-stage table: stage, pass, node, group, steps, loss, seconds, bytes in/out, peak memory."""
        above = any(r.peak_above_model_bytes is not None for r in self.stages)
        memory = "MiB above model" if above else "peak MiB"
        lines = [
            f"| stage | pass | node | group | steps | train loss | seconds | bytes in | bytes out | {memory} |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.stages:
            loss = "" if r.train_loss is None else f"{r.train_loss:.4f}"
            value = r.peak_above_model_bytes if above else r.peak_memory_bytes
            peak = "" if value is None else f"{value / 2**20:.0f}"
            lines.append(
                f"| {r.stage} | {r.pass_index} | {r.node} | {r.group} | {r.steps} | {loss} | {r.wall_seconds:.1f} "
                f"| {r.bytes_received:,} | {r.bytes_sent:,} | {peak} |"
            )
        lines.append(f"\n{len(self.hops)} hops, {self.total_bytes:,} bytes moved in all.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, folder: str | os.PathLike) -> list[Path]:
        """Draws loss per stage, bytes per hop, memory per stage and the snake's path to `folder/snake_report.png`.

        The memory panel shows, per stage, what its node needed above the loaded model (measured) and, when the run
        had a memory estimate, the estimate; with no recorded baseline it shows the process's peak, labelled so.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
        stages = [r.stage for r in self.stages]
        ax = axes[0][0]
        ax.plot(stages, [r.train_loss for r in self.stages], marker="o")
        ax.set(title="training loss per stage (mean over its steps)", xlabel="stage", ylabel="loss")
        ax = axes[0][1]
        ax.bar(range(len(self.hops)), [h.nbytes / 2**20 for h in self.hops], color="tab:orange")
        ax.set_xticks(range(len(self.hops)), [f"{h.sender}→{h.receiver}" for h in self.hops])
        ax.set(title=f"bytes per hop (total {self.total_bytes / 2**20:.2f} MiB)", xlabel="hop (node → node)")
        ax.set_ylabel("MiB")
        self._plot_memory(axes[1][0])
        self._plot_path(axes[1][1])
        fig.tight_layout()
        path = folder / "snake_report.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]

    def _plot_memory(self, ax) -> None:
        import matplotlib.pyplot as plt

        colors = plt.get_cmap("tab10")
        above = [r.peak_above_model_bytes for r in self.stages]
        measured_above = any(v is not None for v in above)
        values = above if measured_above else [r.peak_memory_bytes for r in self.stages]
        label = "measured peak above the loaded model" if measured_above else "measured peak of the whole process"
        xs = list(range(len(self.stages)))
        heights = [0 if v is None else v / 2**20 for v in values]
        ax.bar(xs, heights, color=[colors(r.node % 10) for r in self.stages], label=label)
        estimates = [r.extra.get("estimated_memory_bytes") for r in self.stages]
        if any(e is not None for e in estimates):
            points = [(x, e / 2**20) for x, e in zip(xs, estimates) if e is not None]
            ax.scatter(*zip(*points), marker="_", s=400, color="black", zorder=3, label="estimate (capacity model)")
        ax.set_xticks(xs, [f"{r.stage}\nn{r.node} g{r.group}" for r in self.stages], fontsize="small")
        kind = {"cpu_rss_hwm": "CPU resident set", "cuda_allocated": "CUDA allocated"}.get(self.memory_kind, "")
        ax.set(title=f"memory a node needs per stage ({kind}; bar colour = node)", xlabel="stage, node, group")
        ax.set_ylabel("MiB")
        ax.legend(fontsize="small", loc="lower right")

    def _plot_path(self, ax) -> None:
        import matplotlib.pyplot as plt

        colors = plt.get_cmap("viridis", max(self.num_groups, 1))
        xs = [r.node for r in self.stages]
        ys = [r.stage for r in self.stages]
        ax.plot(xs, ys, color="tab:gray", zorder=1)
        for group in range(self.num_groups):
            points = [(r.node, r.stage) for r in self.stages if r.group == group]
            if points:
                ax.scatter(*zip(*points), color=colors(group), s=60, zorder=2, label=f"group {group}")
        ax.set(title="the snake: which node trains which group, stage by stage", xlabel="node", ylabel="stage")
        ax.set_xticks(range(self.num_nodes))
        ax.invert_yaxis()
        ax.legend(title="block group", fontsize="small", loc="best")
