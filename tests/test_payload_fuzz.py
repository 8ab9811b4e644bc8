"""Fuzzing the payload decoder: arbitrary bytes decode to a verified payload or raise PayloadError — nothing else,
and never a partial load. Payloads of whole float32 tensors and of int8/int4 quantized deltas alike."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from conftest import tiny_bert
from snake_hf.blocks import BlockGroups, PartMap
from snake_hf.engine.payload import (
    EncodedPayload,
    PayloadError,
    PayloadSpec,
    build_payload,
    decode_payload,
    encode_payload,
    model_fingerprint,
)
from snake_hf.quant import quantize_step


MODEL = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
PARTS = PartMap.build(MODEL, BlockGroups.from_model(MODEL, num_groups=2), "lora")
SPECS = {
    scheme: PayloadSpec.from_model(
        MODEL, PARTS, model_fingerprint(MODEL), MODEL.peft_config["default"].to_dict(), payload_dtype=scheme
    )
    for scheme in ("float32", "int8", "int4")
}
PART_OF = {n: p for p in PARTS.parts for n in PARTS.tensor_names(p)}
NAMED = dict(MODEL.named_parameters())


def _valid(scheme: str) -> bytes:
    """g1 whole (float32), or as a delta against version 0 (int8, int4)."""
    deltas = None
    if scheme != "float32":
        names = PARTS.tensor_names("g1")
        deltas = {"g1": (0, {n: quantize_step(NAMED[n] + 0.01, NAMED[n], None, scheme)[0] for n in names})}
    state = dict.fromkeys(PARTS.parts, (1, "c"))
    payload = build_payload(MODEL, PARTS, ["g1"], state, SPECS[scheme], 0, 1, 1, deltas=deltas)
    return encode_payload(payload, PART_OF).to_bytes()


VALID = {scheme: _valid(scheme) for scheme in SPECS}
SCHEMES = pytest.mark.parametrize("scheme", list(SPECS))
SNAPSHOT = {n: p.detach().clone() for n, p in MODEL.named_parameters()}


def _decode(buffer: bytes, scheme: str = "float32"):
    try:
        payload = decode_payload(EncodedPayload.from_bytes(buffer), SPECS[scheme])
    except PayloadError:
        return None
    return payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_with_payload_error(buffer):
    assert _decode(buffer) is None


@SCHEMES
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), flip=st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_of_a_valid_payload_is_refused(scheme, data, flip):
    position = data.draw(st.integers(min_value=0, max_value=len(VALID[scheme]) - 1), label="position")
    mutated = bytearray(VALID[scheme])
    mutated[position] ^= flip
    assert _decode(bytes(mutated), scheme) is None
    assert all(torch.equal(p, SNAPSHOT[n]) for n, p in MODEL.named_parameters()), "nothing was loaded"


@SCHEMES
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_truncation_is_refused(scheme, data):
    length = data.draw(st.integers(min_value=0, max_value=len(VALID[scheme]) - 1), label="length")
    assert _decode(VALID[scheme][:length], scheme) is None


@SCHEMES
def test_the_valid_payload_decodes(scheme):
    payload = _decode(VALID[scheme], scheme)
    assert payload is not None and payload.parts == ["g1"]
    assert payload.deltas == ({} if scheme == "float32" else {"g1": 0})


@pytest.mark.parametrize(("sent", "agreed"), [("int8", "int4"), ("int4", "float32"), ("float32", "int8")])
def test_a_valid_payload_in_another_scheme_is_refused(sent, agreed):
    assert _decode(VALID[sent], agreed) is None
