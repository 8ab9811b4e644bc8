"""Transports carry encoded payloads between nodes. They know tensors and addresses, nothing about PEFT or models.

`InMemoryTransport` is the simulation's wire: the encoded tensors are queued per link exactly as they would be sent,
so the receiving side decodes, verifies and counts the same bytes as over a socket.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict, deque

from .payload import EncodedPayload


__all__ = ["Transport", "InMemoryTransport", "HopTimeoutError"]


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
