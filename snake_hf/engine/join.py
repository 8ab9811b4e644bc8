"""The join check of a distributed run: through the rendezvous store, before any message is trusted.

With a `run_secret` ([`RunAuth`]) every rank publishes `snake/join/<rank>/hello` (a fresh random nonce), derives the
session id from every rank's nonce (its own as it drew it, so a nonce an intruder overwrote makes the ranks disagree
and fail), publishes `snake/join/<rank>/proof` = `HMAC(key, session id, rank)` and checks every other rank's proof.
A rank with another secret, or none, stops at start with [`AuthenticationError`] on both sides; a rank that never
greets raises [`HopTimeoutError`] after `timeout` seconds. Then it sets `snake/join/<rank>/done` (`ok` or `refused`);
the store's server, when it fails, first waits for the others' verdicts so that each stops with its own named error.

Without a secret a rank only greets (`{"auth": false}`) and does not wait; its transport asks
[`JoinCheck.check_peer_unauthenticated`] about a peer it waits for, so that a run mixing ranks with and without a
secret fails with the same clear message on that side too.
"""

from __future__ import annotations

import json
import time

from transformers.utils import logging

from .auth import AuthenticationError, RunAuth
from .transport import HopTimeoutError, KeyValueStore


logger = logging.get_logger(__name__)

__all__ = ["JoinCheck"]

_JOIN = "snake/join/{}/{}"  # per rank: "hello" (whether it authenticates, its nonce), "proof", "done"
_POLL_MIN, _POLL_MAX = 0.001, 0.1
_SAME_SECRET = "Give every rank the same run_secret (or $SNAKE_RUN_SECRET) and relaunch (docs/security.md)."


class JoinCheck:
    """The join protocol of one rank (see the module docstring).

    Args:
        store (`KeyValueStore`): the run's rendezvous store.
        rank (`int`), world_size (`int`): this rank and the number of ranks.
        timeout (`float`): seconds to wait for every rank's greeting and proof.
        store_server (`bool`): whether the store lives in this process (it waits for the others' verdicts on failure).
        topology (`str`): for messages.

    Example:
        ```python
        >>> auth = RunAuth(secret)
        >>> JoinCheck(store, rank=1, world_size=3, timeout=60, store_server=False, topology="p2p").authenticate(auth)
        >>> auth.session  # the same on every rank once it returns
        ```
    """

    def __init__(
        self, store: KeyValueStore, rank: int, world_size: int, timeout: float, store_server: bool, topology: str
    ):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout, self.store_server, self.topology = timeout, store_server, topology

    def authenticate(self, auth: RunAuth) -> None:
        """Runs the challenge-response; sets `auth.session`. Raises [`AuthenticationError`] or [`HopTimeoutError`]."""
        nonce = RunAuth.new_nonce()
        self.store.set(_JOIN.format(self.rank, "hello"), json.dumps({"auth": True, "nonce": nonce}))
        others = [r for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + self.timeout
        try:
            hellos = self._await("hello", others, deadline)
            nonces = [nonce if r == self.rank else self._nonce(r, hellos[r]) for r in range(self.world_size)]
            auth.session = RunAuth.session_id(nonces)
            self.store.set(_JOIN.format(self.rank, "proof"), auth.join_proof(self.rank))
            proofs = self._await("proof", others, deadline)
            failed = [r for r in others if not auth.check_join_proof(r, proofs[r])]
            if failed:
                alone = len(failed) == len(others)  # every other rank failed: most likely this one is the odd one out
                whose = "this rank's run_secret differs from theirs" if alone else "they hold a different run_secret"
                raise AuthenticationError(
                    f"Join check failed on rank {self.rank}: ranks {failed} did not prove they hold this run's "
                    f"run_secret (most likely {whose}, or a process without it answered in their place). "
                    f"{_SAME_SECRET}"
                )
        except (AuthenticationError, HopTimeoutError) as error:
            self._leave(str(error))
            raise
        self.store.set(_JOIN.format(self.rank, "done"), "ok")
        logger.info(f"Rank {self.rank} joined an authenticated run: all {self.world_size} ranks hold its run_secret.")

    def announce_unauthenticated(self) -> None:
        """A rank without a secret greets without waiting (a run without a secret behaves as it always did)."""
        self.store.set(_JOIN.format(self.rank, "hello"), json.dumps({"auth": False}))

    def check_peer_unauthenticated(self, peer: int) -> None:
        """This rank has no secret: raises [`AuthenticationError`] when `peer` greeted with one."""
        hello = _JOIN.format(peer, "hello")
        if not self.store.check([hello]):
            return
        try:
            authenticates = bool(json.loads(self.store.get(hello).decode())["auth"])
        except (ValueError, KeyError, TypeError):
            return
        if authenticates:
            self.store.set(_JOIN.format(self.rank, "done"), "refused")
            raise AuthenticationError(
                f"Join check failed on rank {self.rank}: rank {peer} runs with a run_secret and this rank without "
                f"one. {_SAME_SECRET}"
            )

    def _nonce(self, rank: int, hello: str) -> str:
        try:
            told = json.loads(hello)
            authenticates, nonce = bool(told["auth"]), str(told.get("nonce", ""))
        except (ValueError, KeyError, TypeError) as error:
            raise AuthenticationError(
                f"Join check failed on rank {self.rank}: the greeting of rank {rank} in the store is malformed "
                "(not written by a snake_hf rank)."
            ) from error
        if not authenticates:
            raise AuthenticationError(
                f"Join check failed on rank {self.rank}: rank {rank} runs without a run_secret and this rank with "
                f"one. {_SAME_SECRET}"
            )
        return nonce

    def _await(self, kind: str, ranks: list[int], deadline: float) -> dict[int, str]:
        keys, delay = {r: _JOIN.format(r, kind) for r in ranks}, _POLL_MIN
        while not self.store.check(list(keys.values())):
            if time.monotonic() > deadline:
                missing = [r for r, key in keys.items() if not self.store.check([key])]
                raise HopTimeoutError(
                    f"Join check on rank {self.rank}: ranks {missing} never joined within {self.timeout} s "
                    f"(topology {self.topology})."
                )
            time.sleep(delay)
            delay = min(2 * delay, _POLL_MAX)
        return {r: self.store.get(key).decode("utf-8", errors="replace") for r, key in keys.items()}

    def _leave(self, verdict: str) -> None:
        """A failed join: says so, and the store's server waits (at most `timeout`) until the other ranks reached their
        own verdict, so that each stops with its own named error rather than a vanished store."""
        self.store.set(_JOIN.format(self.rank, "done"), "refused")
        if not self.store_server:
            return
        deadline = time.monotonic() + self.timeout
        others = [_JOIN.format(r, "done") for r in range(self.world_size) if r != self.rank]
        while time.monotonic() < deadline and not self.store.check(others):
            time.sleep(_POLL_MAX)
        logger.warning(f"Rank {self.rank} leaves the run at its join check: {verdict}")
