"""`payload_dtype="int8"` / `"int4"`: block-quantized deltas with error feedback — error bounds, the error-feedback
identity, the wire format's refusals, byte accounting in a run, and resume after SIGKILL (slow)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

import snake_hf.engine.relay as relay_module
from conftest import assert_same_run, lm_dataset, tiny_bert, tiny_gpt2
from snake_hf import SnakeTrainer
from snake_hf.blocks import BlockGroups, PartMap
from snake_hf.engine.payload import (
    EncodedPayload,
    PayloadError,
    PayloadSpec,
    _manifest_digest,
    build_payload,
    decode_payload,
    encode_payload,
    model_fingerprint,
    tensors_checksum,
)
from snake_hf.engine.transport import InMemoryTransport
from snake_hf.quant import QuantizedTensor, apply_delta, dequantize, quantize, quantize_step, quantized_nbytes
from snake_hf.trainer.checkpoint import latest_checkpoint


HERE = Path(__file__).parent
QMAX = {"int8": 127, "int4": 7}
BLOCK = {"int8": 128, "int4": 64}

# ---- the quantizer ----

VALUES = {
    "normal": lambda: torch.randn(3, 200, generator=torch.Generator().manual_seed(0)),
    "odd-length": lambda: torch.randn(129, generator=torch.Generator().manual_seed(1)) * 1e-3,
    "tiny": lambda: torch.randn(70, generator=torch.Generator().manual_seed(2)) * 1e-9,
    "zero-block-then-large": lambda: torch.cat([torch.zeros(128), torch.full((5,), 3e4)]),
    "one-outlier": lambda: torch.cat([torch.full((63,), 1e-2), torch.tensor([50.0])]),
}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("kind", list(VALUES))
def test_round_trip_is_within_half_a_scale_of_every_value(scheme, kind):
    values = VALUES[kind]()
    q = quantize(values, scheme)
    restored = dequantize(q, scheme)
    assert restored.shape == values.shape
    flat, back = values.reshape(-1).double(), restored.reshape(-1).double()
    scales = q.scales.double().repeat_interleave(BLOCK[scheme])[: flat.numel()]
    assert bool(((flat - back).abs() <= scales / 2 * (1 + 1e-6)).all())
    blocks = torch.nn.functional.pad(flat, (0, q.scales.numel() * BLOCK[scheme] - flat.numel()))
    exact = blocks.reshape(-1, BLOCK[scheme]).abs().amax(dim=1) / QMAX[scheme]
    assert bool((q.scales.double() >= exact).all()), "scales are rounded up: no value is clipped"
    assert bool((q.scales.double() <= exact * (1 + 2**-10) + 2**-24).all()), "one float16 step at most"


@pytest.mark.parametrize(("scheme", "ratio"), [("int8", 0.254), ("int4", 0.133)], ids=["int8", "int4"])
def test_wire_bytes_are_codes_and_float16_scales(scheme, ratio):
    values = torch.randn(8192)
    q = quantize(values, scheme)
    assert q.to_bytes().numel() == quantized_nbytes(8192, scheme)
    assert math.isclose(quantized_nbytes(8192, scheme) / (4 * 8192), ratio, abs_tol=5e-4)
    assert QuantizedTensor.from_bytes(q.to_bytes(), (8192,), scheme).codes.equal(q.codes)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_sent_deltas_plus_residual_equal_the_true_change(scheme):
    # A node's stages on one part: each starts from the value it holds, trains, sends a quantized delta. In float64
    # (the working precision of a float64 tensor) the identity holds to the rounding of the additions (stated bound).
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(500, generator=generator, dtype=torch.float64)
    residual, sent, true = None, torch.zeros_like(value), torch.zeros_like(value)
    for _ in range(25):
        trained = value + 1e-2 * torch.randn(500, generator=generator, dtype=torch.float64)
        q, new, residual = quantize_step(trained, value, residual, scheme)
        sent += new - value
        true += trained - value
        value = new
    assert torch.allclose(sent + residual, true, rtol=0, atol=1e-12)
    # The residual is what the last delta rounded off, within half its scale: errors do not pile up over the stages.
    scales = q.scales.double().repeat_interleave(BLOCK[scheme])[:500]
    assert bool((residual.abs() <= scales / 2 * (1 + 1e-6)).all())


def test_error_feedback_keeps_float32_parts_within_rounding_of_the_true_change():
    generator = torch.Generator().manual_seed(4)
    value = torch.randn(256, generator=generator)
    residual, sent, true = None, torch.zeros(256, dtype=torch.float64), torch.zeros(256, dtype=torch.float64)
    for _ in range(25):
        trained = value + 1e-2 * torch.randn(256, generator=generator)
        _, new, residual = quantize_step(trained, value, residual, "int4")
        sent += (new - value).double()
        true += (trained - value).double()
        value = new
    assert residual.dtype == torch.float32
    assert torch.allclose(sent + residual.double(), true, rtol=0, atol=25 * 4 * 2**-24 * 4)


def test_apply_delta_is_the_senders_value_bit_for_bit():
    base, trained = torch.randn(300), torch.randn(300)
    q, value, _ = quantize_step(trained, base, None, "int8")
    wire = QuantizedTensor.from_bytes(q.to_bytes().clone(), (300,), "int8")
    assert torch.equal(apply_delta(base.clone(), wire, "int8"), value)


# ---- the payload format ----

MODEL = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
PARTS = PartMap.build(MODEL, BlockGroups.from_model(MODEL, num_groups=2), "lora")
PART_OF = {n: p for p in PARTS.parts for n in PARTS.tensor_names(p)}


def _spec(scheme: str) -> PayloadSpec:
    return PayloadSpec.from_model(
        MODEL, PARTS, model_fingerprint(MODEL), MODEL.peft_config["default"].to_dict(), payload_dtype=scheme
    )


def _delta_payload(scheme: str) -> tuple[EncodedPayload, dict, dict]:
    """g1 as a delta against version 0 (its current values, perturbed), and what the receiver must end up with."""
    named = dict(MODEL.named_parameters())
    names = PARTS.tensor_names("g1")
    generator = torch.Generator().manual_seed(5)
    deltas, expected = {}, {}
    for name in names:
        trained = named[name].detach() + 1e-2 * torch.randn(named[name].shape, generator=generator)
        deltas[name], expected[name], _ = quantize_step(trained, named[name].detach(), None, scheme)
    spec = _spec(scheme)
    state = dict.fromkeys(PARTS.parts, (1, "c"))
    payload = build_payload(MODEL, PARTS, ["g1"], state, spec, 0, 1, 1, deltas={"g1": (0, deltas)})
    bases = {n: named[n].detach().clone() for n in names}
    return encode_payload(payload, PART_OF), bases, expected


def _snapshot() -> dict:
    return {n: p.detach().clone() for n, p in MODEL.named_parameters()}


def _unchanged(snapshot: dict) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in MODEL.named_parameters())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_delta_payload_reconstructs_the_senders_bits(scheme):
    encoded, bases, expected = _delta_payload(scheme)
    payload = decode_payload(encoded, _spec(scheme), expected_parts=["g1"])
    assert payload.deltas == {"g1": 0} and set(payload.quantized) == set(expected)
    names = PARTS.tensor_names("g1")
    assert encoded.data_nbytes == sum(quantized_nbytes(bases[n].numel(), scheme) for n in names)
    snapshot = _snapshot()
    try:
        payload.load_into(MODEL, bases)
        named = dict(MODEL.named_parameters())
        assert all(torch.equal(named[n], expected[n]) for n in names)
    finally:
        with torch.no_grad():
            for n, p in MODEL.named_parameters():
                p.copy_(snapshot[n])


def test_a_payload_in_another_scheme_is_refused_by_name():
    encoded, _, _ = _delta_payload("int8")
    with pytest.raises(PayloadError, match=r"in scheme 'int8' but this node agreed to payload_dtype 'int4'"):
        decode_payload(encoded, _spec("int4"))
    with pytest.raises(PayloadError, match=r"in scheme 'int8' but this node agreed to payload_dtype 'float32'"):
        decode_payload(encoded, _spec("float32"))


def _tampered(encoded: EncodedPayload, edit) -> EncodedPayload:
    """A hostile (or buggy) sender: `edit(manifest, data)` changes the payload, then every digest is recomputed."""
    manifest = json.loads(encoded.manifest.numpy().tobytes())
    data = bytearray(encoded.data.numpy().tobytes())
    data = edit(manifest, data)
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    manifest["data_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    for part in manifest["parts"]:
        entries = [e for e in manifest["tensors"] if e[0] == part]
        manifest["part_checksums"][part] = tensors_checksum((e[1], tensor[e[4] : e[4] + e[5]]) for e in entries)
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    body = json.dumps(manifest, separators=(",", ":")).encode()
    header = torch.tensor([encoded.header[0], encoded.header[1], len(body), len(data)], dtype=torch.int64)
    return EncodedPayload(header, torch.frombuffer(bytearray(body), dtype=torch.uint8), tensor)


def _scales_at(manifest) -> int:
    """Where the first delta tensor's float16 scales start: after its codes (int8: a byte per value; int4: a
    nibble)."""
    _, _, _, shape, offset, _ = next(e for e in manifest["tensors"] if e[2] == manifest["scheme"])
    numel = math.prod(shape)
    return offset + (numel if manifest["scheme"] == "int8" else math.ceil(numel / 2))


def _set_first_scale(data, at: int, value: float) -> None:
    data[at : at + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8).numpy().tobytes()


def _corrupt_first_scale(manifest, data):
    _set_first_scale(data, _scales_at(manifest), float("nan"))
    return data


def _truncate_first_tensor(manifest, data):
    entry = manifest["tensors"][0]
    entry[5] -= 3
    return data[: entry[4] + entry[5]] + data[entry[4] + entry[5] + 3 :]


def _negative_scale(manifest, data):
    _set_first_scale(data, _scales_at(manifest), -1.0)
    return data


def _code_minus_128(manifest, data):
    data[manifest["tensors"][0][4]] = 0x80
    return data


@pytest.mark.parametrize(
    ("scheme", "edit", "message"),
    [
        ("int8", _corrupt_first_scale, r"corrupted scales"),
        ("int4", _corrupt_first_scale, r"corrupted scales"),
        ("int8", _negative_scale, r"corrupted scales"),
        ("int4", _negative_scale, r"corrupted scales"),
        ("int8", _truncate_first_tensor, r"values truncated or padded"),
        ("int4", _truncate_first_tensor, r"values truncated or padded"),
        ("int8", _code_minus_128, r"int8 code -128 is never written"),
    ],
    ids=["int8-nan-scale", "int4-nan-scale", "int8-negative-scale", "int4-negative-scale", "int8-truncated-values",
         "int4-truncated-values", "int8-bad-code"],
)  # fmt: skip
def test_a_malformed_delta_is_refused_before_anything_loads(scheme, edit, message):
    encoded, _, _ = _delta_payload(scheme)
    snapshot = _snapshot()
    with pytest.raises(PayloadError, match=message):
        decode_payload(_tampered(encoded, edit), _spec(scheme), expected_parts=["g1"])
    assert _unchanged(snapshot)


def test_an_int4_nibble_zero_is_refused():
    encoded, _, _ = _delta_payload("int4")

    def zero_nibble(manifest, data):
        data[manifest["tensors"][0][4]] &= 0xF0
        return data

    with pytest.raises(PayloadError, match=r"int4 nibble 0 is never written"):
        decode_payload(_tampered(encoded, zero_nibble), _spec("int4"))


def test_a_delta_part_cannot_travel_as_raw_floats():
    encoded, _, _ = _delta_payload("int8")

    def claim_float32(manifest, data):
        manifest["tensors"][0][2] = "float32"
        return data

    with pytest.raises(PayloadError, match=r"as float32.*expects int8"):
        decode_payload(_tampered(encoded, claim_float32), _spec("int8"))


# ---- in a run ----


def _run(snake_args, payload_dtype, **overrides):
    settings = dict(num_nodes=3, num_block_groups=2, stage_steps=2, num_passes=2, payload_dtype=payload_dtype)
    args = snake_args(**(settings | overrides))
    lora = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.0)
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(n=36), peft_config=lora)
    trainer.train()
    return trainer


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_hop_carries_each_part_as_one_quantized_delta(snake_args, scheme):
    trainer = _run(snake_args, scheme)
    named = dict(trainer.model.named_parameters())
    numel = {p: [named[n].numel() for n in trainer.part_map.tensor_names(p)] for p in trainer.part_map.parts}
    expected = {p: sum(quantized_nbytes(n, scheme) for n in sizes) for p, sizes in numel.items()}
    assert trainer.snake_report.part_nbytes == expected, "the report counts wire bytes: codes and scales"
    assert trainer.snake_report.hops
    for hop in trainer.snake_report.hops:
        assert hop.tensor_nbytes == sum(expected[p] for p in hop.parts)
        assert hop.nbytes > hop.tensor_nbytes  # header and manifest are counted too
    # Pass 2 trains each group from the version every later receiver holds: those deltas are against it, not 0.
    assert any(base > 0 for _, base, _ in trainer._relay.deltas.latest.values())


def test_a_forwarded_delta_is_rebuilt_on_its_base_by_a_later_receiver(snake_args, monkeypatch):
    # Designated, 3 nodes x 3 passes: a delta of group 0 against a version other than 0 reaches a node through a
    # sender that did not train it (it forwards the delta it received). Every receipt is checked against the sender's
    # checksum, so a wrong base would stop the run.
    sent = []
    build = relay_module.build_payload

    def recording(*args, deltas=None, **kwargs):
        sent.append((kwargs["stage"], {part: base for part, (base, _) in (deltas or {}).items()}))
        return build(*args, deltas=deltas, **kwargs)

    monkeypatch.setattr(relay_module, "build_payload", recording)
    trainer = _run(snake_args, "int8", num_block_groups=3, num_passes=3, stage_steps=1, schedule="designated")
    plan = trainer.plan
    forwarded = [(stage, part) for stage, bases in sent for part, base in bases.items()
                 if base > 0 and part != f"g{plan[stage - 1].group}" and part != "shared"]  # fmt: skip
    assert forwarded, "the plan forwards a delta against a non-zero base"
    assert all(set(bases) == set(hop.parts) for (_, bases), hop in zip(sent, trainer.snake_report.hops))


def test_quantized_run_trains_like_float32_on_a_tiny_model(snake_args):
    full, int8 = _run(snake_args, "float32"), _run(snake_args, "int8")
    losses = [[s.train_loss for s in t.snake_report.stages] for t in (full, int8)]
    assert losses[0][0] == losses[1][0]  # the first stage trains from the same initial values
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-3
    assert sum(h.tensor_nbytes for h in int8.snake_report.hops) < 0.26 * sum(
        h.tensor_nbytes for h in full.snake_report.hops
    )


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_plausible_but_wrong_scale_is_refused_by_the_senders_checksum_before_loading(
    snake_args, scheme, monkeypatch
):
    # A finite, positive scale decodes; the rebuilt part then differs from the sender's checksum, and the relay refuses
    # it (Relay._delta_bases runs before Payload.load_into).
    original = InMemoryTransport.send

    def doubled_first_scale(manifest, data):
        at = _scales_at(manifest)
        scale = torch.frombuffer(bytearray(data[at : at + 2]), dtype=torch.float16).item()
        _set_first_scale(data, at, 2 * scale + 1e-3)
        return data

    def tampering(self, src, dst, encoded, stage):
        manifest = json.loads(encoded.manifest.numpy().tobytes())
        if manifest["deltas"]:
            encoded = _tampered(encoded, doubled_first_scale)
        original(self, src, dst, encoded, stage)

    monkeypatch.setattr(InMemoryTransport, "send", tampering)
    with pytest.raises(PayloadError, match=r"rebuilt on version \d+ does not match the sender's checksum"):
        _run(snake_args, scheme)


def _lora_state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def test_resume_before_a_hop_with_a_nonzero_base_gives_the_same_adapters(snake_args, tmp_path):
    # 3 nodes x 2 groups x 2 passes: the resumed hops include deltas against versions other than 0, whose base values
    # (and every node's residuals) come from the checkpoint.
    settings = dict(num_nodes=3, num_block_groups=2, stage_steps=1, num_passes=2, save_strategy="steps")
    whole = _run(snake_args, "int4", **settings, output_dir=str(tmp_path / "w"))
    expected = _lora_state(whole)
    # One-step stages: checkpoint-N goes on at stage N, and the hop into stage 7 carries group 0 as a delta against
    # version 3 (the plan's pass 2 trains it from there).
    for checkpoint in [tmp_path / "w" / "checkpoint-7"]:
        args = snake_args(**settings, payload_dtype="int4", output_dir=str(tmp_path / checkpoint.name))
        lora = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.0)
        resumed = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(n=36), peft_config=lora)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        state = _lora_state(resumed)
        assert all(torch.equal(state[k], expected[k]) for k in expected), checkpoint.name


# ---- resume (slow: real processes) ----


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_with_int4_payloads_gives_bit_identical_adapters(tmp_path):
    def run(out: Path, *args: str, hash_seed: int) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), SNAKE_TEST_PAYLOAD_DTYPE="int4")
        command = [sys.executable, str(HERE / "_resume_run.py"), str(out), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)

    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    done = run(whole, "run", hash_seed=7)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    killed = run(crashed, "run", "8", hash_seed=101)  # 3-step stages: step 8 is in the third
    assert killed.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(crashed)
    assert checkpoint.name == "checkpoint-6" and (checkpoint / "snake_deltas.safetensors").is_file()
    resumed = run(crashed, "resume", hash_seed=118)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_run(whole, crashed)


# p2p: rank 1 dies in stage 4 and the others stop; cs: the coordinator dies in stage 5 and the others stop. Relaunched
# with resume_from_checkpoint=True, each rank restores its residuals, latest deltas and base values from its own
# checkpoint (the cs coordinator also rebuilds the deltas it forwards on what it restored).
DIST_KILLS = [("p2p", 1, 9), ("cs", 0, 11)]


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "rank", "step"), DIST_KILLS, ids=["p2p", "cs-coordinator"])
def test_distributed_sigkill_then_resume_with_int4_payloads_gives_bit_identical_adapters(
    tmp_path, monkeypatch, topology, rank, step
):
    from _dist_fault_run import adapters, make_trainer
    from test_distributed_faults import _adapters, _equal, _launch

    crashed = _launch(tmp_path, topology, "run", str(rank), str(step), SNAKE_TEST_PAYLOAD_DTYPE="int4")
    assert crashed[rank][0] == -signal.SIGKILL
    assert all(code != 0 for r, (code, _) in crashed.items() if r != rank), "the others stop"
    assert all((p / "snake_deltas.safetensors").is_file() for p in tmp_path.glob("node-*/checkpoint-*"))
    resumed = _launch(tmp_path, topology, "resume", hash_base=202, SNAKE_TEST_PAYLOAD_DTYPE="int4")
    for r, (code, output) in resumed.items():
        assert code == 0, f"rank {r} failed on resume:\n{output[-3000:]}"
    monkeypatch.setenv("SNAKE_TEST_PAYLOAD_DTYPE", "int4")
    threads = torch.get_num_threads()
    try:
        simulated = make_trainer(str(tmp_path / "sim"), topology, engine="simulation")
        simulated.train()
    finally:
        torch.set_num_threads(threads)
    expected = adapters(simulated)
    for r in range(3):
        assert _equal(_adapters(tmp_path / f"adapters-{r}.safetensors"), expected), f"rank {r} differs"
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in simulated.snake_report.stages]
    assert report["link_bytes"] == simulated.snake_report.link_bytes()
