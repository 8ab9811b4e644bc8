"""Quantized deltas with error feedback (`payload_dtype="int8"` / `"int4"`): what each process keeps to make, forward
and apply them. The rule (docs/payload_compression.md):

* **One value per version.** A node that closes a stage turns each part it trained into a new version whose value is
  `base + dequantize(quantize(trained + residual - base))` ([`snake_hf.quant.quantize_step`]); its model takes that
  value, and it keeps the residual `trained + residual - value` for its next stage on that part (error feedback). Every
  node that ever holds that version holds exactly these bits, so a version number still names one tensor, and the
  ledger's checksums check every reconstruction.
* **The base** is a version every receiver of the new version will hold: the version the trainer started the stage
  from when the plan says every node that will receive this version before the part is trained again holds exactly
  that one (the relay works this out from the plan and the ledger, the same in every process), else version 0, the
  initial values every node keeps. So every hop of a plain run carries each part as one delta.
* **Forwarding.** A node that received a version as a delta keeps that delta and forwards it unchanged to a receiver
  that holds its base; any other receiver (e.g. after a cs re-plan) gets the part whole, in the model's dtype (exact).

This module keeps the state (initial values, residuals, the latest delta of each part, the trained parts' values at
the start of the stage) and saves it into stage checkpoints; the relay decides when each piece is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..blocks import PartMap
from ..quant import QuantizedTensor, quantize_step


__all__ = ["DeltaBook"]

DELTAS_FILE = "snake_deltas.safetensors"


class DeltaBook:
    """One process's quantized-delta state.

    Args:
        model (`nn.Module`): this process's model (its parts' current values are read and written).
        part_map (`PartMap`): tensor names per part.
        scheme (`str`): `"int8"` or `"int4"`.
    """

    def __init__(self, model: nn.Module, part_map: PartMap, scheme: str):
        self.model, self.part_map, self.scheme = model, part_map, scheme
        named = self._named()
        self.float_names = {
            part: [n for n in part_map.tensor_names(part) if named[n].is_floating_point()] for part in part_map.parts
        }
        # Version 0 of every part: the same seeded values on every node, kept so any node can apply a delta against 0.
        self.initial = {n: named[n].detach().clone() for names in self.float_names.values() for n in names}
        self.residuals: dict[tuple[int, str], torch.Tensor] = {}  # (node, tensor name) -> what was not sent yet
        self.latest: dict[str, tuple[int, int, dict[str, QuantizedTensor]]] = {}  # part -> (version, base, deltas)
        # part -> version -> values: the versions stages started from that may still serve as a base (see snapshot).
        self.start: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

    def _named(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters()) | dict(self.model.named_buffers())

    def snapshot(self, parts: Iterable[str], versions: Mapping[str, int]) -> None:
        """At a stage's start: the values of `parts` at the node's `versions`, the bases its deltas may use. Kept per
        part: this version and the base of the part's latest delta (still forwarded to receivers that hold it)."""
        named = self._named()
        for part in parts:
            keep = {versions[part], self.latest[part][1] if part in self.latest else 0} - {0}  # 0: `initial`
            kept = {v: values for v, values in self.start.get(part, {}).items() if v in keep}
            if versions[part] not in kept:
                kept[versions[part]] = {n: named[n].detach().clone() for n in self.float_names[part]}
            self.start[part] = kept

    def base_values(self, part: str, base: int) -> dict[str, torch.Tensor]:
        """The values of `part` at version `base`: the initial values (0), the stage-start snapshot (the trainer's base;
        in simulation also every receiver's, whose model holds the newest values), else the model's own (a
        distributed receiver, whose model holds its version `base`, checked by the relay)."""
        if base == 0:
            return {n: self.initial[n] for n in self.float_names[part]}
        if base in self.start.get(part, {}):
            return self.start[part][base]
        named = self._named()
        return {n: named[n].detach() for n in self.float_names[part]}

    def close(self, node: int, part: str, version: int, base: int) -> None:
        """`node` trained `part` into `version`: quantize its delta against `base` with `node`'s residual, put the
        reconstructed value into the model, keep the new residual and the delta."""
        named, bases, deltas = self._named(), self.base_values(part, base), {}
        with torch.no_grad():
            for name in self.float_names[part]:
                residual = self.residuals.get((node, name))
                deltas[name], value, self.residuals[(node, name)] = quantize_step(
                    named[name], bases[name], residual, self.scheme
                )
                named[name].copy_(value)
        self.latest[part] = (version, base, deltas)

    def delta_of(self, part: str, version: int) -> tuple[int, dict[str, QuantizedTensor]] | None:
        """The (base, deltas) of `version` of `part`, or None when this process does not know that version's delta."""
        known = self.latest.get(part)
        return None if known is None or known[0] != version else (known[1], known[2])

    def delta_for(self, part: str, version: int, held: int) -> tuple[int, dict[str, QuantizedTensor]] | None:
        """The (base, deltas) that take a receiver holding version `held` of `part` to `version`, or None (send it
        whole): this process must know `version`'s delta, and its base must be 0 or `held`."""
        known = self.delta_of(part, version)
        return None if known is None or known[0] not in (0, held) else known

    def received(self, part: str, version: int, delta: tuple[int, dict[str, QuantizedTensor]] | None) -> None:
        """A payload brought `version` of `part`, as (base, deltas), or whole (None: no delta to forward)."""
        if delta is None:
            self.latest.pop(part, None)
        else:
            self.latest[part] = (version, delta[0], dict(delta[1]))

    # -- checkpoints --

    def save(self, folder: Path, nodes: Iterable[int]) -> None:
        """Writes the residuals of `nodes`, the latest deltas and their bases' values into `folder` (a stage checkpoint;
        in simulation a receiver rebuilds a delta on the base values kept here, not on the model's newer values)."""
        nodes = set(nodes)
        tensors = {f"residual/{n}/{name}": t for (n, name), t in self.residuals.items() if n in nodes}
        meta = {}
        for part, (version, base, deltas) in self.latest.items():
            meta[part] = [version, base, {name: list(q.shape) for name, q in deltas.items()}]
            for name, q in deltas.items():
                tensors[f"codes/{part}/{name}"], tensors[f"scales/{part}/{name}"] = q.codes, q.scales
            for name, value in self.start.get(part, {}).get(base, {}).items():
                tensors[f"base/{part}/{base}/{name}"] = value
        tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        save_file(tensors, str(folder / DELTAS_FILE), metadata={"scheme": self.scheme, "latest": json.dumps(meta)})

    def load(self, folder: Path) -> None:
        """Restores what [`save`] wrote (raises `FileNotFoundError`/`ValueError` when it is missing or another
        scheme's)."""
        from safetensors import safe_open

        path = folder / DELTAS_FILE
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("scheme") != self.scheme:
            raise ValueError(f"{path} holds {meta.get('scheme')!r} deltas; this run sends {self.scheme!r}.")
        tensors = load_file(str(path))
        self.residuals, self.start = {}, {}
        for key, tensor in tensors.items():
            kind, rest = key.split("/", 1)
            if kind == "residual":
                node, name = rest.split("/", 1)
                self.residuals[(int(node), name)] = tensor
            elif kind == "base":
                part, version, name = rest.split("/", 2)
                self.start.setdefault(part, {}).setdefault(int(version), {})[name] = tensor
        self.latest = {
            part: (
                int(version),
                int(base),
                {
                    name: QuantizedTensor(tensors[f"codes/{part}/{name}"], tensors[f"scales/{part}/{name}"], tuple(s))
                    for name, s in shapes.items()
                },
            )
            for part, (version, base, shapes) in json.loads(meta["latest"]).items()
        }
