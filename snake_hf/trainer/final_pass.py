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

**Distributed runs** (p2p and cs) run the same walks after the run's final hand-over, when every process already holds
the final model: each hop carries the statistics only (a verified, counted payload sent over the run's transport; in
cs through the coordinator), so a hop's bytes are the simulation's less the model parts (which the hand-over brought).
Each node adds its statistics, computed on its own shard; on the way back a node loads the pooled batch-norm moments
before it computes its features, as the simulation's shared model has them. The walk's last node pools and repairs
exactly as in the simulation (same code, same order of summation) and hands the repairs (the pooled moments, or the
calibrated head's weights) to every process, which load them: every process ends with the same bits, equal to the
simulation's on the same kernels (tests/test_distributed_final_pass.py). Like the final hand-over, that last
broadcast is not a hop of the report. The repairs land after `Trainer.train`'s own loop has ended (an evaluation it
runs at the end of training sees the unrepaired model; one after `train()` returns sees the repaired one). A cs run
in which a node failed skips the final pass with a warning (the failed node's statistics are missing).
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
CALIBRATED_HEAD = "head/calibrated"


def check_final_pass(args: SnakeConfig, streaming: bool) -> None:
    """Refuses the final-pass options where they are not implemented, before any work: nodes that read their data
    as an iterable stream (distributed, one stream per rank), whose shard cannot be read again after training."""
    used = [name for name in ("head_calibration", "recompute_batchnorm") if getattr(args, name)]
    if used and streaming:
        raise ValueError(
            f"`{used[0]}` ({getattr(args, used[0])!r}) reads every node's shard again after training, which an "
            "iterable stream does not allow; pass each rank's data as a Dataset, or turn it off."
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
    """The final pass of a `SnakeTrainer` run after its last stage (`last_stage` on `last_node`): in simulation at
    that stage's end; distributed on every process, after the run's final hand-over."""
    base = unwrap_model(trainer.model)
    num_classes = getattr(getattr(base, "config", None), "num_labels", None) or getattr(base, "num_labels", None)
    batches = lambda node: node_batches(trainer, node)  # noqa: E731
    relay = trainer._relay
    final = FinalPass(trainer.args, trainer.model, trainer.part_map, relay, trainer.snake_report, batches,
                      num_classes)  # fmt: skip
    if not trainer.session.distributed:
        final.run(last_stage, last_node)
        return
    failed = sorted(getattr(relay, "failed", ()))
    if failed:  # cs failover: the failed nodes' statistics cannot be had
        logger.warning(f"Final pass skipped: node(s) {failed} failed in this run, and the repairs need every node's "
                       "statistics; the model is the trained one, unrepaired.")  # fmt: skip
        return
    final.run_distributed(last_stage, last_node)


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
        layout = self._layout()
        self.stats_spec = PayloadSpec(relay.spec.fingerprint, relay.spec.adapter_hash, layout)
        # distributed: the repairs the walk's last node hands to every process (pooled moments, or the head)
        repairs = {part: layout[part] for part in (POOLED_BATCHNORM,) if part in layout}
        if self.head is not None:
            head = {"weight": self.head.weight} | ({"bias": self.head.bias} if self.head.bias is not None else {})
            repairs = {
                CALIBRATED_HEAD: {f"{CALIBRATED_HEAD}.{k}": ("float32", tuple(t.shape)) for k, t in head.items()}
            }
        self.repairs_spec = PayloadSpec(relay.spec.fingerprint, relay.spec.adapter_hash, repairs)

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
            pooled = self._pool_batchnorm(gathered, order)
            # The pooled statistics rebuild these parts on every later receiver: they travel instead of the parts.
            self._rebuilt = set(self._record_change(order[-1], load_batchnorm(self.model, pooled)))
            if self.head is None:
                return
            carried = {f"{POOLED_BATCHNORM}.{k}": v for k, v in pooled.items()}
            order = order[::-1]  # back, carrying the pooled statistics; every node holds the final weights already
            gathered = self._walk(order, last_stage, carried, self._feature_contribution)
        else:
            gathered = self._walk(order, last_stage, {}, self._feature_contribution)
        self._calibrate(gathered, order[-1])

    def run_distributed(self, last_stage: int, last_node: int) -> None:
        """The final pass of a distributed run, on every process, once each holds the final model: the walks of
        [`run`] carrying the statistics only, the repairs on the walk's last node (the same code as `run`), then the
        repairs handed to every process."""
        order = walk_order(self.num_nodes, last_node)
        mine = self.relay.local_nodes
        if self.args.recompute_batchnorm:
            gathered = self._relay_walk(order, last_stage, {}, "batchnorm", self._batchnorm_contribution)
            carried = {}
            if order[-1] in mine:
                pooled = self._pool_batchnorm(gathered, order)
                self._record_change(order[-1], load_batchnorm(self.model, pooled))
                carried = {f"{POOLED_BATCHNORM}.{k}": v for k, v in pooled.items()}
            if self.head is None:
                self._hand_out(carried, order[-1])
                return
            order = order[::-1]  # back, carrying the pooled moments, which every node loads before its features
            gathered = self._relay_walk(order, last_stage, carried, "features", self._feature_contribution)
        else:
            gathered = self._relay_walk(order, last_stage, {}, "features", self._feature_contribution)
        repairs = {}
        if order[-1] in mine:
            self._calibrate(gathered, order[-1])
            head = {"weight": self.head.weight} | ({"bias": self.head.bias} if self.head.bias is not None else {})
            repairs = {f"{CALIBRATED_HEAD}.{k}": t.detach() for k, t in head.items()}
        self._hand_out(repairs, order[-1])

    def _pool_batchnorm(self, gathered: Mapping[str, torch.Tensor], order: list[int]) -> dict[str, torch.Tensor]:
        """The pooled batch-norm moments of every node's contribution, summed in walk order."""
        pooled = pool_batchnorm(
            (
                self._strip(gathered, _node_part(n, "batchnorm")),
                int(gathered[f"{_node_part(n, 'batchnorm')}.count"]),
            )
            for n in order
        )
        logger.info(f"Final pass: batch-norm statistics pooled over {self.num_nodes} nodes on node {order[-1]}.")
        return pooled

    def _calibrate(self, gathered: Mapping[str, torch.Tensor], node: int) -> None:
        """Calibrates the head on `node` from every node's class statistics (pooled in node order)."""
        stats = pool_class_stats(
            ClassFeatureStats.from_tensors(gathered, _node_part(n, "features")) for n in range(self.num_nodes)
        )
        loss = calibrate_head(
            self.head, stats, self.args.head_calibration_samples, self.args.head_calibration_steps,
            seed=self.args.seed,
        )  # fmt: skip
        self._record_change(node, [self.head.weight] + ([self.head.bias] if self.head.bias is not None else []))
        logger.info(f"Final pass: head {self.head_name} calibrated on node {node} (virtual-feature loss {loss:.4f}).")

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

    def _relay_walk(self, order, last_stage, carried, kind, contribute) -> dict[str, torch.Tensor]:
        """Distributed: this process's part of the walk over `order` (every process takes part in every hop, so the cs
        coordinator can pass it on). Returns what the walk gathered on its last node's process ({} on the others)."""
        mine = self.relay.local_nodes
        carried = dict(carried) if order[0] in mine else {}
        back = kind == "features" and self.args.recompute_batchnorm  # the pooled moments travel too
        expected = {POOLED_BATCHNORM} if back else set()
        for position, node in enumerate(order):
            if position > 0:
                hop = f"final-pass/{kind}/{order[position - 1]}-{node}"
                carried = self._pass(order[position - 1], node, last_stage, carried, sorted(expected), hop)
            if node in mine:
                carried |= contribute(node)
            expected.add(_node_part(node, kind))
        return carried

    def _pass(self, sender, receiver, last_stage, carried, expected, hop) -> dict[str, torch.Tensor]:
        """Distributed: one hop of a walk. The sender encodes what it carries and records the hop; the receiver
        verifies it (checksums, layout, the parts it expects) and, on the way back, loads the pooled moments."""
        mine = self.relay.local_nodes
        encoded = None
        if sender in mine:
            start = time.perf_counter()
            parts = sorted({_part_of(name) for name in carried})
            payload = self._stats_payload(carried, parts, sender, receiver, last_stage)
            encoded = encode_payload(payload, {name: _part_of(name) for name in carried})
            self.report.hops.append(
                HopRecord(
                    from_stage=last_stage, to_stage=last_stage + 1, sender=sender, receiver=receiver, parts=parts,
                    nbytes=encoded.nbytes, tensor_nbytes=encoded.data_nbytes, seconds=time.perf_counter() - start,
                )
            )  # fmt: skip
        encoded = self.relay.pass_on(encoded, sender, receiver, hop)
        if receiver not in mine:
            return {}
        tensors = dict(decode_payload(encoded, self.stats_spec, expected_parts=expected).tensors)
        if POOLED_BATCHNORM in expected:  # the way back: this node's features must see the pooled moments
            pooled = self._strip(tensors, POOLED_BATCHNORM)
            round_to_wire(load_batchnorm(self.model, pooled), self.args.payload_dtype)  # as the pooling node did
        return tensors

    def _hand_out(self, repairs: Mapping[str, torch.Tensor], holder: int) -> None:
        """Distributed: the walk's last node hands its repairs to every process, which verifies and loads them."""
        parts = sorted(self.repairs_spec.layout)
        encoded = None
        if holder in self.relay.local_nodes:
            payload = self._stats_payload(repairs, parts, holder, -1, -1, self.repairs_spec)
            encoded = encode_payload(payload, {name: _part_of(name) for name in repairs})
        encoded = self.relay.broadcast(encoded, holder)
        if holder in self.relay.local_nodes:
            return
        tensors = decode_payload(encoded, self.repairs_spec, expected_parts=parts).tensors
        if CALIBRATED_HEAD in parts:
            with torch.no_grad():
                self.head.weight.copy_(tensors[f"{CALIBRATED_HEAD}.weight"])
                if self.head.bias is not None:
                    self.head.bias.copy_(tensors[f"{CALIBRATED_HEAD}.bias"])
        else:
            round_to_wire(load_batchnorm(self.model, self._strip(tensors, POOLED_BATCHNORM)), self.args.payload_dtype)

    def _stats_payload(self, carried, parts, sender, receiver, last_stage, spec: PayloadSpec | None = None) -> Payload:
        spec = spec or self.stats_spec
        state = {}
        for part in spec.layout:
            tensors = [(n, t) for n, t in carried.items() if _part_of(n) == part]
            state[part] = [1, tensors_checksum(tensors)] if part in parts else [0, ""]
        manifest = {
            "sender": sender, "receiver": receiver, "stage": last_stage + 1, "scheme": spec.payload_dtype,
            "deltas": {}, "fingerprint": spec.fingerprint, "adapter_hash": spec.adapter_hash,
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
