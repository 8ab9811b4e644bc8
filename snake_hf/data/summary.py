"""What each node's shard holds: sizes and label distributions as a table (`shard_summary`) and a plot (`plot_shards`)."""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers.utils import logging

from .shards import _read_labels


logger = logging.get_logger(__name__)


__all__ = ["ShardSummary", "plot_shards", "shard_summary"]


@dataclass
class ShardSummary:
    """Per-node sizes and label distributions of a list of shards, printable as a Markdown table.

    Args:
        rows (`list[dict]`): One dict per node with keys `"node"`, `"size"`, and, when labels are known,
            `"label_counts"` (`{label: count}` over all `labels`, zeros included) and `"entropy"` (bits).
        labels (`list`): The distinct labels across all shards, sorted when they are comparable; empty if none.

    Example:
    ```python
    >>> print(shard_summary(shards))
    | node | size | 0 | 1 | entropy |
    ...
    ```
    """

    rows: list[dict] = field(default_factory=list)
    labels: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable dict; `label_counts` keys are `str(label)`, `labels` keeps the originals."""
        rows = [
            {**row, "label_counts": {str(label): n for label, n in row["label_counts"].items()}}
            if "label_counts" in row
            else dict(row)
            for row in self.rows
        ]
        return {"labels": list(self.labels), "rows": rows}

    def to_markdown(self) -> str:
        """Returns a Markdown table: `node | size | one column per label | entropy`."""
        header = ["node", "size", *map(str, self.labels)] + (["entropy"] if self.labels else [])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [str(row["node"]), str(row["size"])]
            if self.labels:
                cells += [str(row["label_counts"][label]) for label in self.labels] + [f"{row['entropy']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _entropy_bits(counts: Sequence[int]) -> float:
    total = sum(counts)
    # `0.0 - x` rather than `-x`: a one-label node has entropy 0.0, not -0.0
    return float(0.0 - sum(c / total * math.log2(c / total) for c in counts if c > 0)) if total else 0.0


def shard_summary(shards: Sequence[datasets.Dataset], label_column: str | None = "label") -> ShardSummary:
    """Summarises each node's size and, when `label_column` is present in every shard, its label distribution.

    Args:
        shards (`Sequence[datasets.Dataset]`): One dataset per node, e.g. the output of `Partitioner.split`.
        label_column (`str`, *optional*, defaults to `"label"`): Label column; `None` or absent gives sizes only.

    Returns:
        `ShardSummary`: One row per node; entropy is the Shannon entropy (bits) of the node's label distribution.

    Example:
    ```python
    >>> summary = shard_summary(DirichletPartitioner(4, alpha=0.5).split(dataset))
    >>> summary.rows[0]["entropy"]
    ```
    """
    with_labels = label_column is not None and all(label_column in s.column_names for s in shards)
    if label_column is not None and not with_labels:
        logger.info(f"Column {label_column!r} is missing from some shards; summarising sizes only.")
    if not with_labels:
        return ShardSummary(rows=[{"node": i, "size": len(s)} for i, s in enumerate(shards)], labels=[])

    per_node = []
    for shard in shards:
        values, counts = np.unique(_read_labels(shard, label_column), return_counts=True)
        per_node.append(dict(zip(values.tolist(), counts.tolist())))  # `tolist` gives Python ints / strs
    labels = list(dict.fromkeys(label for counts in per_node for label in counts))
    with contextlib.suppress(TypeError):  # mixed label types keep their first-seen order
        labels.sort()
    rows = []
    for i, (shard, counts) in enumerate(zip(shards, per_node)):
        full = {label: counts.get(label, 0) for label in labels}
        rows.append(
            {"node": i, "size": len(shard), "label_counts": full, "entropy": _entropy_bits(list(full.values()))}
        )
    return ShardSummary(rows=rows, labels=labels)


def plot_shards(
    shards_or_summary: Sequence[datasets.Dataset] | ShardSummary,
    path: str | os.PathLike,
    label_column: str | None = "label",
    title: str | None = None,
    label_names: Sequence[str] | None = None,
) -> pathlib.Path:
    """Saves a stacked horizontal bar chart of each node's label counts (or sizes, without labels) as a PNG.

    Draws on an Agg canvas through `matplotlib.figure.Figure`, leaving pyplot's global backend untouched.

    Args:
        shards_or_summary (`Sequence[datasets.Dataset]` or `ShardSummary`): The shards, or their summary.
        path (`str` or `os.PathLike`): Where to write the PNG; parent folders are created.
        label_column (`str`, *optional*, defaults to `"label"`): Label column, used when shards are given.
        title (`str`, *optional*): Figure title (say the split, e.g. "Dirichlet α=0.1").
        label_names (`Sequence[str]`, *optional*): Class names by label id (e.g. a `ClassLabel`'s `names`) for the
            legend; labels are shown as they are without it.

    Returns:
        `pathlib.Path`: The path written.

    Example:
    ```python
    >>> plot_shards(shards, "out/shards.png", title="Dirichlet alpha=0.5")
    PosixPath('out/shards.png')
    ```
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = shards_or_summary
    if not isinstance(summary, ShardSummary):
        summary = shard_summary(summary, label_column)
    nodes = [row["node"] for row in summary.rows]
    fig = Figure(figsize=(8, 1.5 + 0.35 * len(nodes)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if summary.labels:
        num_labels = len(summary.labels)
        cmap = colormaps["tab10" if num_labels <= 10 else "tab20" if num_labels <= 20 else "viridis"]
        colors = [cmap(i if num_labels <= 20 else i / (num_labels - 1)) for i in range(num_labels)]
        left = np.zeros(len(nodes))
        for label, color in zip(summary.labels, colors):
            counts = np.array([row["label_counts"][label] for row in summary.rows], dtype=float)
            name = label_names[label] if label_names is not None and isinstance(label, int) else label
            ax.barh(nodes, counts, left=left, color=color, label=str(name))
            left += counts
        if num_labels <= 20:
            ax.legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    else:
        ax.barh(nodes, [row["size"] for row in summary.rows], color="tab:blue")
    ax.set_yticks(nodes)
    ax.invert_yaxis()  # node 0 on top, like the table
    ax.set_xlabel("examples")
    ax.set_ylabel("node")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
