"""The authentication module alone (no processes): what a tag binds, the secret's sources, the decoder under fuzzing,
and a config that never shows or saves its secret."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import free_port
from snake_hf import SnakeConfig
from snake_hf.engine.auth import AuthenticationError, RunAuth, exposure_warning, resolve_run_secret
from snake_hf.engine.payload import HEADER_NBYTES, EncodedPayload, Payload, PayloadError, encode_payload


SECRET = "s3cret-shared-by-every-rank-0123"
CONTEXT = {"hop": 3, "sender": 0, "receiver": 1, "seq": 2}


def _auth(secret: str = SECRET, session: str = "session-a") -> RunAuth:
    auth = RunAuth(secret)
    auth.session = session
    return auth


def _payload_bytes() -> bytes:
    tensors = {"w": torch.randn(64, generator=torch.Generator().manual_seed(0))}
    manifest = {"sender": 0, "receiver": 1, "stage": 3, "parts": ["g0"]}
    return encode_payload(Payload(manifest, tensors), {"w": "g0"}).to_bytes()


PAYLOAD = _payload_bytes()
SEALED = _auth().seal_bytes(PAYLOAD, header_nbytes=HEADER_NBYTES, **CONTEXT)


def _open(sealed: bytes, auth: RunAuth | None = None, **context) -> bytes:
    context = {**CONTEXT, **context}
    return (auth or _auth()).open_bytes(sealed, header_nbytes=HEADER_NBYTES, describe=lambda r: r, **context)


# -- what a tag binds ------------------------------------------------------------------------------------------------


def test_sealed_payload_opens_to_its_bytes_for_the_expected_hop():
    assert _open(SEALED) == PAYLOAD


@pytest.mark.parametrize(
    ("auth", "context"),
    [
        (RunAuth("another-secret-of-enough-length"), {}),
        (_auth(session="session-b"), {}),  # replayed from another run
        (None, {"hop": 1}),  # replayed from an earlier stage
        (None, {"hop": "final/0"}),
        (None, {"sender": 2}),  # claims another sender
        (None, {"receiver": 2}),  # re-addressed
        (None, {"seq": 1}),  # replayed on the same link
    ],
    ids=["other-secret", "other-run", "earlier-stage", "final-hop", "other-sender", "other-receiver", "earlier-seq"],
)
def test_payload_is_refused_when_any_bound_field_differs(auth, context):
    if auth is not None:
        auth.session = auth.session or "session-a"
    with pytest.raises(AuthenticationError):
        _open(SEALED, auth=auth, **context)


def test_store_text_is_bound_to_its_key_and_writer():
    auth = _auth()
    sealed = auth.seal_text("snake/cs/turn/1/0", 0, '{"stage": 1}')
    assert auth.open_text("snake/cs/turn/1/0", 0, sealed, str) == '{"stage": 1}'
    for key, writer in [("snake/cs/turn/1/1", 0), ("snake/cs/turn/2/0", 0), ("snake/cs/turn/1/0", 1)]:
        with pytest.raises(AuthenticationError):
            auth.open_text(key, writer, sealed, str)
    with pytest.raises(AuthenticationError):
        auth.open_text("snake/cs/turn/1/0", 0, sealed.replace('"stage": 1', '"stage": 2'), str)


def test_join_proof_differs_per_rank_session_and_secret():
    proof = _auth().join_proof(1)
    assert _auth().check_join_proof(1, proof)
    assert not _auth().check_join_proof(2, proof)
    assert not _auth(session="session-b").check_join_proof(1, proof)
    assert not _auth("another-secret-of-enough-length").check_join_proof(1, proof)


def test_disabled_auth_passes_texts_unchanged_and_holds_no_key():
    auth = RunAuth(None)
    assert not auth.enabled and auth.seal_text("k", 0, "t") == "t" and auth.open_text("k", 0, "t", str) == "t"


def test_auth_repr_and_errors_never_show_the_secret():
    auth = _auth()
    assert SECRET not in repr(auth) and SECRET not in str(vars(auth))
    with pytest.raises(AuthenticationError) as caught:
        _open(SEALED[:-1] + bytes([SEALED[-1] ^ 1]))
    assert SECRET not in str(caught.value) and isinstance(caught.value, PayloadError)


# -- fuzzing the authenticated decoder: the defined error only ----------------------------------------------------


def _decode(sealed: bytes) -> bytes | None:
    """Opens and splits `sealed`; returns None on AuthenticationError (any other exception fails the test)."""
    try:
        opened = _open(sealed)
    except AuthenticationError:
        return None
    EncodedPayload.from_bytes(opened)
    return opened


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes_are_refused(buffer):
    assert _decode(buffer) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(SEALED) * 8 - 1))
def test_fuzz_any_bit_flip_is_refused(bit):
    flipped = bytearray(SEALED)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert _decode(bytes(flipped)) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(SEALED) - 1), st.binary(max_size=64))
def test_fuzz_truncations_and_extensions_are_refused(length, tail):
    assert _decode(SEALED[:length]) is None
    if tail:
        assert _decode(SEALED + tail) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_store_texts_are_refused(text):
    with pytest.raises(AuthenticationError):
        _auth().open_text("snake/alive/0", 0, text, str)


# -- the secret's sources, and where it must never appear ---------------------------------------------------------


def test_secret_comes_from_config_then_environment_then_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("from-a-file-0123456789\n")
    environ = {"SNAKE_RUN_SECRET": "from-the-env-0123456789", "SNAKE_RUN_SECRET_FILE": str(path)}
    assert resolve_run_secret(SECRET, environ) == SECRET
    assert resolve_run_secret(None, environ) == "from-the-env-0123456789"
    assert resolve_run_secret(None, {"SNAKE_RUN_SECRET_FILE": str(path)}) == "from-a-file-0123456789"
    assert resolve_run_secret(None, {}) is None


@pytest.mark.parametrize("secret", ["short-secret", "<RUN_SECRET>"], ids=["too-short", "placeholder"])
def test_bad_secret_is_refused_without_showing_it(secret):
    with pytest.raises(ValueError) as caught:
        resolve_run_secret(secret, {})
    assert "`run_secret`" in str(caught.value) and (secret == "<RUN_SECRET>" or secret not in str(caught.value))
    with pytest.raises(ValueError, match="run_secret") as caught:
        SnakeConfig(output_dir="out", run_secret=secret, report_to="none", use_cpu=True)
    assert secret == "<RUN_SECRET>" or secret not in str(caught.value)


@pytest.mark.parametrize(
    ("addr", "warns"),
    [("127.0.0.1", False), ("localhost", False), ("::1", False), ("10.0.0.2", True), ("node-a.example", True)],
)
def test_exposure_warning_only_for_a_store_beyond_this_host(addr, warns):
    warning = exposure_warning(addr, 29500)
    assert (warning is not None) == warns
    if warns:
        assert (
            "nothing the engine exchanges is authenticated" in warning
            and "in clear" in warning
            and "docs/security.md" in warning
        )


def test_config_never_shows_or_pickles_its_secret_but_copies_keep_it():
    config = SnakeConfig(output_dir="out", run_secret=SECRET, report_to="none", use_cpu=True)
    shown = [str(config), repr(config), config.to_json_string(), str(config.to_sanitized_dict())]
    assert all(SECRET not in text for text in shown) and all("<RUN_SECRET>" in text for text in shown)
    assert SECRET.encode() not in pickle.dumps(config) and pickle.loads(pickle.dumps(config)).run_secret is None
    assert copy.copy(config).run_secret == SECRET and copy.deepcopy(config).run_secret == SECRET
    assert config.run_secret == SECRET  # str() put it back


def test_run_without_secret_warns_once_when_its_store_is_reachable_from_other_hosts(caplog):
    from snake_hf.engine.torch_dist import DistributedTransport

    caplog.set_level(logging.WARNING, logger="snake_hf.engine.torch_dist")
    for _ in range(2):  # two transports of one process: one warning
        transport = DistributedTransport(0, 1, master_addr="0.0.0.0", master_port=free_port(), hop_timeout=5.0)
        transport.close()
    warnings = [r for r in caplog.records if "No run_secret" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].getMessage()
