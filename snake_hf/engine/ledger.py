"""Version vectors: which version of every part each node holds, so a hop carries exactly what the receiver lacks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


__all__ = ["VersionLedger"]


class VersionLedger:
    """Version vectors: for every node, the version (and, where known, the checksum) of every part it holds.

    Versions are metadata that follows from the plan alone, so every node can keep the whole ledger; checksums are
    known for the nodes whose tensors this process holds (all of them in simulation, its own in distributed mode).

    Args:
        num_nodes (`int`): number of nodes.
        initial (`dict[str, str]`): checksum of every part at version 0 (identical on every node).
    """

    def __init__(self, num_nodes: int, initial: Mapping[str, str]):
        self.num_nodes = num_nodes
        self.parts = list(initial)
        self.versions = [dict.fromkeys(self.parts, 0) for _ in range(num_nodes)]
        self.checksums = [dict(initial) for _ in range(num_nodes)]

    def state(self, node: int) -> dict[str, tuple[int, str]]:
        return {p: (self.versions[node][p], self.checksums[node].get(p, "")) for p in self.parts}

    def latest(self, part: str) -> int:
        return max(versions[part] for versions in self.versions)

    def lacking(self, receiver: int, sender: int) -> list[str]:
        """Parts whose version at `receiver` is behind `sender`'s."""
        return [p for p in self.parts if self.versions[receiver][p] < self.versions[sender][p]]

    def record_training(self, node: int, checksums: Mapping[str, str]) -> None:
        """`node` trained these parts: each becomes the newest version of its part."""
        for part, checksum in checksums.items():
            self.versions[node][part] = self.latest(part) + 1
            self.checksums[node][part] = checksum

    def record_receipt(self, node: int, state: Mapping[str, tuple[int, str]], parts: Iterable[str]) -> None:
        """`node` received `parts` at the sender's `state`."""
        for part in parts:
            self.versions[node][part], self.checksums[node][part] = state[part]

    def mismatches(self, node: int, state: Mapping[str, tuple[int, str]]) -> list[str]:
        """Parts where `node`'s (version, checksum) differs from `state` (empty when it holds exactly that state)."""
        return [p for p in self.parts if (self.versions[node][p], self.checksums[node].get(p)) != tuple(state[p])]
