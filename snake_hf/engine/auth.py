"""Authentication of everything the distributed engine relies on: HMAC-SHA256 under a secret shared by the run's ranks.

The rendezvous store and the gloo links are open to anyone who reaches their ports: the store has no access control
and a payload's SHA-256 checksums catch corruption, not forgery (anyone can compute them). With a `run_secret`, every
rank derives one key from it, and

* **joins** with a challenge-response through the store (`snake_hf.engine.join`): each rank publishes a fresh random
  nonce; the session id is the hash of every rank's nonce (its own as it generated it, the others' as read), and each
  rank proves it holds the key by publishing `HMAC(key, session id, rank)`. A rank checks every other rank's proof before the run starts, so a
  process without the secret cannot take a rank's place, and a rank with a different secret fails at start on both
  sides (docs/security.md);
* **seals** every store message the engine reads (turns, plans, liveness, hop flags, exchanges, reports) with
  `HMAC(key, session id, store key, writer rank, text)` and every payload with `HMAC(key, session id, hop, sender,
  receiver, sequence number, bytes)`. The receiver recomputes the tag from what *it* expects (the key it reads, the
  rank it expects, the hop it is at, how many payloads it took on that link), so a message forged without the key,
  altered, replayed from another stage, link or run, or re-addressed to another rank is refused with
  [`AuthenticationError`] before anything is parsed or loaded. Tags are compared in constant time.

Nothing here imports torch: payloads are sealed as bytes (`memoryview`s of the wire tensors), so this works for any
payload format. Without a secret, [`RunAuth`] is disabled and every text and payload passes unchanged (today's wire).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .payload import PayloadError


__all__ = [
    "SECRET_ENV",
    "SECRET_FILE_ENV",
    "AuthenticationError",
    "RunAuth",
    "exposure_warning",
    "resolve_run_secret",
]

SECRET_ENV = "SNAKE_RUN_SECRET"
SECRET_FILE_ENV = "SNAKE_RUN_SECRET_FILE"
MIN_SECRET_CHARS = 16
REDACTED = "<RUN_SECRET>"  # what config dumps show instead of the secret
TAG_NBYTES = 32
SEAL_NBYTES = 2 * TAG_NBYTES  # a payload's seal: the header's tag, then the whole payload's
_TEXT_PREFIX = "hmac1:"  # a sealed store text: prefix, 64 hex digits, "|", the text
_TEXT_OVERHEAD = len(_TEXT_PREFIX) + 2 * TAG_NBYTES + 1
_KEY_LABEL = b"snake_hf/run-key/v1"

Buffer = bytes | bytearray | memoryview


class AuthenticationError(PayloadError):
    """A payload or engine message does not carry a valid tag for this run (forged, altered, replayed, re-addressed,
    or sealed under another `run_secret`); it was refused before anything was parsed or loaded."""


def resolve_run_secret(configured: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The run's secret: `configured` (`SnakeConfig.run_secret`), else `$SNAKE_RUN_SECRET`, else the contents of the
    file `$SNAKE_RUN_SECRET_FILE` (trailing newline stripped); `None` when none is set.

    Raises `ValueError` (never showing the secret) when it is shorter than 16 characters or is the placeholder a
    config dump writes instead of it.
    """
    environ = os.environ if environ is None else environ
    secret, source = configured, "`run_secret`"
    if secret is None and environ.get(SECRET_ENV):
        secret, source = environ[SECRET_ENV], f"${SECRET_ENV}"
    if secret is None and environ.get(SECRET_FILE_ENV):
        path = Path(environ[SECRET_FILE_ENV])
        if not path.is_file():
            raise ValueError(f"${SECRET_FILE_ENV} names {str(path)!r}, which is not a file; give the secret's file.")
        secret, source = path.read_text().rstrip("\r\n"), f"the file ${SECRET_FILE_ENV} names"
    if secret is None:
        return None
    if secret == REDACTED:
        raise ValueError(
            f"{source} is {REDACTED!r}, the placeholder a config dump writes instead of the secret; pass the secret "
            f"itself (run_secret, ${SECRET_ENV} or ${SECRET_FILE_ENV})."
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"{source} is {len(secret)} characters long; use at least {MIN_SECRET_CHARS} random characters, e.g. "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`."
        )
    return secret


def exposure_warning(store_addr: str, port: int) -> str | None:
    """The warning a run without a secret logs once at start when its store is reachable beyond this host (a
    non-loopback address: ranks on several hosts); None for a one-host run over loopback."""
    host = store_addr.strip("[]")
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name other than localhost: other hosts reach it
        pass
    return (
        f"No run_secret: the rendezvous store at {store_addr}:{port} is reachable beyond this host, and nothing the "
        "engine exchanges is authenticated. Anyone who reaches the port can read heartbeats and turns, join as a "
        "rank, and send a well-formed payload (its checksums do not stop a forger) that a rank would load; payloads "
        f"also travel in clear. Set the same run_secret (or ${SECRET_ENV}) on every rank, and keep the store and the "
        "links on a private network or a tunnel (docs/security.md)."
    )


class RunAuth:
    """The run's key and session id, and the tags built from them (see the module docstring).

    Args:
        secret (`str`, *optional*): the run's shared secret; `None` disables authentication (texts and payloads
            pass unchanged).

    Example:
        ```python
        >>> auth = RunAuth("0123456789abcdef0123")
        >>> auth.session = auth.session_id(["nonce-of-rank-0", "nonce-of-rank-1"])
        >>> sealed = auth.seal_text("snake/cs/turn/1/0", 0, '{"stage": 1}')
        >>> auth.open_text("snake/cs/turn/1/0", 0, sealed, lambda reason: reason)
        '{"stage": 1}'
        ```
    """

    def __init__(self, secret: str | None):
        # Only a derived key is kept; the secret itself is not stored on the object (nor shown by its repr).
        key = None if secret is None else hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._key = key
        self.session = ""

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:
        return f"RunAuth(enabled={self.enabled}, session={self.session!r})"

    # -- joining --

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(16)

    @staticmethod
    def session_id(nonces: Sequence[str]) -> str:
        """The session id of a run whose ranks drew `nonces` (in rank order)."""
        return hashlib.sha256(json.dumps(list(nonces)).encode()).hexdigest()[:32]  # JSON: no two lists run together

    def join_proof(self, rank: int) -> str:
        """What `rank` publishes to prove it holds the key, for this session."""
        return self._tag([b"join", self.session, str(rank)]).hex()

    def check_join_proof(self, rank: int, proof: str) -> bool:
        return hmac.compare_digest(self.join_proof(rank).encode(), proof.encode())

    # -- store texts --

    def seal_text(self, key: str, writer: int, text: str) -> str:
        """`text` as rank `writer` stores it under `key` (unchanged when disabled)."""
        if not self.enabled:
            return text
        return f"{_TEXT_PREFIX}{self._tag([b'store', self.session, key, str(writer), text]).hex()}|{text}"

    def open_text(self, key: str, writer: int, sealed: str, describe: Callable[[str], str]) -> str:
        """The text rank `writer` stored under `key`; raises [`AuthenticationError`] with `describe(reason)` when its
        tag is not that rank's for that key in this session."""
        if not self.enabled:
            return sealed
        text = sealed[_TEXT_OVERHEAD:]
        tag = sealed[len(_TEXT_PREFIX) : _TEXT_OVERHEAD - 1]
        well_formed = sealed.startswith(_TEXT_PREFIX) and sealed[_TEXT_OVERHEAD - 1 : _TEXT_OVERHEAD] == "|"
        expected = self._tag([b"store", self.session, key, str(writer), text]).hex()
        if not (well_formed and hmac.compare_digest(expected.encode(), tag.encode())):
            raise AuthenticationError(describe(_REFUSED))
        return text

    # -- payloads --

    def seal_payload(self, hop: int | str, sender: int, receiver: int, seq: int, header: Buffer,
                     body: Iterable[Buffer]) -> bytes:  # fmt: skip
        """The payload's seal: the tag of its header (checked before the receiver allocates anything from it), then
        the tag of header and body bytes, both bound to the session, hop, both ranks and the link's sequence number."""
        context = self._payload_context(hop, sender, receiver, seq)
        return self._tag([b"payload-header", *context, header]) + self._tag([b"payload", *context, header], body)

    def check_payload_header(self, seal: Buffer, hop: int | str, sender: int, receiver: int, seq: int,
                             header: Buffer, describe: Callable[[str], str]) -> None:  # fmt: skip
        context = self._payload_context(hop, sender, receiver, seq)
        expected = self._tag([b"payload-header", *context, header])
        if len(seal) != SEAL_NBYTES or not hmac.compare_digest(expected, bytes(seal[:TAG_NBYTES])):
            raise AuthenticationError(describe(_REFUSED))

    def check_payload(self, seal: Buffer, hop: int | str, sender: int, receiver: int, seq: int, header: Buffer,
                      body: Iterable[Buffer], describe: Callable[[str], str]) -> None:  # fmt: skip
        self.check_payload_header(seal, hop, sender, receiver, seq, header, describe)
        expected = self._tag([b"payload", *self._payload_context(hop, sender, receiver, seq), header], body)
        if not hmac.compare_digest(expected, bytes(seal[TAG_NBYTES:])):
            raise AuthenticationError(describe(_REFUSED))

    def seal_bytes(self, buffer: Buffer, hop: int | str, sender: int, receiver: int, seq: int,
                   header_nbytes: int) -> bytes:  # fmt: skip
        """A whole encoded payload (`EncodedPayload.to_bytes()`) as one sealed byte string: seal, then the bytes."""
        view = memoryview(buffer)
        return self.seal_payload(hop, sender, receiver, seq, view[:header_nbytes], [view[header_nbytes:]]) + bytes(
            view
        )

    def open_bytes(self, sealed: Buffer, hop: int | str, sender: int, receiver: int, seq: int, header_nbytes: int,
                   describe: Callable[[str], str]) -> bytes:  # fmt: skip
        """The payload bytes inside a [`seal_bytes`] string; raises [`AuthenticationError`] unless every byte is as
        rank `sender` sealed it for `receiver` at that hop and sequence number."""
        view = memoryview(sealed)
        seal, payload = view[:SEAL_NBYTES], view[SEAL_NBYTES:]
        if len(seal) < SEAL_NBYTES:
            raise AuthenticationError(describe(_REFUSED))
        header, body = payload[:header_nbytes], payload[header_nbytes:]
        self.check_payload(seal, hop, sender, receiver, seq, header, [body], describe)
        return bytes(payload)

    # -- the tag --

    def _payload_context(self, hop: int | str, sender: int, receiver: int, seq: int) -> list:
        return [self.session, str(hop), str(sender), str(receiver), str(seq)]

    def _tag(self, fields: Sequence[Buffer | str], stream: Iterable[Buffer] = ()) -> bytes:
        """HMAC-SHA256 over `fields` (each length-prefixed, so no two field lists run together alike), then the bytes
        of `stream` as one run."""
        if self._key is None:
            raise RuntimeError("RunAuth without a secret has no key to tag with.")
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for field in fields:
            view = memoryview(field.encode() if isinstance(field, str) else field)
            mac.update(view.nbytes.to_bytes(8, "little"))
            mac.update(view)
        for chunk in stream:
            mac.update(chunk)
        return mac.digest()


_REFUSED = (
    "it carries no valid tag of this run (forged, altered, replayed from another stage, link or run, re-addressed, "
    "or sealed under a different run_secret); refused before anything was read or loaded"
)
