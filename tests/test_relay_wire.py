"""`Relay` with `payload_dtype`: the distributed hand-over (one relay per process, its own model) leaves every process
holding exactly what the simulation holds, parts no stage trains included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_bert
from snake_hf.blocks import BlockGroups, PartMap
from snake_hf.engine.payload import PayloadSpec, model_fingerprint
from snake_hf.engine.relay import Relay
from snake_hf.engine.transport import InMemoryTransport
from snake_hf.plan import Stage
from snake_hf.report import SnakeReport


# Both stages train group 0 (node 0, then node 1): group 1 never trains, yet the final hand-over carries every part.
PLAN = [Stage(index=0, pass_index=0, node=0, group=0, steps=1), Stage(index=1, pass_index=0, node=1, group=0, steps=1)]


class _SharedFinal(InMemoryTransport):
    """One in-memory wire for relays of several "processes" run one after another; keeps the final payload."""

    final = None

    def broadcast_final(self, encoded, src):
        if encoded is not None:
            self.final = encoded
        return self.final


def _model(train_mode):
    model = tiny_bert(seed=0)
    if train_mode == "lora":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    part_map = PartMap.build(model, BlockGroups.from_model(model, num_groups=2), train_mode)
    return model, part_map


def _relay(model, part_map, transport, local_nodes, payload_dtype):
    adapter = model.peft_config["default"].to_dict() if hasattr(model, "peft_config") else None
    spec = PayloadSpec.from_model(model, part_map, model_fingerprint(model), adapter, payload_dtype)
    report = SnakeReport(num_nodes=2, num_groups=2)
    return Relay(model, part_map, spec, PLAN, 2, 0, transport, report, local_nodes)


def _train(relay, stage):
    """A stand-in for the stage's optimizer steps: every trainable tensor moves by float32 noise."""
    named = dict(relay.model.named_parameters())
    generator = torch.Generator().manual_seed(stage.index)
    with torch.no_grad():
        for part in relay._trained_parts(stage):
            for name in relay.part_map.tensor_names(part):
                named[name].add_(torch.randn(named[name].shape, generator=generator) * 1e-3)


def _run(relays):
    """Runs the plan: each stage on the relay that holds its node, then `finish` (the last stage's node first)."""
    for stage in PLAN:
        relay = next(r for r in relays if stage.node in r.local_nodes)
        relay.enter(stage)
        _train(relay, stage)
        relay.close_stage(stage)
        relay.hand_on(stage)
    for relay in sorted(relays, key=lambda r: PLAN[-1].node not in r.local_nodes):
        relay.finish()


@pytest.mark.parametrize("payload_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_every_process_ends_with_the_simulations_tensors_including_never_trained_parts(train_mode, payload_dtype):
    simulated, part_map = _model(train_mode)
    _run([_relay(simulated, part_map, InMemoryTransport(), None, payload_dtype)])
    wire = _SharedFinal()
    ranks = [_model(train_mode)[0] for _ in range(2)]
    _run([_relay(model, part_map, wire, {rank}, payload_dtype) for rank, model in enumerate(ranks)])
    expected = simulated.state_dict()
    for rank, model in enumerate(ranks):
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), f"rank {rank}: {name}"


def test_float32_payloads_leave_the_untrained_tensors_as_loaded():
    model, part_map = _model("lora")
    before = copy.deepcopy(model.state_dict())
    _relay(model, part_map, InMemoryTransport(), None, "float32")
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
