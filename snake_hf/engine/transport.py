"""Transports carry encoded payloads between nodes. They know tensors and addresses, nothing about PEFT or models.

`InMemoryTransport` is the simulation's wire: the encoded tensors are queued per link exactly as they would be sent,
so the receiving side decodes, verifies and counts the same bytes as over a socket.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict, deque

from .payload import EncodedPayload


__all__ = ["HopTimeoutError", "InMemoryTransport", "Transport"]


class HopTimeoutError(TimeoutError):
    """A payload did not arrive within `hop_timeout`."""


class Transport(ABC):
    """Interface: `send` an encoded payload from one node to another, `recv` it at the other end."""

    @abstractmethod
    def send(self, src: int, dst: int, encoded: EncodedPayload, stage: int) -> None:
        """Sends `encoded` from node `src` to node `dst`, for stage `stage` (the receiver's stage)."""

    @abstractmethod
    def recv(self, src: int, dst: int, stage: int) -> EncodedPayload:
        """Waits for the payload from `src` to `dst` for stage `stage`; raises `HopTimeoutError` when it is late."""

    def expect(self, hops: list[tuple[int, int, int]]) -> None:  # noqa: B027 - optional hook
        """Told once, before training, every hop of the plan as `(src, dst, stage)` (a cs coordinator forwards)."""

    def before_stage(self, stage: int) -> None:  # noqa: B027 - optional hook
        """Called on a node before it enters `stage`: a cs coordinator forwards the hops due before it."""

    def drain(self) -> None:  # noqa: B027 - optional hook
        """Called after a node's last stage: a cs coordinator forwards the hops still due."""

    def broadcast_final(self, encoded: EncodedPayload | None, src: int) -> EncodedPayload | None:
        """Hands the final payload from node `src` to every other process (in-process transports: nothing to do)."""
        return encoded

    def exchange_text(self, name: str, text: str) -> list[str]:
        """Every process's `text` on every process; in-process: just `[text]`."""
        return [text]

    def gather_text(self, name: str, text: str) -> list[str] | None:
        """Collects one text per process on the first one (others get None); in-process: just `[text]`."""
        return [text]

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Releases the transport's resources."""


class InMemoryTransport(Transport):
    """Per-link FIFO queues in this process (the simulation engine's transport)."""

    def __init__(self):
        self._queues: dict[tuple[int, int], deque] = defaultdict(deque)

    def send(self, src: int, dst: int, encoded: EncodedPayload, stage: int) -> None:
        self._queues[(src, dst)].append((stage, encoded))

    def recv(self, src: int, dst: int, stage: int) -> EncodedPayload:
        queue = self._queues[(src, dst)]
        if not queue:
            raise HopTimeoutError(f"No payload from node {src} to node {dst} for stage {stage} (in-memory transport).")
        _, encoded = queue.popleft()
        return encoded
