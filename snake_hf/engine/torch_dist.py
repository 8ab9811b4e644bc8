"""The distributed engine's wire: encoded payloads over torch.distributed (gloo), in p2p or cs topology.

Only this module touches torch.distributed, and never the default process group: each rank runs an ordinary
single-process `Trainer`, so `init_process_group` is not called here. Instead the ranks share a rendezvous store
(`TCPStore`; under `torchrun` the agent's store) and every link gets its own two-rank gloo group, built on first use,
so a timeout or a dead peer on one link cannot poison the others (gloo closes a group's pairs after such a failure).

**Liveness is measured per hop, not from the start of a wait.** A rank may wait for its turn through many stages of
other ranks' training, so a receive cannot simply time out after `hop_timeout`. Instead:

* every rank's background thread bumps the counter `snake/alive/{rank}` every `heartbeat_interval` seconds, and
  `close()` sets `snake/closed/{rank}`;
* before a hop the sender sets `snake/hop/{stage}/{src}-{dst}/sent` and the receiver sets `.../ready`; each side polls
  the store for the other's key, and gives up only when the peer's heartbeat has not moved for `heartbeat_timeout`
  seconds (it died or never joined) or the peer closed its transport;
* once both ends are there, the transfer itself (link set-up, header, manifest, data) must finish within
  `hop_timeout`, which covers a sender that announced a hop and then hung.

Every failure is raised as [`HopTimeoutError`] naming the stage, both ranks and the topology. A failed link is not
reused (its gloo pairs are closed). The store lives in rank 0 (unless launched under `torchrun`), so rank 0's
`close()` waits until every other rank has closed or died.

In cs topology `send` and `recv` between two ranks other than the coordinator go to or come from the coordinator; the
coordinator itself routes with `send_to` / `recv_from` and decides who trains next, surviving a dead node
([`FailoverRelay`] in `snake_hf.engine.coordinator`; this class is its [`CoordinatedTransport`]). The launcher helpers
(`launch_info`, `hide_launch_env`) live in `snake_hf.launch` and are re-exported here.

Wire protocol per payload: the int64 header, then the uint8 manifest, then the uint8 data (skipped when empty); the
receiver reads the header to allocate the other two. Nothing is pickled.

**With a `run_secret`** (`snake_hf.engine.auth`, docs/security.md) the ranks first pass a join check through the store
(each proves it holds the secret, for this launch's session id), every value the engine reads from the store is sealed
by its writer (turns, plans, heartbeats, hop and closed flags, exchanged and gathered texts, barriers) and checked by
its reader, and each payload is followed by a 64-byte seal on its own tag: the header's tag, checked before anything
is allocated from it, then the whole payload's, bound to the session, hop, both ranks and the link's sequence number.
A heartbeat also lists the keys its rank published lately, so a message deleted from the store while a peer waits for
it stops that peer, named, instead of leaving it waiting on a live rank. A refusal raises [`AuthenticationError`]
(a `PayloadError`: nothing was loaded) naming the hop or message and the rank it claims to come from.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers.utils import logging

from ..launch import TOPOLOGIES, HiddenLaunchEnv, LaunchInfo, hide_launch_env, launch_info
from .auth import SEAL_NBYTES, AuthenticationError, RunAuth, exposure_warning
from .join import JoinCheck
from .payload import HEADER_NUMEL, EncodedPayload, PayloadError, check_header
from .transport import CoordinatedTransport, HopTimeoutError


logger = logging.get_logger(__name__)

__all__ = ["DistributedTransport", "HiddenLaunchEnv", "LaunchInfo", "hide_launch_env", "launch_info"]

_STAGE_TAGS = 1 << 28  # gloo tags are int32: 4 tags per stage (header, manifest, data, seal), then the final block
_FINAL_TAG = 4 * _STAGE_TAGS
_ALIVE, _CLOSED = "snake/alive/{}", "snake/closed/{}"  # heartbeat counter, and "closed its transport", per rank
_RECENT_KEYS = 64  # keys a rank's heartbeat lists as published lately (a deleted one is noticed, not waited for)
_exposure_warned = threading.Event()  # a process without a secret warns once that its store is exposed
# Polling the store while a peer is not there yet: from _MIN_POLL, doubling up to _MAX_POLL (see `_await_keys`).
_MIN_POLL, _MAX_POLL = 0.001, 0.005


class DistributedTransport(CoordinatedTransport):
    """Carries encoded payloads between ranks over per-link gloo groups (see the module docstring for liveness).

    Args:
        rank (`int`): this process's rank (= node).
        world_size (`int`): number of ranks.
        topology (`str`, defaults to `"p2p"`): `"p2p"` (straight to the next stage's rank) or `"cs"` (a payload
            between two other ranks goes to `coordinator`, which passes it on with `send_to`).
        hop_timeout (`float`, defaults to 600.0): seconds a transfer may take once both ends are at the hop.
        store (`torch.distributed.Store`, *optional*): a rendezvous store; by default a `TCPStore` at
            `master_addr:master_port`, served by rank 0 when `store_server` is None.
        master_addr (`str`, *optional*), master_port (`int`, *optional*): default to `MASTER_ADDR`, `MASTER_PORT`.
        coordinator (`int`, defaults to 0): the coordinator rank in cs topology.
        heartbeat_interval (`float`, defaults to 1.0): seconds between heartbeats.
        heartbeat_timeout (`float`, *optional*): a peer whose heartbeat is still that long is dead (default
            `hop_timeout`).
        store_server (`bool`, *optional*): whether the store lives in this process, so that `close()` must wait for
            the others (default: rank 0 when no `store` is given).
        run_secret (`str`, *optional*): the run's shared secret ([`resolve_run_secret`]). With it the rank joins with
            a challenge-response (every rank must hold the same secret; a rank that does not joins no run) and every
            store message and payload is sealed and checked ([`snake_hf.engine.auth`]). Without it, today's wire,
            and one warning when the store is reachable beyond this host.

    Example:
        ```python
        >>> info = launch_info()
        >>> hide_launch_env()
        >>> transport = DistributedTransport.from_launch(info, topology="p2p", hop_timeout=120)
        >>> transport.send(0, 1, encoded, stage=1)  # on rank 0; rank 1 calls transport.recv(0, 1, stage=1)
        ```
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        topology: str = "p2p",
        hop_timeout: float = 600.0,
        store: dist.Store | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        coordinator: int = 0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float | None = None,
        store_server: bool | None = None,
        run_secret: str | None = None,
    ):
        if topology not in TOPOLOGIES:
            raise ValueError(f"`topology` ({topology!r}) must be one of {TOPOLOGIES}.")
        if not 0 <= rank < world_size or not 0 <= coordinator < world_size:
            raise ValueError(f"`rank` ({rank}) and `coordinator` ({coordinator}) must lie in [0, {world_size}).")
        self.rank, self.world_size, self.topology, self.coordinator = rank, world_size, topology, coordinator
        self.hop_timeout = hop_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = hop_timeout if heartbeat_timeout is None else heartbeat_timeout
        self.link_bytes: dict[tuple[int, int], int] = defaultdict(int)
        self._store_server = rank == 0 and store is None if store_server is None else store_server
        addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(master_port or os.environ.get("MASTER_PORT", "29500"))
        if store is None:
            store = dist.TCPStore(
                addr, port, None, self._store_server, timedelta(seconds=hop_timeout), wait_for_workers=False
            )
        self.store = store
        self._groups: dict[tuple[int, int], dist.ProcessGroup | None] = {}
        self._final_count = 0
        self._barrier_count: dict[str, int] = defaultdict(int)
        self._exchange_count: dict[str, int] = defaultdict(int)
        self._seq_out: dict[int, int] = defaultdict(int)  # payloads sent to / taken from each peer: the sequence
        self._seq_in: dict[int, int] = defaultdict(int)  # numbers their seals are bound to
        self._closed = False
        self._recent: deque[str] = deque(maxlen=_RECENT_KEYS)  # keys this rank published lately, in its heartbeat
        self._peer_recent: dict[int, list[str]] = {}  # the same, per peer, from its last heartbeat
        self._auth = RunAuth(run_secret)
        self._join_check = JoinCheck(
            self.store, rank, world_size, self.heartbeat_timeout, self._store_server, topology
        )
        if self._auth.enabled:
            self._join_check.authenticate(self._auth)
        else:
            self._join_check.announce_unauthenticated()
            warning = exposure_warning(addr, port)
            if warning and not _exposure_warned.is_set():
                _exposure_warned.set()
                logger.warning(warning)
        self._beat_count = 1
        self._set_alive(self.store, self._beat_count)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"snake-heartbeat-{rank}", daemon=True)
        self._heartbeat.start()

    @classmethod
    def from_launch(cls, info: LaunchInfo, **kwargs) -> DistributedTransport:
        """Builds the transport from [`launch_info`]; under `torchrun` it joins the agent's store as a client."""
        if info.use_agent_store and "store" not in kwargs:
            client = dist.TCPStore(
                info.master_addr, info.master_port, None, False, timedelta(seconds=kwargs.get("hop_timeout", 600.0))
            )
            kwargs["store"] = dist.PrefixStore(f"snake_attempt_{info.restart_count}", client)
            kwargs.setdefault("store_server", False)
        kwargs.setdefault("master_addr", info.master_addr)
        kwargs.setdefault("master_port", info.master_port)
        return cls(info.rank, info.world_size, **kwargs)

    @property
    def authenticated(self) -> bool:
        """Whether this rank passed the join check and seals and checks every payload and store message."""
        return self._auth.enabled and bool(self._auth.session)

    # -- the Transport interface ------------------------------------------------------------------------------------

    def send(self, src: int, dst: int, encoded: EncodedPayload, stage: int) -> None:
        self._check_self(src, "send", "src")
        self._wire_send(self.coordinator if self._via(src, dst) else dst, encoded, stage, f"stage {stage}", src, dst)

    def recv(self, src: int, dst: int, stage: int) -> EncodedPayload:
        self._check_self(dst, "recv", "dst")
        return self._wire_recv(self.coordinator if self._via(src, dst) else src, stage, f"stage {stage}", src, dst)

    # -- the CoordinatedTransport interface (the cs coordinator's own routing) ---------------------------------------

    def send_to(self, peer: int, encoded: EncodedPayload, hop: int | str, src: int, dst: int) -> None:
        self._wire_send(peer, encoded, hop, f"stage {hop}" if isinstance(hop, int) else hop, src, dst)

    def recv_from(self, peer: int, hop: int | str, src: int, dst: int) -> EncodedPayload:
        return self._wire_recv(peer, hop, f"stage {hop}" if isinstance(hop, int) else hop, src, dst)

    def publish(self, key: str, text: str) -> None:
        """Sets `key` to `text` in the store, sealed as this rank's when the run has a secret."""
        self.store.set(key, self._auth.seal_text(key, self.rank, text))
        if self._auth.enabled:
            self._recent.append(key)

    def read(self, key: str, writer: int, what: str = "message") -> str:
        """The text rank `writer` published under `key` (which must be set); with a secret, raises
        [`AuthenticationError`] naming `what` and `writer` when it is not that rank's for that key in this run."""
        # `get` would wait out the store's timeout for a key deleted after the caller saw it: check it first (a
        # deletion then is named at once), and name one that falls in the moment between the check and the read.
        try:
            present = self.store.check([key])
            raw = self.store.get(key).decode("utf-8", errors="replace") if present else None
        except RuntimeError as error:  # the key vanished after the check, or the store's server is gone
            if self._gone(key):
                raise self._deleted(key, writer, what) from error
            raise HopTimeoutError(
                f"Rank {self.rank} could not read the {what} (store key {key!r}) of rank {writer}: {error} "
                f"(topology {self.topology})"
            ) from error
        if raw is None:
            raise self._deleted(key, writer, what)
        describe = lambda reason: (  # noqa: E731
            f"Rank {self.rank} refused the {what} (store key {key!r}) that claims to come from rank {writer}: "
            f"{reason} (topology {self.topology})."
        )
        return self._auth.open_text(key, writer, raw, describe)

    def _gone(self, key: str) -> bool:
        """Whether the store answers and no longer holds `key` (False when the store itself is unreachable)."""
        try:
            return not self.store.check([key])
        except RuntimeError:
            return False

    def _deleted(self, key: str, writer: int, what: str) -> Exception:
        """The error for a key that was set when this rank saw it and is gone when it reads it: no rank deletes a key
        another still has to read, so with a secret it is tampering; without one, a named stop instead of a wait."""
        reason = (
            f"rank {writer} published {key!r} but the store no longer holds it (its {what}): a process on the "
            "rendezvous store deleted it"
        )
        if self._auth.enabled:
            return AuthenticationError(
                f"Rank {self.rank}: {reason} (tampering; see docs/security.md; topology {self.topology})."
            )
        return HopTimeoutError(f"Rank {self.rank}: {reason} (topology {self.topology}).")

    # -- texts, barriers and the final state --------------------------------------------------------------------------

    def exchange_text(self, name: str, text: str) -> list[str]:
        """Every rank's `text`, in rank order, on every rank (through the store; e.g. local shard sizes)."""
        generation = self._exchange_count[name]  # each exchange of a name has its own keys: no stale text is read
        self._exchange_count[name] += 1
        prefix = f"snake/exchange/{name}/{generation}"
        self.publish(f"{prefix}/{self.rank}", text)
        keys = {r: f"{prefix}/{r}" for r in range(self.world_size) if r != self.rank}
        self.wait_for(keys, lambda reason: f"exchanging {name!r}: {reason} (topology {self.topology})")
        what = f"exchanged text {name!r}"
        return [text if r == self.rank else self.read(keys[r], r, what) for r in range(self.world_size)]

    def gather_text(self, name: str, text: str) -> list[str] | None:
        """Collects every rank's `text` on rank 0 through the store (small JSON reports; nothing pickled)."""
        self.publish(f"snake/gather/{name}/{self.rank}", text)
        if self.rank != 0:
            return None
        keys = {r: f"snake/gather/{name}/{r}" for r in range(1, self.world_size)}
        self.wait_for(keys, lambda reason: f"gathering {name!r}: {reason} (topology {self.topology})")
        return [text] + [self.read(keys[r], r, f"gathered text {name!r}") for r in range(1, self.world_size)]

    def barrier(self, name: str) -> None:
        """Waits until every rank reached the barrier `name` (over the store; no collective), while they live."""
        generation = self._barrier_count[name]
        self._barrier_count[name] += 1
        prefix = f"snake/barrier/{name}/{generation}"
        self.publish(f"{prefix}/{self.rank}", "1")
        keys = {r: f"{prefix}/{r}" for r in range(self.world_size) if r != self.rank}
        self.wait_for(keys, lambda reason: f"barrier {name!r}: {reason} (topology {self.topology})")
        for r, key in keys.items():
            self.read(key, r, f"barrier {name!r} flag")

    def broadcast_final(self, encoded: EncodedPayload | None, src: int) -> EncodedPayload:
        """Hands `encoded` (given on rank `src`, None elsewhere) to every rank; returns it on all (cs: via coordinator)."""
        hop = f"final/{self._final_count}"
        self._final_count += 1
        root = self.coordinator if self.topology == "cs" else src
        if self.rank == src and src != root:
            self._wire_send(root, encoded, hop, "final payload", src, root)
        if self.rank == root:
            if src != root:
                encoded = self._wire_recv(src, hop, "final payload", src, root)
            for other in range(self.world_size):
                if other not in (root, src):
                    self._wire_send(other, encoded, hop, "final payload", root, other)
        elif self.rank != src:
            encoded = self._wire_recv(root, hop, "final payload", root, self.rank)
        return encoded

    def close(self, wait: bool = True) -> None:
        """Stops the heartbeat and drops the links; the store's server first waits for every other rank to close."""
        if self._closed:
            return
        self._closed = True
        try:
            self.publish(_CLOSED.format(self.rank), "1")
            if self._store_server and wait:  # the store dies with this process: let every live rank finish first
                others = {r: _CLOSED.format(r) for r in range(self.world_size) if r != self.rank}
                self.wait_for(others, lambda reason: f"closing the store anyway: {reason}", drop_absent=True)
        except (RuntimeError, HopTimeoutError) as error:  # the store's server is gone
            logger.warning(f"Rank {self.rank} closes without waiting for the other ranks: {error}")
        self._stop.set()
        self._heartbeat.join(timeout=self.heartbeat_interval + 5)
        self._groups.clear()

    # -- the wire -----------------------------------------------------------------------------------------------------

    def _wire_send(self, peer: int, encoded: EncodedPayload, hop: int | str, what: str, src: int, dst: int) -> None:
        self.publish(self._hop_key(hop, self.rank, peer, "sent"), "1")
        describe = self._describe(what, src, dst, receiving=False)
        ready = self._hop_key(hop, self.rank, peer, "ready")
        self.wait_for({peer: ready}, describe)
        self.read(ready, peer, f"{what} 'ready' flag")
        seal = self._seal(peer, hop, encoded)
        try:
            deadline = time.monotonic() + self.hop_timeout
            group, peer_in_link = self._link(peer)
            self._push(group, peer_in_link, encoded, self._tag(hop), deadline, seal)
        except RuntimeError as error:
            self._groups[self._link_key(peer)] = None
            raise HopTimeoutError(describe(f"rank {peer} did not take it within {self.hop_timeout} s")) from error
        self._seq_out[peer] += 1
        self.link_bytes[(self.rank, peer)] += encoded.nbytes + (0 if seal is None else seal.numel())

    def _push(
        self,
        group: dist.ProcessGroup,
        peer: int,
        encoded: EncodedPayload,
        tag: int,
        deadline: float,
        seal: torch.Tensor | None = None,
    ) -> None:
        tensors = [encoded.header, encoded.manifest] + ([encoded.data] if encoded.data.numel() else [])
        works = [group.send([t.contiguous()], peer, tag + i) for i, t in enumerate(tensors)]
        if seal is not None:
            works.append(group.send([seal], peer, tag + 3))
        for work in works:
            work.wait(_left(deadline))

    def _seal(self, peer: int, hop: int | str, encoded: EncodedPayload) -> torch.Tensor | None:
        """The seal of `encoded` for `peer` at `hop` (None without a secret): bound to this session, the hop, both
        ranks and how many payloads this rank sent that peer before."""
        if not self._auth.enabled:
            return None
        body = [_bytes_of(encoded.manifest), _bytes_of(encoded.data)]
        seal = self._auth.seal_payload(hop, self.rank, peer, self._seq_out[peer], _bytes_of(encoded.header), body)
        return torch.frombuffer(bytearray(seal), dtype=torch.uint8)

    def _wire_recv(self, peer: int, hop: int | str, what: str, src: int, dst: int) -> EncodedPayload:
        self.publish(self._hop_key(hop, peer, self.rank, "ready"), "1")
        describe = self._describe(what, src, dst, receiving=True)
        sent = self._hop_key(hop, peer, self.rank, "sent")
        self.wait_for({peer: sent}, describe)
        self.read(sent, peer, f"{what} 'sent' flag")
        deadline, tag = time.monotonic() + self.hop_timeout, self._tag(hop)
        refused = self._describe_refusal(what, peer, src, dst)
        seq, seal = self._seq_in[peer], None
        try:
            group, peer_in_link = self._link(peer)
            header = torch.empty(HEADER_NUMEL, dtype=torch.int64)
            works = [group.recv([header], peer_in_link, tag)]
            if self._auth.enabled:  # the header's own tag is checked before anything is allocated from its sizes
                seal = torch.empty(SEAL_NBYTES, dtype=torch.uint8)
                works.append(group.recv([seal], peer_in_link, tag + 3))
            for work in works:
                work.wait(_left(deadline))
            if seal is not None:
                self._auth.check_payload_header(_bytes_of(seal), hop, peer, self.rank, seq, _bytes_of(header), refused)
            manifest_nbytes, data_nbytes = check_header(header.tolist(), describe)
            manifest = torch.empty(manifest_nbytes, dtype=torch.uint8)
            data = torch.empty(data_nbytes, dtype=torch.uint8)
            works = [group.recv([manifest], peer_in_link, tag + 1)]
            if data_nbytes:
                works.append(group.recv([data], peer_in_link, tag + 2))
            for work in works:
                work.wait(_left(deadline))
            if seal is not None:
                body = [_bytes_of(manifest), _bytes_of(data)]
                self._auth.check_payload(_bytes_of(seal), hop, peer, self.rank, seq, _bytes_of(header), body, refused)
        except (RuntimeError, PayloadError) as error:
            self._groups[self._link_key(peer)] = None  # the stream on this link is out of step: never reuse it
            if isinstance(error, PayloadError):
                raise
            reason = f"nothing arrived from rank {peer} within {self.hop_timeout} s of the hop's start"
            raise HopTimeoutError(describe(reason)) from error
        for kind in ("sent", "ready"):
            self.store.delete_key(self._hop_key(hop, peer, self.rank, kind))
        encoded = EncodedPayload(header=header, manifest=manifest, data=data)
        self._seq_in[peer] += 1
        self.link_bytes[(peer, self.rank)] += encoded.nbytes + (0 if seal is None else seal.numel())
        return encoded

    def _link(self, peer: int) -> tuple[dist.ProcessGroup, int]:
        """The two-rank gloo group of the link to `peer` (built on first use, by both ends) and the peer's rank in it."""
        key = self._link_key(peer)
        if key in self._groups and self._groups[key] is None:
            raise RuntimeError(f"the link {key[0]}-{key[1]} failed earlier and is not reused")
        if key not in self._groups:
            link_store = dist.PrefixStore(f"snake/link/{key[0]}-{key[1]}", self.store)
            timeout = timedelta(seconds=self.hop_timeout)
            self._groups[key] = dist.ProcessGroupGloo(link_store, key.index(self.rank), 2, timeout)
        return self._groups[key], key.index(peer)

    # -- waiting on the store, with liveness -----------------------------------------------------------------------

    def wait_for(self, keys: dict[int, str], describe: Callable[[str], str], drop_absent: bool = False) -> None:
        """Waits until every key of `keys` (peer -> key) is set, as long as the peers it waits for live.

        A peer that closed, never joined or stopped its heartbeat raises [`HopTimeoutError`] (or, with `drop_absent`,
        is logged and no longer waited for).
        """
        try:
            self._await_keys(keys, describe, drop_absent)
        except RuntimeError as error:  # a store operation failed: its server (rank 0's process) is gone
            raise HopTimeoutError(describe(f"the rendezvous store is unreachable ({error})")) from error

    def _await_keys(self, keys: dict[int, str], describe: Callable[[str], str], drop_absent: bool) -> None:
        keys, start = dict(keys), time.monotonic()
        seen = {peer: (self._beats(peer), start) for peer in keys}  # last heartbeat count, and when it moved
        next_check, delay = start, _MIN_POLL
        # The poll backs off from 1 ms (a peer a moment away is seen within a millisecond or two) to a 5 ms cap. The
        # cap bounds how late a receiver that waited through other ranks' stages notices its sender, since nothing
        # announces that a hop is near: a 100 ms cap made the store handshake, not the payload, the cost of a hop
        # (benchmarks/distributed_overhead.py, whose 6-17 ms wire times were measured with 5 ms polls). 5 ms adds at
        # most 5 ms to a hop, for 200 store checks a second per waiting rank: cheap for a few dozen ranks.
        while keys and not self.store.check(list(keys.values())):
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.heartbeat_interval
                pending = [peer for peer, key in keys.items() if not self.store.check([key])]
                for peer in pending:
                    beats = self._beats(peer)
                    if beats > seen[peer][0]:  # a replayed (older) heartbeat does not count
                        seen[peer] = (beats, now)
                    self._check_not_deleted(peer, keys[peer], describe)
                    reason = self._absence(peer, beats, now - seen[peer][1])
                    if reason and not self.store.check([keys[peer]]):
                        if not drop_absent:
                            raise HopTimeoutError(describe(reason))
                        logger.warning(describe(reason))
                        del keys[peer]
            time.sleep(delay)
            delay = min(2 * delay, _MAX_POLL)

    def _check_not_deleted(self, peer: int, key: str, describe: Callable[[str], str]) -> None:
        """With a secret: `peer`'s sealed heartbeat lists the keys it published lately. One of them missing from the
        store while this rank waits for it was deleted by someone else (no rank deletes a key another still awaits):
        stop, named, rather than wait for a message that will not come while the peer's heartbeat says it lives."""
        if key in self._peer_recent.get(peer, ()) and not self.store.check([key]):
            raise AuthenticationError(
                describe(
                    f"rank {peer} published {key!r} but the store no longer holds it: a process on the rendezvous "
                    "store deleted it (tampering; see docs/security.md)"
                )
            )

    def _absence(self, peer: int, beats: int, still: float) -> str | None:
        """Why `peer` will not come: it closed, never joined, or its heartbeat stopped; None while it lives."""
        if self.store.check([_CLOSED.format(peer)]):
            self.read(_CLOSED.format(peer), peer, "'closed' flag")
            return f"rank {peer} closed its transport first"
        if not self._auth.enabled:
            self._join_check.check_peer_unauthenticated(peer)
        if still > self.heartbeat_timeout:
            return (
                f"rank {peer} {'never joined' if beats == 0 else 'sent no heartbeat'} for {self.heartbeat_timeout} s"
            )
        return None

    def _beat(self) -> None:
        try:
            store = self.store.clone()  # a client of its own: the main thread may block in the store
        except (AttributeError, RuntimeError):
            store = self.store
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._beat_count += 1
                self._set_alive(store, self._beat_count)
            except RuntimeError as error:  # the store's server is gone: nothing left to tell
                logger.warning(f"Rank {self.rank} stops its heartbeat: {error}")
                return

    def _set_alive(self, store: dist.Store, count: int) -> None:
        key = _ALIVE.format(self.rank)
        if self._auth.enabled:  # a sealed count: a forger cannot keep a dead rank alive, a replay does not move it
            beat = json.dumps({"n": count, "published": list(self._recent)})
            store.set(key, self._auth.seal_text(key, self.rank, beat))
        else:
            store.add(key, 1)

    def _beats(self, peer: int) -> int:
        key = _ALIVE.format(peer)
        if not self._auth.enabled:
            return self.store.add(key, 0)
        if not self.store.check([key]):
            return 0
        beat = json.loads(self.read(key, peer, "heartbeat"))
        self._peer_recent[peer] = beat["published"]
        return int(beat["n"])

    # -- names ----------------------------------------------------------------------------------------------------

    def _describe_refusal(self, what: str, peer: int, src: int, dst: int) -> Callable[[str], str]:
        plan = f" (in the plan: rank {src} to rank {dst})" if (src, dst) != (peer, self.rank) else ""
        return lambda reason: (
            f"{what}: rank {self.rank} refused the payload that claims to come from rank {peer}{plan}: {reason} "
            f"(topology {self.topology})."
        )

    def _describe(self, what: str, src: int, dst: int, receiving: bool) -> Callable[[str], str]:
        via = f" via coordinator {self.coordinator}" if self._via(src, dst) else ""
        hop = f"payload from rank {src} to rank {dst}{via}"
        head = f"no {hop}" if receiving else f"{hop} not delivered"
        return lambda reason: f"{what}: {head}: {reason} (topology {self.topology})"

    def _via(self, src: int, dst: int) -> bool:
        """Whether a payload from `src` to `dst` goes through the coordinator (cs, neither end the coordinator)."""
        return self.topology == "cs" and self.coordinator not in (src, dst)

    def _check_self(self, rank: int, method: str, name: str) -> None:
        if rank != self.rank:
            raise ValueError(f"`{method}` runs on the rank `{name}` names ({rank}); this is rank {self.rank}.")

    def _link_key(self, peer: int) -> tuple[int, int]:
        return (min(self.rank, peer), max(self.rank, peer))

    @staticmethod
    def _tag(hop: int | str) -> int:
        return 4 * (hop % _STAGE_TAGS) if isinstance(hop, int) else _FINAL_TAG

    @staticmethod
    def _hop_key(hop: int | str, sender: int, receiver: int, kind: str) -> str:
        return f"snake/hop/{hop}/{sender}-{receiver}/{kind}"


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (what a seal covers)."""
    return memoryview(tensor.detach().contiguous().numpy()).cast("B")


def _left(deadline: float) -> timedelta:
    return timedelta(seconds=max(0.001, deadline - time.monotonic()))
