"""Transports carry encoded payloads between nodes. They know tensors and addresses, nothing about PEFT or models.

* [`Transport`]: what every relay uses — `send` and `recv` a stage's payload, hand the final state to every process,
  and exchange small texts (in one process these reduce to no-ops).
* [`CoordinatedTransport`]: what the cs coordinator's relay (`snake_hf.engine.coordinator`) uses on top — a shared
  key-value store for turns and plans, waits on it that notice a dead peer, and payloads sent straight to a chosen
  rank. `DistributedTransport` (`torch_dist.py`) implements it.
* [`InMemoryTransport`]: the simulation's wire: the encoded tensors are queued per link exactly as they would be
  sent, so the receiving side decodes, verifies and counts the same bytes as over a socket.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Protocol

from .payload import EncodedPayload


__all__ = ["CoordinatedTransport", "HopTimeoutError", "InMemoryTransport", "KeyValueStore", "Transport"]


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


class KeyValueStore(Protocol):
    """The part of a rendezvous store (`torch.distributed.Store`) that a coordinated relay uses."""

    def set(self, key: str, value: str) -> None:
        """Sets `key` to `value`, visible to every process."""

    def get(self, key: str) -> bytes:
        """The value of `key` (which must be set: wait for it with [`CoordinatedTransport.wait_for`])."""

    def check(self, keys: list[str]) -> bool:
        """Whether every key of `keys` is set, without waiting."""


class CoordinatedTransport(Transport):
    """A [`Transport`] with what a cs coordinator needs to drive the plan itself and survive a dead node.

    The coordinator's relay ([`FailoverRelay`]) publishes turns and re-planned plans in `store` (with `publish`, read
    back with `read`: authenticated when the run has a secret), waits for keys with
    `wait_for` (which notices a peer that died), and routes every payload itself with `send_to` / `recv_from`; the
    other ranks `send` and `recv` as usual, and a payload between two of them travels through `coordinator`.

    Attributes:
        coordinator (`int`): the rank that every cs payload passes through.
        store ([`KeyValueStore`]): the store every process shares (e.g. the run's rendezvous store).

    Example:
        ```python
        >>> transport.publish("snake/cs/turn/1/0", '{"stage": 1, "generation": 0}')  # on the coordinator (rank 0)
        >>> transport.wait_for({0: "snake/cs/turn/1/0"}, lambda reason: f"waiting for a turn: {reason}")  # on rank 1
        >>> transport.send_to(1, encoded, 1, src=2, dst=1)  # rank 0 passes node 2's payload on into stage 1
        ```
    """

    coordinator: int
    store: KeyValueStore

    @abstractmethod
    def send_to(self, peer: int, encoded: EncodedPayload, hop: int | str, src: int, dst: int) -> None:
        """Sends `encoded` straight to rank `peer` as hop `hop` (a stage index, or a name such as `"final/cs"`).

        `src` and `dst` are the payload's ends in the plan, for error messages (`peer` may be the coordinator between
        them). Raises [`HopTimeoutError`] when `peer` dies or does not take it.
        """

    @abstractmethod
    def recv_from(self, peer: int, hop: int | str, src: int, dst: int) -> EncodedPayload:
        """Receives hop `hop` straight from rank `peer` (the other end of [`send_to`]); raises [`HopTimeoutError`]
        when `peer` dies or sends nothing."""

    def publish(self, key: str, text: str) -> None:
        """Sets `key` to `text` in `store` as this rank's message (sealed when the run is authenticated)."""
        self.store.set(key, text)

    def read(self, key: str, writer: int, what: str = "message") -> str:
        """The text rank `writer` published under `key` (which must be set); an authenticated transport raises
        [`snake_hf.engine.auth.AuthenticationError`] naming `what` and `writer` when the text is not that rank's."""
        return self.store.get(key).decode()

    @abstractmethod
    def wait_for(self, keys: dict[int, str], describe: Callable[[str], str], drop_absent: bool = False) -> None:
        """Waits until `store` holds every key of `keys` (peer rank -> key), for as long as those peers live.

        A peer that dies, never joins or closes its transport first raises [`HopTimeoutError`] with the message
        `describe(reason)`; with `drop_absent` it is logged and no longer waited for instead.
        """


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
