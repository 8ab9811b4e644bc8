"""Payloads: exact contents, exact byte counts, round trips, and refusal of anything that does not match."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_bert
from snake_hf.blocks import SHARED, BlockGroups, PartMap
from snake_hf.engine.ledger import VersionLedger
from snake_hf.engine.payload import (
    FORMAT_VERSION,
    HEADER_NBYTES,
    MAGIC,
    EncodedPayload,
    PayloadError,
    PayloadSpec,
    build_payload,
    check_header,
    decode_payload,
    encode_payload,
    model_fingerprint,
)
from snake_hf.precision import round_to_wire, wire_dtype


def _setup(seed=0, r=2):
    model = get_peft_model(tiny_bert(seed), LoraConfig(r=r, target_modules=["query", "value"], task_type="SEQ_CLS"))
    parts = PartMap.build(model, BlockGroups.from_model(model, num_groups=2), "lora")
    spec = PayloadSpec.from_model(model, parts, model_fingerprint(model), model.peft_config["default"].to_dict())
    part_of = {n: p for p in parts.parts for n in parts.tensor_names(p)}
    return model, parts, spec, part_of


def _encode(model, parts, spec, part_of, carried=("g1", SHARED)):
    state = dict.fromkeys(parts.parts, (1, "x"))
    payload = build_payload(model, parts, carried, state, spec, sender=0, receiver=1, stage=3)
    return encode_payload(payload, part_of)


def test_payload_holds_exactly_the_lacking_parts_adapter_tensors():
    model, parts, spec, part_of = _setup()
    encoded = _encode(model, parts, spec, part_of)
    decoded = decode_payload(encoded, spec, expected_parts=["g1", SHARED])
    assert set(decoded.tensors) == set(parts.params["g1"]) | set(parts.params[SHARED])
    assert not any("base_layer" in n or "exp_avg" in n for n in decoded.tensors)
    named = dict(model.named_parameters())
    assert all(torch.equal(t, named[n]) for n, t in decoded.tensors.items())


def test_payload_bytes_are_tensor_bytes_plus_a_bounded_manifest():
    model, parts, spec, part_of = _setup()
    encoded = _encode(model, parts, spec, part_of)
    named = dict(model.named_parameters())
    tensor_bytes = sum(named[n].numel() * named[n].element_size() for n in parts.params["g1"] + parts.params[SHARED])
    assert encoded.data_nbytes == tensor_bytes
    manifest = encoded.nbytes - tensor_bytes - HEADER_NBYTES
    assert manifest == encoded.manifest.numel()
    assert manifest < 1024 + 300 * len(parts.params["g1"] + parts.params[SHARED])


def test_payload_bytes_round_trip_exactly():
    model, parts, spec, part_of = _setup()
    encoded = _encode(model, parts, spec, part_of)
    again = EncodedPayload.from_bytes(encoded.to_bytes())
    assert again.to_bytes() == encoded.to_bytes()
    assert decode_payload(again, spec).parts == ["g1", SHARED]


def test_payload_load_into_copies_values():
    model, parts, spec, part_of = _setup(seed=0)
    other, _, _, _ = _setup(seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in parts.params["g1"]:
                p.add_(1.0)
    decode_payload(_encode(model, parts, spec, part_of, ("g1",)), spec).load_into(other)
    a, b = dict(model.named_parameters()), dict(other.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in parts.params["g1"])


def _tamper_data(encoded):
    data = encoded.data.clone()
    data[5] ^= 0xFF
    return EncodedPayload(encoded.header, encoded.manifest, data)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (_tamper_data, "checksum"),
        (lambda e: EncodedPayload.from_bytes(e.to_bytes()[:-10]), "truncated"),
        (lambda e: EncodedPayload(torch.tensor([1, 1, 1, 1]), e.manifest, e.data), "Not a snake_hf payload"),
    ],
    ids=["tampered", "truncated", "bad-magic"],
)
def test_decode_refuses_corrupt_payloads(mutate, message):
    model, parts, spec, part_of = _setup()
    with pytest.raises(PayloadError, match=message):
        decode_payload(mutate(_encode(model, parts, spec, part_of)), spec)


BAD_HEADERS = {
    "too-short": ([MAGIC, FORMAT_VERSION, 10], "Payload header has 3 entries; expected 4."),
    "bad-magic": ([1, FORMAT_VERSION, 10, 0], f"Not a snake_hf payload (magic 0x1, expected {MAGIC:#x})."),
    "other-format": ([MAGIC, 99, 10, 0], "Payload format 99 is not supported by this snake_hf"),
    "empty-manifest": ([MAGIC, FORMAT_VERSION, 0, 0], "Payload header announces impossible sizes (0, 0)."),
    "negative-data": ([MAGIC, FORMAT_VERSION, 10, -1], "Payload header announces impossible sizes (10, -1)."),
}


@pytest.mark.parametrize("header,message", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_check_header_refuses_bad_headers_with_a_sentence_or_the_callers_description(header, message):
    with pytest.raises(PayloadError) as caught:
        check_header(header)
    assert str(caught.value).startswith(message)
    with pytest.raises(PayloadError) as caught:  # a wire receiver names the hop the header came on
        check_header(header, lambda reason: f"stage 3: no payload from rank 1 to rank 2: {reason} (topology p2p)")
    assert str(caught.value).startswith("stage 3: no payload from rank 1 to rank 2: ")
    assert message[1:].rstrip(".") in str(caught.value) and str(caught.value).endswith("(topology p2p)")


def test_check_header_returns_the_announced_sizes():
    model, parts, spec, part_of = _setup()
    encoded = _encode(model, parts, spec, part_of)
    assert check_header(encoded.header.tolist()) == (encoded.manifest.numel(), encoded.data_nbytes)


def test_decode_refuses_other_base_model():
    model, parts, spec, part_of = _setup(seed=0)
    _, _, other_spec, _ = _setup(seed=1)
    with pytest.raises(PayloadError, match="different base model"):
        decode_payload(_encode(model, parts, spec, part_of), other_spec)


def test_decode_refuses_other_lora_config():
    model, parts, spec, part_of = _setup(r=2)
    _, _, other_spec, _ = _setup(r=4)
    other_spec = PayloadSpec(spec.fingerprint, other_spec.adapter_hash, other_spec.layout)
    with pytest.raises(PayloadError, match="adapter configuration"):
        decode_payload(_encode(model, parts, spec, part_of), other_spec)


def test_decode_refuses_a_part_set_the_receiver_does_not_lack():
    model, parts, spec, part_of = _setup()
    with pytest.raises(PayloadError, match="lacks exactly"):
        decode_payload(_encode(model, parts, spec, part_of), spec, expected_parts=["g0"])


def test_decode_refuses_wrong_shapes_before_loading_anything():
    model, parts, spec, part_of = _setup()
    name = parts.params["g1"][0]
    dtype, shape = spec.layout["g1"][name]
    layout = {p: dict(t) for p, t in spec.layout.items()}
    layout["g1"][name] = (dtype, (shape[0] + 1, *shape[1:]))
    changed = PayloadSpec(spec.fingerprint, spec.adapter_hash, layout)
    with pytest.raises(PayloadError, match="expects"):
        decode_payload(_encode(model, parts, spec, part_of), changed)


def test_version_ledger_tracks_what_each_node_lacks():
    ledger = VersionLedger(3, {"g0": "a", "g1": "b"})
    ledger.record_training(0, {"g0": "a1"})
    assert ledger.lacking(1, 0) == ["g0"] and ledger.lacking(0, 1) == []
    ledger.record_receipt(1, ledger.state(0), ["g0"])
    ledger.record_training(1, {"g1": "b1"})
    assert ledger.lacking(2, 1) == ["g0", "g1"]
    assert ledger.state(1) == {"g0": (1, "a1"), "g1": (1, "b1")}
    assert ledger.mismatches(2, ledger.state(1)) == ["g0", "g1"]


def _bf16_spec(spec):
    return PayloadSpec(spec.fingerprint, spec.adapter_hash, spec.layout, payload_dtype="bfloat16")


def test_bfloat16_payload_carries_two_bytes_per_value_and_loads_the_cast_values():
    model, parts, spec, part_of = _setup(seed=0)
    other, _, _, _ = _setup(seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in parts.params["g1"]:
                p.add_(torch.randn_like(p))  # LoRA B starts at zero: give it values bfloat16 must round
    encoded = _encode(model, parts, _bf16_spec(spec), part_of, ("g1",))
    named = dict(model.named_parameters())
    assert encoded.data_nbytes == 2 * sum(named[n].numel() for n in parts.params["g1"])
    decoded = decode_payload(EncodedPayload.from_bytes(encoded.to_bytes()), _bf16_spec(spec))
    assert {t.dtype for t in decoded.tensors.values()} == {torch.bfloat16}
    decoded.load_into(other)
    received = dict(other.named_parameters())
    for n in parts.params["g1"]:
        assert received[n].dtype == torch.float32
        assert torch.equal(received[n], named[n].to(torch.bfloat16).float())
        assert not torch.equal(received[n], named[n]), "the wire really rounded"


def test_float32_payload_dtype_leaves_the_bytes_unchanged():
    model, parts, spec, part_of = _setup()
    assert spec.payload_dtype == "float32"
    explicit = PayloadSpec(spec.fingerprint, spec.adapter_hash, spec.layout, payload_dtype="float32")
    assert _encode(model, parts, spec, part_of).to_bytes() == _encode(model, parts, explicit, part_of).to_bytes()


def test_decode_refuses_a_payload_in_another_wire_dtype():
    model, parts, spec, part_of = _setup()
    with pytest.raises(PayloadError, match="payload_dtype 'float32'"):
        decode_payload(_encode(model, parts, _bf16_spec(spec), part_of), spec)


@pytest.mark.parametrize(
    "dtype,payload_dtype,expected",
    [
        (torch.float32, "bfloat16", torch.bfloat16),
        (torch.float32, "float16", torch.float16),
        (torch.float32, "float32", torch.float32),
        (torch.bfloat16, "float32", torch.bfloat16),
        (torch.float16, "bfloat16", torch.float16),
        (torch.int64, "bfloat16", torch.int64),
    ],
    ids=["narrow-bf16", "narrow-fp16", "same", "never-widen", "same-width-kept", "integers-kept"],
)
def test_wire_dtype_narrows_wider_floats_only(dtype, payload_dtype, expected):
    assert wire_dtype(dtype, payload_dtype) == expected


def test_round_to_wire_is_the_cast_and_back_and_idempotent():
    values = torch.randn(64)
    rounded = values.clone()
    round_to_wire([rounded], "bfloat16")
    assert torch.equal(rounded, values.to(torch.bfloat16).float())
    again = rounded.clone()
    round_to_wire([again], "bfloat16")
    assert torch.equal(again, rounded)
