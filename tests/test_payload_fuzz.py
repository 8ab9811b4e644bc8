"""Fuzzing the payload decoder: arbitrary bytes decode to a verified payload or raise PayloadError — nothing else,
and never a partial load."""

from __future__ import annotations

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


MODEL = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
PARTS = PartMap.build(MODEL, BlockGroups.from_model(MODEL, num_groups=2), "lora")
SPEC = PayloadSpec.from_model(MODEL, PARTS, model_fingerprint(MODEL), MODEL.peft_config["default"].to_dict())
PART_OF = {n: p for p in PARTS.parts for n in PARTS.tensor_names(p)}
VALID = encode_payload(
    build_payload(MODEL, PARTS, ["g1"], dict.fromkeys(PARTS.parts, (1, "c")), SPEC, 0, 1, 1), PART_OF
).to_bytes()
SNAPSHOT = {n: p.detach().clone() for n, p in MODEL.named_parameters()}


def _decode(buffer: bytes):
    try:
        payload = decode_payload(EncodedPayload.from_bytes(buffer), SPEC)
    except PayloadError:
        return None
    return payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_with_payload_error(buffer):
    assert _decode(buffer) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_of_a_valid_payload_is_refused(position, flip):
    mutated = bytearray(VALID)
    mutated[position] ^= flip
    assert _decode(bytes(mutated)) is None
    assert all(torch.equal(p, SNAPSHOT[n]) for n, p in MODEL.named_parameters()), "nothing was loaded"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_any_truncation_is_refused(length):
    assert _decode(VALID[:length]) is None


def test_the_valid_payload_decodes():
    payload = _decode(VALID)
    assert payload is not None and payload.parts == ["g1"]
