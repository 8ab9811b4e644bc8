"""What travels between nodes: adapter tensors of the parts a receiver lacks, with a manifest (version vectors, which
say what a receiver lacks, are in `ledger.py`).

Wire format (no pickle anywhere): three flat tensors,

* `header`: int64 `[MAGIC, FORMAT_VERSION, manifest_nbytes, data_nbytes]`,
* `manifest`: uint8, UTF-8 JSON (sender, receiver, stage, base-model fingerprint, adapter-config hash, the sender's
  version and checksum of every part, and for each carried tensor its part, name, dtype, shape and byte offset),
* `data`: uint8, the carried tensors' raw bytes back to back.

The manifest names the payload's `scheme` (the sender's `payload_dtype`); a receiver refuses a payload in a scheme it
did not agree to, by name. Under the quantized schemes (`"int8"`, `"int4"`, see `snake_hf.quant` and
docs/payload_compression.md) a part may travel as a **delta**: the manifest's `deltas` maps such a part to the version
its delta is against (the base, which the receiver must hold, or 0: the initial values every node holds), and each of
its floating-point tensors travels as codes and float16 block scales (entry dtype = the scheme name); the receiver
adds the dequantized delta to its base ([`snake_hf.quant.apply_delta`]) and gets exactly the sender's bits. Other
parts, and integer tensors, travel whole in the model's dtype (exact).

Floating-point tensors may travel in a narrower dtype than the model trains in (`payload_dtype`, e.g. bfloat16): the
manifest then names the wire dtype of each tensor, the checksums cover the wire bytes, and the receiver casts back
into its model's dtype. A part is rounded to the wire dtype in the sender's model too, when its stage closes
([`round_to_wire`]), and every part once when the relay starts, so every node holds exactly what a receiver of that
part would hold.

A receiver checks everything (sizes, checksums, fingerprint, adapter hash, part set, names, shapes, dtypes) before a
single value is copied into its model, so a wrong payload is refused whole, never loaded half-way.

(About 560 lines, over the ~400 the style guide aims at: the format, its encoder and the decoder that verifies it
read together, and each check sits next to the field it checks.)
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import PartMap
from ..devices import offloaded_values
from ..identity import canonical_hash
from ..precision import dtype_by_name, dtype_name, is_quantized, wire_dtype
from ..quant import QuantizedTensor, apply_delta, quantized_nbytes


__all__ = [
    "EncodedPayload",
    "Payload",
    "PayloadError",
    "PayloadSpec",
    "build_payload",
    "check_header",
    "config_hash",
    "decode_payload",
    "encode_payload",
    "model_fingerprint",
    "part_wire_nbytes",
    "tensors_checksum",
]

MAGIC = 0x5EA4E  # "snake", near enough
FORMAT_VERSION = 1
HEADER_NUMEL = 4
HEADER_NBYTES = HEADER_NUMEL * 8
MAX_MANIFEST_NBYTES = 64 * 1024 * 1024


class PayloadError(ValueError):
    """A payload (or payload file) is malformed or does not match the receiving node; nothing was loaded."""


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (a view where possible)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def tensors_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of `named_tensors`, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(_raw_bytes(tensor).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module, samples: int = 64) -> str:
    """Fingerprint of a model's weights as loaded: class, every tensor's name, dtype and shape, and a sample of values.

    Hashes the first and last `samples` values of each tensor rather than all bytes, so a 7B model is fingerprinted in
    well under a second; two different checkpoints of the same architecture still differ in their samples. Weights an
    Accelerate device map offloads are read from their hook's stored values, so an offloaded base fingerprints as the
    same base loaded whole.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    offloaded = offloaded_values(model)  # an offloaded tensor's values sit in its hook, not in the model
    for name, tensor in sorted(model.state_dict().items()):
        tensor = offloaded.get(name, tensor) if tensor.is_meta else tensor
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:samples], flat[-samples:]]) if flat.numel() > 2 * samples else flat
        digest.update(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(_raw_bytes(sample).numpy().tobytes())
    return digest.hexdigest()[:16]


# Adapter-config fields that say where the base was loaded from, not what trains: two hosts may load the same base from
# different folders (the base-model fingerprint checks that the weights agree).
_LOCATION_FIELDS = ("base_model_name_or_path", "revision")


def config_hash(config: Mapping | None, layout: Mapping[str, Mapping[str, tuple[str, tuple[int, ...]]]]) -> str:
    """Hash of the adapter configuration (e.g. `LoraConfig.to_dict()`, or None in full mode) and the part layout.

    Computed from their canonical form ([`snake_hf.identity.canonical_json`]): PEFT keeps `target_modules` as a set,
    whose order differs between processes, so every rank and every resumed run gets the same hash.
    """
    config = None if config is None else {k: v for k, v in config.items() if k not in _LOCATION_FIELDS}
    return canonical_hash({"config": config, "layout": layout}, "adapter config", length=16)


@dataclass(frozen=True)
class PayloadSpec:
    """What a receiving node expects: its run identity and, per part, each tensor's dtype and shape.

    Args:
        fingerprint (`str`): base-model fingerprint ([`model_fingerprint`] at set-up).
        adapter_hash (`str`): [`config_hash`] of the adapter config and layout.
        layout (`dict[str, dict[str, tuple[str, tuple[int, ...]]]]`): part -> tensor name -> (dtype, shape), with
            the dtype of the model.
        payload_dtype (`str`, defaults to `"float32"`): the widest floating-point dtype on the wire ([`wire_dtype`]).
    """

    fingerprint: str
    adapter_hash: str
    layout: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    payload_dtype: str = "float32"

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        part_map: PartMap,
        fingerprint: str,
        adapter_config: Mapping | None,
        payload_dtype: str = "float32",
    ):
        state = _named_tensors(model)
        layout = {
            part: {n: (dtype_name(state[n].dtype), tuple(state[n].shape)) for n in part_map.tensor_names(part)}
            for part in part_map.parts
        }
        adapter_hash = config_hash(adapter_config, layout)
        return cls(fingerprint=fingerprint, adapter_hash=adapter_hash, layout=layout, payload_dtype=payload_dtype)

    def wire_name(self, model_dtype: str) -> str:
        """The wire dtype (as a name) of a tensor whose model dtype is named `model_dtype`."""
        return dtype_name(wire_dtype(dtype_by_name(model_dtype), self.payload_dtype))


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


@dataclass
class Payload:
    """A decoded (or about to be encoded) payload.

    Args:
        manifest (`dict`): everything but the tensor bytes (see module docstring).
        tensors (`dict[str, torch.Tensor]`): tensors carried whole, by name.
        quantized (`dict[str, QuantizedTensor]`): tensors carried as quantized deltas (the parts in
            `manifest["deltas"]`), by name.
    """

    manifest: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return sorted(self.manifest["parts"])

    @property
    def state(self) -> dict[str, tuple[int, str]]:
        """The sender's (version, checksum) of every part."""
        return {part: (int(v), str(c)) for part, (v, c) in self.manifest["state"].items()}

    @property
    def deltas(self) -> dict[str, int]:
        """Parts carried as quantized deltas -> the version each delta is against (0: the initial values)."""
        return {part: int(base) for part, base in self.manifest.get("deltas", {}).items()}

    def _in(self, parts: Iterable[str] | None) -> Callable[[str], bool]:
        """Whether a carried tensor (by name) belongs to one of `parts` (None: every part)."""
        if parts is None:
            return lambda name: True
        names = {entry[1] for entry in self.manifest["tensors"] if entry[0] in set(parts)}
        return names.__contains__

    def rebuild(
        self, bases: Mapping[str, torch.Tensor] | None, parts: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The values of the tensors carried as quantized deltas (of `parts`, default all): each base plus its
        dequantized delta, bit for bit what the sender computed when it had the same base
        ([`snake_hf.quant.apply_delta`])."""
        keep = self._in(parts)
        quantized = {name: q for name, q in self.quantized.items() if keep(name)}
        if quantized and bases is None:
            raise ValueError("This payload carries quantized deltas: pass the base values they apply to (`bases`).")
        return {name: apply_delta(bases[name], q, self.manifest["scheme"]) for name, q in quantized.items()}

    def load_into(
        self, model: nn.Module, bases: Mapping[str, torch.Tensor] | None = None, parts: Iterable[str] | None = None
    ) -> None:
        """Copies the carried tensors into `model`, cast back to its dtypes (call only on a payload returned by
        [`decode_payload`]).

        Args:
            model (`nn.Module`): the receiver's model.
            bases (`Mapping[str, torch.Tensor]`, *optional*): for every quantized tensor, the base value its delta is
                added to (the receiver's value of the delta's base version); required when the payload has deltas.
            parts (`Iterable[str]`, *optional*): load only these of the carried parts (default: all; the cs
                coordinator skips parts it already holds).
        """
        targets, keep = _named_tensors(model), self._in(parts)
        values = self.rebuild(bases, parts) if self.quantized else {}
        with torch.no_grad():
            for name, tensor in (self.tensors | values).items():
                if keep(name):
                    targets[name].copy_(tensor)


@dataclass
class EncodedPayload:
    """A payload as it crosses the wire: header, manifest and data tensors."""

    header: torch.Tensor
    manifest: torch.Tensor
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: header + manifest + tensor data."""
        return HEADER_NBYTES + self.manifest.numel() + self.data.numel()

    @property
    def data_nbytes(self) -> int:
        return self.data.numel()

    def to_bytes(self) -> bytes:
        return (
            struct.pack("<4q", *self.header.tolist()) + self.manifest.numpy().tobytes() + self.data.numpy().tobytes()
        )

    @classmethod
    def from_bytes(cls, buffer: bytes) -> EncodedPayload:
        """Splits a byte string written by [`to_bytes`]; raises [`PayloadError`] when the sizes do not add up."""
        if len(buffer) < HEADER_NBYTES:
            raise PayloadError(f"Payload is {len(buffer)} bytes, shorter than its {HEADER_NBYTES}-byte header.")
        header = list(struct.unpack("<4q", buffer[:HEADER_NBYTES]))
        manifest_nbytes, data_nbytes = check_header(header)
        if len(buffer) != HEADER_NBYTES + manifest_nbytes + data_nbytes:
            raise PayloadError(
                f"Payload is {len(buffer)} bytes but its header announces {HEADER_NBYTES} + {manifest_nbytes} + "
                f"{data_nbytes}; the file or message is truncated or padded."
            )
        body = torch.frombuffer(bytearray(buffer[HEADER_NBYTES:]), dtype=torch.uint8)  # non-empty: manifest > 0
        return cls(torch.tensor(header, dtype=torch.int64), body[:manifest_nbytes], body[manifest_nbytes:])


def check_header(header: Sequence[int], describe: Callable[[str], str] | None = None) -> tuple[int, int]:
    """Checks a payload's header before anything else is read (a wire receiver allocates its buffers from it).

    Args:
        header (`Sequence[int]`): the header's entries, `[MAGIC, FORMAT_VERSION, manifest_nbytes, data_nbytes]`.
        describe (`Callable[[str], str]`, *optional*): turns the reason (a phrase) into the error message, e.g. one
            that names the hop the header arrived on; by default the reason as a sentence.

    Returns:
        `tuple[int, int]`: the manifest's and the data's sizes in bytes. Raises [`PayloadError`] when the header is
        not a snake_hf header of this format or announces impossible sizes.

    Example:
        ```python
        >>> check_header(encode_payload(payload, part_of).header.tolist())
        (412, 4096)
        ```
    """
    describe = describe or (lambda reason: f"{reason[0].upper()}{reason[1:]}.")
    if len(header) != HEADER_NUMEL:
        raise PayloadError(describe(f"payload header has {len(header)} entries; expected {HEADER_NUMEL}"))
    magic, version, manifest_nbytes, data_nbytes = header
    if magic != MAGIC:
        raise PayloadError(describe(f"not a snake_hf payload (magic {magic:#x}, expected {MAGIC:#x})"))
    if version != FORMAT_VERSION:
        raise PayloadError(
            describe(f"payload format {version} is not supported by this snake_hf (format {FORMAT_VERSION})")
        )
    if not 0 < manifest_nbytes <= MAX_MANIFEST_NBYTES or data_nbytes < 0:
        raise PayloadError(describe(f"payload header announces impossible sizes ({manifest_nbytes}, {data_nbytes})"))
    return manifest_nbytes, data_nbytes


def build_payload(
    model: nn.Module,
    part_map: PartMap,
    parts: Iterable[str],
    state: Mapping[str, tuple[int, str]],
    spec: PayloadSpec,
    sender: int,
    receiver: int,
    stage: int,
    deltas: Mapping[str, tuple[int, Mapping[str, QuantizedTensor]]] | None = None,
) -> Payload:
    """Collects the tensors of `parts` from `model`, cast to their wire dtype (`spec.payload_dtype`), with a manifest.

    Args:
        model (`nn.Module`): the sender's model.
        part_map (`PartMap`): tensor names per part.
        parts (`Iterable[str]`): parts to carry (those the receiver lacks).
        state (`Mapping[str, tuple[int, str]]`): the sender's (version, checksum) of every part.
        spec (`PayloadSpec`): the run identity stamped on the payload.
        sender (`int`), receiver (`int`), stage (`int`): addressing, for error messages and the report.
        deltas (`Mapping[str, tuple[int, Mapping[str, QuantizedTensor]]]`, *optional*): quantized schemes: parts that
            travel as deltas -> (base version, the quantized delta of each floating-point tensor); the other parts of
            `parts` travel whole.
    """
    deltas = dict(deltas or {})
    if deltas and not is_quantized(spec.payload_dtype):
        raise ValueError(f"payload_dtype {spec.payload_dtype!r} carries no quantized deltas.")
    named = _named_tensors(model)
    tensors, quantized = {}, {}
    for part in sorted(parts):
        for name in part_map.tensor_names(part):
            tensor = named[name].detach()
            if part in deltas and tensor.is_floating_point():
                quantized[name] = deltas[part][1][name]
            else:
                tensors[name] = tensor.to(wire_dtype(tensor.dtype, spec.payload_dtype))
    manifest = {
        "sender": sender,
        "receiver": receiver,
        "stage": stage,
        "scheme": spec.payload_dtype,
        "deltas": {part: int(base) for part, (base, _) in sorted(deltas.items()) if part in set(parts)},
        "fingerprint": spec.fingerprint,
        "adapter_hash": spec.adapter_hash,
        "state": {part: [int(v), str(c)] for part, (v, c) in state.items()},
        "parts": sorted(parts),
        "tensors": [],
    }
    return Payload(manifest=manifest, tensors=tensors, quantized=quantized)


def encode_payload(payload: Payload, part_of: Mapping[str, str]) -> EncodedPayload:
    """Lays the payload out as header, manifest and data tensors (`part_of` maps tensor name -> part)."""
    chunks, entries, wire, offset = [], [], {}, 0
    scheme = payload.manifest.get("scheme")
    for name, tensor in list(payload.tensors.items()) + list(payload.quantized.items()):
        if isinstance(tensor, QuantizedTensor):  # a quantized delta: its codes then its scales; the model's shape
            raw, dtype, shape = tensor.to_bytes(), scheme, list(tensor.shape)
        else:
            raw, dtype, shape = _raw_bytes(tensor), dtype_name(tensor.dtype), list(tensor.shape)
        entries.append([part_of[name], name, dtype, shape, offset, raw.numel()])
        chunks.append(raw)
        wire[name] = raw if isinstance(tensor, QuantizedTensor) else tensor
        offset += raw.numel()
    data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    manifest = dict(payload.manifest, tensors=entries)
    manifest["data_sha256"] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    manifest["part_checksums"] = {
        part: tensors_checksum((e[1], wire[e[1]]) for e in entries if e[0] == part) for part in manifest["parts"]
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    manifest_tensor = torch.frombuffer(bytearray(manifest_bytes), dtype=torch.uint8)
    header = torch.tensor([MAGIC, FORMAT_VERSION, manifest_tensor.numel(), data.numel()], dtype=torch.int64)
    return EncodedPayload(header=header, manifest=manifest_tensor, data=data)


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest without its own digest (the same compact JSON the encoder writes)."""
    return canonical_hash({k: v for k, v in manifest.items() if k != "manifest_sha256"}, "payload manifest")


def decode_payload(encoded: EncodedPayload, spec: PayloadSpec, expected_parts: Iterable[str] | None = None) -> Payload:
    """Verifies an encoded payload against the receiver's `spec` and returns it decoded. Loads nothing.

    Raises:
        [`PayloadError`]: naming what differs (sizes, checksum, fingerprint, adapter hash, parts, names, shapes).
    """
    try:
        return _decode(encoded, spec, expected_parts)
    except PayloadError:
        raise
    except Exception as error:  # any other failure on hostile bytes is still a refused payload
        raise PayloadError(f"Malformed payload: {type(error).__name__}: {error}") from error


def _decode(encoded: EncodedPayload, spec: PayloadSpec, expected_parts: Iterable[str] | None) -> Payload:
    manifest = _verified_manifest(encoded)
    where = f"payload from node {manifest['sender']} to node {manifest['receiver']} (stage {manifest['stage']})"
    _check_identity(manifest, spec, expected_parts, where)
    tensors, quantized = _checked_tensors(manifest, encoded.data, spec, where)
    if set(manifest["state"]) != set(spec.layout):
        raise PayloadError(f"The {where} describes parts {sorted(manifest['state'])}; expected {sorted(spec.layout)}.")
    return Payload(manifest=manifest, tensors=tensors, quantized=quantized)


def _verified_manifest(encoded: EncodedPayload) -> dict:
    """The manifest, once the sizes, the JSON, its required keys and both digests (manifest, data) check out."""
    header = [int(v) for v in encoded.header.tolist()]
    check_header(header)
    if header[2] != encoded.manifest.numel() or header[3] != encoded.data.numel():
        raise PayloadError(
            f"Payload sizes differ from its header: manifest {encoded.manifest.numel()} vs {header[2]}, data "
            f"{encoded.data.numel()} vs {header[3]} bytes."
        )
    try:
        manifest = json.loads(encoded.manifest.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"Payload manifest is not valid JSON: {error}") from error
    required = {"sender", "receiver", "stage", "scheme", "deltas", "fingerprint", "adapter_hash", "state", "parts"}
    required.add("tensors")
    if not isinstance(manifest, dict) or not required <= set(manifest):
        raise PayloadError(f"Payload manifest lacks {sorted(required - set(manifest or {}))}.")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise PayloadError("Payload manifest fails its checksum: it was corrupted or tampered with in transit.")
    if hashlib.sha256(encoded.data.numpy().tobytes()).hexdigest() != manifest.get("data_sha256"):
        raise PayloadError(
            f"Payload from node {manifest['sender']} (stage {manifest['stage']}) fails its checksum: the data was "
            "corrupted or tampered with in transit."
        )
    return manifest


def _check_identity(manifest: dict, spec: PayloadSpec, expected_parts: Iterable[str] | None, where: str) -> None:
    """Same scheme, base model, adapter configuration and layout, and exactly the parts the receiver lacks."""
    if manifest["scheme"] != spec.payload_dtype:
        raise PayloadError(
            f"The {where} is in scheme {manifest['scheme']!r} but this node agreed to payload_dtype "
            f"{spec.payload_dtype!r}; every node needs the same payload_dtype."
        )
    deltas = manifest["deltas"]
    if not isinstance(deltas, dict) or not set(deltas) <= set(manifest["parts"]):
        raise PayloadError(f"The {where} names delta parts {deltas!r} that it does not carry.")
    if deltas and not is_quantized(spec.payload_dtype):
        raise PayloadError(
            f"The {where} carries quantized deltas, which payload_dtype {spec.payload_dtype!r} has not."
        )
    if not all(isinstance(base, int) and base >= 0 for base in deltas.values()):
        raise PayloadError(f"The {where} names impossible base versions {deltas!r}.")
    if manifest["fingerprint"] != spec.fingerprint:
        raise PayloadError(
            f"The {where} was made from a different base model (fingerprint {manifest['fingerprint']}, this node "
            f"{spec.fingerprint}); every node must load the same pretrained checkpoint."
        )
    if manifest["adapter_hash"] != spec.adapter_hash:
        raise PayloadError(
            f"The {where} has a different adapter configuration or layout (hash {manifest['adapter_hash']}, this "
            f"node {spec.adapter_hash}); every node needs the same peft_config, groups and train_mode."
        )
    parts = manifest["parts"]
    unknown = set(parts) - set(spec.layout)
    if unknown:
        raise PayloadError(
            f"The {where} carries unknown parts {sorted(unknown)}; this node has {sorted(spec.layout)}."
        )
    if expected_parts is not None and set(parts) != set(expected_parts):
        raise PayloadError(
            f"The {where} carries parts {sorted(parts)} but this node lacks exactly {sorted(expected_parts)}."
        )


def _checked_tensors(
    manifest: dict, data: torch.Tensor, spec: PayloadSpec, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """The carried tensors (copies of their bytes), once every name, wire dtype, shape, byte range, quantized codes and
    scales, and part checksum match what this node expects; every part complete."""
    parts, deltas = manifest["parts"], manifest["deltas"]
    tensors, quantized, wire, seen = {}, {}, {}, {part: set() for part in parts}
    for part, name, dtype, shape, offset, nbytes in manifest["tensors"]:
        expected = spec.layout.get(part, {}).get(name)
        if expected is None or part not in seen or name in wire:
            raise PayloadError(f"The {where} carries tensor {name!r} which is not in part {part!r} here.")
        if part in deltas and dtype_by_name(expected[0]).is_floating_point:
            quantized[name] = _checked_quantized(data, (name, dtype, shape, offset, nbytes), expected, spec, where)
            wire[name] = data[offset : offset + nbytes]
            seen[part].add(name)
            continue
        expected = (spec.wire_name(expected[0]), expected[1])
        if (dtype, tuple(shape)) != expected:
            raise PayloadError(
                f"The {where} has tensor {name!r} as {dtype}{list(shape)}; this node expects "
                f"{expected[0]}{list(expected[1])} on the wire (payload_dtype {spec.payload_dtype!r}); every node "
                "needs the same model dtype and payload_dtype."
            )
        torch_dtype = dtype_by_name(dtype)
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if nbytes != numel * torch.empty(0, dtype=torch_dtype).element_size() or not 0 <= offset <= data.numel():
            raise PayloadError(f"The {where} has inconsistent byte ranges for {name!r}.")
        if offset + nbytes > data.numel():
            raise PayloadError(f"The {where} is truncated inside tensor {name!r}.")
        tensors[name] = wire[name] = data[offset : offset + nbytes].clone().view(torch_dtype).reshape(tuple(shape))
        seen[part].add(name)
    for part in parts:
        missing = set(spec.layout[part]) - seen[part]
        if missing:
            raise PayloadError(f"The {where} misses {len(missing)} tensors of part {part!r}, e.g. {min(missing)!r}.")
        checksum = tensors_checksum((n, wire[n]) for n in seen[part])
        if checksum != manifest.get("part_checksums", {}).get(part):
            raise PayloadError(f"The {where} fails the checksum of part {part!r}.")
    return tensors, quantized


def _checked_quantized(
    data: torch.Tensor, entry: tuple, expected: tuple[str, tuple[int, ...]], spec: PayloadSpec, where: str
) -> QuantizedTensor:
    """A delta tensor's codes and scales, once its scheme, shape, byte range, codes and scales check out."""
    name, dtype, shape, offset, nbytes = entry
    if (dtype, tuple(shape)) != (spec.payload_dtype, expected[1]):
        raise PayloadError(
            f"The {where} has delta tensor {name!r} as {dtype}{list(shape)}; this node expects "
            f"{spec.payload_dtype}{list(expected[1])} (payload_dtype {spec.payload_dtype!r})."
        )
    if not 0 <= offset <= data.numel() or offset + nbytes > data.numel():
        raise PayloadError(f"The {where} is truncated inside delta tensor {name!r}.")
    try:
        return QuantizedTensor.from_bytes(data[offset : offset + nbytes], tuple(shape), spec.payload_dtype)
    except ValueError as error:
        raise PayloadError(f"The {where} has a malformed delta tensor {name!r}: {error}.") from error


def part_wire_nbytes(part_map: PartMap, model: nn.Module, payload_dtype: str = "float32") -> dict[str, int]:
    """Bytes of each part's tensors on the wire (what a payload of that part carries, manifest excluded; under a
    quantized scheme, the part as a delta: codes and scales).

    Args:
        part_map (`PartMap`): tensor names per part.
        model (`nn.Module`): the model the parts belong to (its dtypes decide the wire dtypes).
        payload_dtype (`str`, defaults to `"float32"`): one of [`PAYLOAD_DTYPES`].

    Returns:
        `dict[str, int]`: part -> bytes.

    Example:
        ```python
        >>> sizes = part_wire_nbytes(part_map, model, "bfloat16")  # half the float32 figures for a float32 model
        >>> sum(sizes.values())  # tensor bytes of a hop that carries every part
        ```
    """
    state = _named_tensors(model)
    nbytes = {name: t.numel() * wire_dtype(t.dtype, payload_dtype).itemsize for name, t in state.items()}
    if is_quantized(payload_dtype):  # a part carried as a delta (as every hop of a plain run carries it)
        nbytes |= {n: quantized_nbytes(t.numel(), payload_dtype) for n, t in state.items() if t.is_floating_point()}
    return {part: sum(nbytes[n] for n in part_map.tensor_names(part)) for part in part_map.parts}
