"""What a Snake run did, stage by stage: losses, bytes, time, memory; as JSON, a table, plots and model-card text."""

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

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        data["link_bytes"] = self.link_bytes()
        data["peak_memory_per_node"] = {str(k): v for k, v in self.peak_memory_per_node().items()}
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
        for derived in ("total_bytes", "link_bytes", "peak_memory_per_node"):
            data.pop(derived, None)
        data["stages"] = [StageRecord(**s) for s in data.get("stages", [])]
        data["hops"] = [HopRecord(**h) for h in data.get("hops", [])]
        return cls(**data)

    def to_markdown(self) -> str:
        """The per-stage table: stage, pass, node, group, steps, loss, seconds, bytes in/out, peak memory."""
        lines = [
            "| stage | pass | node | group | steps | train loss | seconds | bytes in | bytes out | peak MiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.stages:
            loss = "" if r.train_loss is None else f"{r.train_loss:.4f}"
            peak = "" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}"
            lines.append(
                f"| {r.stage} | {r.pass_index} | {r.node} | {r.group} | {r.steps} | {loss} | {r.wall_seconds:.1f} "
                f"| {r.bytes_received:,} | {r.bytes_sent:,} | {peak} |"
            )
        lines.append(f"\n{len(self.hops)} hops, {self.total_bytes:,} bytes moved in all.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, folder: str | os.PathLike) -> list[Path]:
        """Draws loss per stage, bytes per hop, peak memory per node and the snake's path to PNGs in `folder`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        stages = [r.stage for r in self.stages]
        ax = axes[0][0]
        ax.plot(stages, [r.train_loss for r in self.stages], marker="o")
        ax.set(title="training loss per stage", xlabel="stage", ylabel="loss")
        ax = axes[0][1]
        ax.bar(range(len(self.hops)), [h.nbytes / 1024 for h in self.hops], color="tab:orange")
        ax.set(title=f"bytes per hop (total {self.total_bytes / 2**20:.2f} MiB)", xlabel="hop", ylabel="KiB")
        ax = axes[1][0]
        peaks = self.peak_memory_per_node()
        ax.bar([str(n) for n in peaks], [v / 2**20 for v in peaks.values()], color="tab:green")
        ax.set(title=f"peak memory per node ({self.memory_kind})", xlabel="node", ylabel="MiB")
        ax = axes[1][1]
        xs = [r.node for r in self.stages]
        ys = [r.stage for r in self.stages]
        ax.plot(xs, ys, color="tab:gray", zorder=1)
        ax.scatter(xs, ys, c=[r.group for r in self.stages], cmap="viridis", s=60, zorder=2)
        ax.set(title="the snake: node per stage (colour = group)", xlabel="node", ylabel="stage")
        ax.set_xticks(range(self.num_nodes))
        ax.invert_yaxis()
        fig.tight_layout()
        path = folder / "snake_report.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]

    def model_card_section(self, plan: str = "", shards: str = "") -> str:
        """Markdown describing the run, for the model card: setting, plan, shards, bytes, memory, metrics, stages."""
        peaks = self.peak_memory_per_node()
        lines = [
            "## Snake Learning",
            "",
            f"Trained with snake_hf (Snake Learning) over {self.num_nodes} nodes and {self.num_groups} block groups "
            f"(boundaries {self.group_boundaries}, {self.train_mode} mode, {self.engine} engine). Each node kept its "
            "data; only the trained tensors travelled between nodes.",
            "",
            f"**Bytes moved between nodes:** {self.total_bytes:,} in {len(self.hops)} hops.",
            "",
        ]
        if plan:
            lines += ["### Plan", "", "```", plan, "```", ""]
        if shards:
            lines += ["### Shards", "", shards, ""]
        elif self.shard_sizes:
            lines.append(f"Shard sizes per node: {self.shard_sizes}.")
        if peaks:
            lines.append(
                "**Peak memory per node** (MiB): " + ", ".join(f"node {n}: {v / 2**20:.0f}" for n, v in peaks.items())
            )
        if self.metrics:
            lines += ["", "**Evaluation:** " + ", ".join(f"{k} = {v:.4g}" for k, v in self.metrics.items())]
        lines += ["", "### Stages", "", self.to_markdown()]
        return "\n".join(lines)
