"""The final pass: after the plan's last stage, one walk over the nodes gathers statistics for the end-of-run repairs
(`snake_hf.calibration`): pooled batch-norm statistics (`recompute_batchnorm`) and classifier calibration from
per-class feature statistics (`head_calibration`).

The walk starts at the last stage's node, which holds the final model, and visits every other node once, moving one
neighbour at a time where it can (the last node outward to one end, then the rest). On every hop the receiver gets the
final model's parts it lacks (an ordinary payload, verified and counted) and every statistic gathered so far (a
statistics payload in the same wire format: manifest, checksums, one part per contributing node, verified against a
layout every node knows from the model alone). Each node adds its own statistics, computed with the final model on its
own shard. The walk's last node pools them and repairs the model, which ends there.

With both repairs on, the batch-norm statistics must come first (the features a head is calibrated on depend on
them), so the walk goes out gathering batch-norm moments, the far end pools them, and a second walk comes back
carrying the pooled statistics (not the parts they change: every node already holds the final weights) while it
gathers the per-class features. Bytes: (N-1) model hops (what each node lacks) plus the statistics, once or twice.

Simulation only for now: in distributed mode the options are refused where the run starts (see `check_final_pass`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.utils import logging

from ..blocks import PartMap, unwrap_model
from ..calibration import (
    ClassFeatureStats,
    batchnorm_layers,
    batchnorm_moments,
    calibrate_head,
    class_feature_stats,
    find_head,
    load_batchnorm,
    pool_batchnorm,
    pool_class_stats,
)
from ..config import SnakeConfig
from ..engine.payload import Payload, PayloadSpec, build_payload, decode_payload, encode_payload, tensors_checksum
from ..engine.relay import Relay
from ..precision import round_to_wire
from ..report import HopRecord, SnakeReport
from . import _compat


logger = logging.get_logger(__name__)

__all__ = ["FinalPass", "check_final_pass", "needs_final_pass", "node_batches", "run_final_pass", "walk_order"]

POOLED_BATCHNORM = "batchnorm/pooled"


def check_final_pass(args: SnakeConfig, distributed: bool) -> None:
    """Refuses the final-pass options where they are not implemented, before any work."""
    used = [name for name in ("head_calibration", "recompute_batchnorm") if getattr(args, name)]
    if used and distributed:  # checked where the run starts
        raise ValueError(
            f"`{used[0]}` ({getattr(args, used[0])!r}) runs a final pass over the nodes that only the simulation engine "
            "implements so far; use engine='simulation', or turn it off for distributed runs."
        )


def needs_final_pass(args: SnakeConfig) -> bool:
    return bool(args.head_calibration or args.recompute_batchnorm)


def node_batches(trainer, node: int) -> Iterable[Mapping]:
    """Node `node`'s shard as the trainer's collated batches (eval batch size, in order, on its device)."""
    dataset, collator = trainer.node_data.shard(node), trainer.data_collator
    if hasattr(dataset, "column_names"):
        dataset = _compat.remove_unused_columns(trainer, dataset)
    else:
        collator = _compat.collator_with_removed_columns(trainer)
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=collator)
    return (trainer._prepare_inputs(batch) for batch in loader)


def run_final_pass(trainer, last_stage: int, last_node: int) -> None:
    """The final pass of a simulated `SnakeTrainer` run, after its last stage (`last_stage` on `last_node`)."""
    base = unwrap_model(trainer.model)
    num_classes = getattr(getattr(base, "config", None), "num_labels", None) or getattr(base, "num_labels", None)
    batches = lambda node: node_batches(trainer, node)  # noqa: E731
    final = FinalPass(trainer.args, trainer.model, trainer.part_map, trainer._relay, trainer.snake_report, batches,
                      num_classes)  # fmt: skip
    final.run(last_stage, last_node)


def walk_order(num_nodes: int, start: int) -> list[int]:
    """Every node once, from `start`: towards the nearer end first, then the rest (one jump at most).

    Example:
        ```python
        >>> walk_order(4, 0), walk_order(4, 3), walk_order(4, 1)
        ([0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3])
        ```
    """
    if start <= (num_nodes - 1) / 2:
        return list(range(start, -1, -1)) + list(range(start + 1, num_nodes))
    return list(range(start, num_nodes)) + list(range(start - 1, -1, -1))


def _node_part(node: int, kind: str) -> str:
    return f"{kind}/node{node}"


class FinalPass:
    """Runs the final pass of a simulated run.

    Args:
        args ([`SnakeConfig`]): `head_calibration`, `head_calibration_samples`, `head_calibration_steps`,
            `recompute_batchnorm`, `seed`, `payload_dtype`.
        model (`nn.Module`): the (shared) model.
        part_map (`PartMap`): its parts.
        relay ([`Relay`]): the run's relay (version ledger, run identity).
        report ([`SnakeReport`]): receives the walk's hops.
        batches (`Callable[[int], Iterable[Mapping]]`): a node's shard as batches on the model's device, in order.
        num_classes (`int`): number of classes (calibration).
    """

    def __init__(
        self,
        args: SnakeConfig,
        model: nn.Module,
        part_map: PartMap,
        relay: Relay,
        report: SnakeReport,
        batches: Callable[[int], Iterable[Mapping]],
        num_classes: int | None,
    ):
        self.args, self.model, self.part_map, self.relay, self.report = args, model, part_map, relay, report
        self.batches = batches
        self.num_nodes = relay.ledger.num_nodes
        self.part_of = {name: part for part in part_map.parts for name in part_map.tensor_names(part)}
        self.head_name, self.head = None, None
        if args.head_calibration:
            if not num_classes:
                raise ValueError(
                    "`head_calibration` needs the number of classes (the model's `config.num_labels` or `num_labels`)."
                )
            self.head_name, self.head = find_head(model, self.part_of)
        self.num_classes = num_classes
        self._rebuilt: set[str] = set()  # parts the pooled batch-norm statistics rebuild on a receiver
        self.stats_spec = PayloadSpec(relay.spec.fingerprint, relay.spec.adapter_hash, self._layout())

    def _layout(self) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
        """Every statistics part and its tensors' shapes, known from the model alone (identical on every node)."""
        layout = {}
        if self.args.recompute_batchnorm:
            moments = {}
            for name, module in batchnorm_layers(self.model).items():
                moments |= {f"{name}.mean": ("float32", tuple(module.running_mean.shape))}
                moments |= {f"{name}.var": ("float32", tuple(module.running_var.shape))}
            for node in range(self.num_nodes):
                part = _node_part(node, "batchnorm")
                layout[part] = {f"{part}.{k}": v for k, v in moments.items()} | {f"{part}.count": ("float32", (1,))}
            layout[POOLED_BATCHNORM] = {f"{POOLED_BATCHNORM}.{k}": v for k, v in moments.items()}
        if self.head is not None:
            shapes = ClassFeatureStats.shapes(self.num_classes, self.head.in_features, self.args.head_calibration)
            for node in range(self.num_nodes):
                part = _node_part(node, "features")
                layout[part] = {f"{part}.{k}": ("float32", shape) for k, shape in shapes.items()}
        return layout

    def run(self, last_stage: int, last_node: int) -> None:
        """The walk (or the two walks) from `last_node`, then the repairs; the model ends on the walk's last node."""
        order = walk_order(self.num_nodes, last_node)
        if self.args.recompute_batchnorm:
            gathered = self._walk(order, last_stage, {}, self._batchnorm_contribution)
            pooled = pool_batchnorm(
                (
                    self._strip(gathered, _node_part(n, "batchnorm")),
                    int(gathered[f"{_node_part(n, 'batchnorm')}.count"]),
                )
                for n in order
            )
            # The pooled statistics rebuild these parts on every later receiver: they travel instead of the parts.
            self._rebuilt = set(self._record_change(order[-1], load_batchnorm(self.model, pooled)))
            logger.info(f"Final pass: batch-norm statistics pooled over {self.num_nodes} nodes on node {order[-1]}.")
            if self.head is None:
                return
            carried = {f"{POOLED_BATCHNORM}.{k}": v for k, v in pooled.items()}
            order = order[::-1]  # back, carrying the pooled statistics; every node holds the final weights already
            gathered = self._walk(order, last_stage, carried, self._feature_contribution)
        else:
            gathered = self._walk(order, last_stage, {}, self._feature_contribution)
        stats = pool_class_stats(
            ClassFeatureStats.from_tensors(gathered, _node_part(n, "features")) for n in range(self.num_nodes)
        )
        loss = calibrate_head(
            self.head, stats, self.args.head_calibration_samples, self.args.head_calibration_steps,
            seed=self.args.seed,
        )  # fmt: skip
        self._record_change(order[-1], [self.head.weight] + ([self.head.bias] if self.head.bias is not None else []))
        logger.info(
            f"Final pass: head {self.head_name} calibrated on node {order[-1]} (virtual-feature loss {loss:.4f})."
        )

    @staticmethod
    def _strip(tensors: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
        return {k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".") and k != f"{part}.count"}

    def _batchnorm_contribution(self, node: int) -> dict[str, torch.Tensor]:
        moments, count = batchnorm_moments(self.model, self.batches(node))
        part = _node_part(node, "batchnorm")
        return {f"{part}.{k}": v for k, v in moments.items()} | {f"{part}.count": torch.tensor([float(count)])}

    def _feature_contribution(self, node: int) -> dict[str, torch.Tensor]:
        stats = class_feature_stats(
            self.model, self.head, self.batches(node), self.num_classes, self.args.head_calibration
        )
        return stats.to_tensors(_node_part(node, "features"))

    def _walk(self, order, last_stage, carried, contribute) -> dict:
        """Visits `order`: hop in (model parts lacking + statistics so far), then the node's own contribution."""
        carried = dict(carried)
        for previous, node in zip([None, *order], order):
            if previous is not None:
                self._hop(previous, node, last_stage, carried)
            carried |= contribute(node)
        return carried

    def _hop(self, sender: int, receiver: int, last_stage: int, carried: Mapping[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        ledger = self.relay.ledger
        lacking = ledger.lacking(receiver, sender)
        state = ledger.state(sender)
        sent = [part for part in lacking if part not in self._rebuilt]
        nbytes = tensor_nbytes = 0
        if sent:
            model_payload = build_payload(
                self.model, self.part_map, sent, state, self.relay.spec, sender, receiver, last_stage + 1
            )
            model_wire = encode_payload(model_payload, self.part_of)
            decode_payload(model_wire, self.relay.spec, expected_parts=sent)  # verified as on any hop
            nbytes, tensor_nbytes = model_wire.nbytes, model_wire.data_nbytes
        ledger.record_receipt(receiver, state, lacking)  # the rebuilt parts: from the pooled statistics it carries
        parts = sorted({_part_of(name) for name in carried})
        payload = self._stats_payload(carried, parts, sender, receiver, last_stage)
        stats_wire = encode_payload(payload, {name: _part_of(name) for name in carried})
        decoded = decode_payload(stats_wire, self.stats_spec, expected_parts=parts)
        if set(decoded.tensors) != set(carried):
            raise RuntimeError(f"The final pass's statistics from node {sender} to node {receiver} lost tensors.")
        self.report.hops.append(
            HopRecord(
                from_stage=last_stage, to_stage=last_stage + 1, sender=sender, receiver=receiver,
                parts=sorted(sent) + parts, nbytes=nbytes + stats_wire.nbytes,
                tensor_nbytes=tensor_nbytes + stats_wire.data_nbytes, seconds=time.perf_counter() - start,
            )
        )  # fmt: skip

    def _stats_payload(self, carried, parts, sender, receiver, last_stage) -> Payload:
        state = {}
        for part in self.stats_spec.layout:
            tensors = [(n, t) for n, t in carried.items() if _part_of(n) == part]
            state[part] = [1, tensors_checksum(tensors)] if part in parts else [0, ""]
        manifest = {
            "sender": sender, "receiver": receiver, "stage": last_stage + 1, "scheme": self.stats_spec.payload_dtype,
            "deltas": {}, "fingerprint": self.stats_spec.fingerprint, "adapter_hash": self.stats_spec.adapter_hash,
            "state": state, "parts": parts, "tensors": [],
        }  # fmt: skip
        return Payload(manifest=manifest, tensors={n: t.float().contiguous() for n, t in carried.items()})

    def _record_change(self, node: int, tensors: list[torch.Tensor]) -> list[str]:
        """`node` changed these tensors: they take their wire values, and their parts become new versions there."""
        round_to_wire(tensors, self.args.payload_dtype)
        ids = {id(t) for t in tensors}
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        parts = sorted({self.part_of[n] for n, t in named.items() if id(t) in ids and n in self.part_of})
        self.relay.ledger.record_training(node, {part: self.relay.checksum(part) for part in parts})
        return parts


def _part_of(name: str) -> str:
    """`"features/node0.means"` -> `"features/node0"`."""
    return name.split(".", 1)[0]
