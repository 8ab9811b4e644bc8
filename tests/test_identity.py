"""Canonical identities: the same hash in every process, whatever its PYTHONHASHSEED; unknown types refused by name."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath

import pytest
import torch
from peft import LoraConfig

from snake_hf.engine.payload import config_hash
from snake_hf.identity import canonical, canonical_json


class Color(str, enum.Enum):
    RED = "red"


@dataclass
class Point:
    x: int
    tags: set


CANONICAL = [
    ("set-sorted", {"b", "a", "c"}, ["a", "b", "c"]),
    ("frozenset-sorted", frozenset({3, 1, 2}), [1, 2, 3]),
    ("tuple-list", (1, "x"), [1, "x"]),
    ("str-enum-value", Color.RED, "red"),
    ("path-posix", PurePosixPath("/a/b"), "/a/b"),
    ("dataclass-fields", Point(1, {"z", "y"}), {"x": 1, "tags": ["y", "z"]}),
    ("int-keys-str", {1: "a"}, {"1": "a"}),
    ("enum-keys-value", {Color.RED: 1}, {"red": 1}),
    ("nested-sets", {"m": [{"v", "q"}]}, {"m": [["q", "v"]]}),
    ("dtype-name", torch.float32, "torch.float32"),
    ("bool-stays-bool", True, True),
    ("none", None, None),
]


@pytest.mark.parametrize("value,expected", [c[1:] for c in CANONICAL], ids=[c[0] for c in CANONICAL])
def test_canonical_form_follows_its_rules(value, expected):
    assert canonical(value) == expected


def test_canonical_json_sorts_keys_and_is_compact():
    assert canonical_json({"b": 1, "a": {"y", "x"}}) == '{"a":["x","y"],"b":1}'


@pytest.mark.parametrize(
    "value,error,words",
    [
        ({"cfg": object()}, TypeError, ["`value['cfg']`", "builtins.object", "plain data"]),
        ({"lr": float("nan")}, ValueError, ["`value['lr']`", "nan", "finite"]),
        ({(1, 2): "x"}, TypeError, ["(1, 2)", "keys must be str or int"]),
    ],
    ids=["unknown-type", "nan", "tuple-key"],
)
def test_canonical_refuses_what_it_has_no_rule_for_naming_type_and_place(value, error, words):
    with pytest.raises(error) as raised:
        canonical(value)
    for word in words:
        assert word in str(raised.value), f"{word!r} missing from: {raised.value}"


def test_adapter_config_hash_ignores_where_the_base_was_loaded_from():
    layout = {"g0": {"w": ("float32", (2, 2))}}
    a = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]).to_dict() | {"base_model_name_or_path": "/host-a/m"}
    b = LoraConfig(r=4, target_modules=["v_proj", "q_proj"]).to_dict() | {"base_model_name_or_path": "/host-b/m"}
    assert config_hash(a, layout) == config_hash(b, layout)
    c = LoraConfig(r=8, target_modules=["q_proj", "v_proj"]).to_dict()
    assert config_hash(a, layout) != config_hash(c, layout)


_HASH_IN_A_NEW_PROCESS = """
import json
from peft import LoraConfig
from snake_hf.identity import canonical_hash
from snake_hf.engine.payload import config_hash
config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True).to_dict()
raw = json.dumps(config, sort_keys=True, default=str)  # what the old adapter hash was made of
print(json.dumps({"hash": config_hash(config, {"g0": {"w": ("float32", (2,))}}), "raw": raw,
                  "set": canonical_hash({"s": {"alpha", "beta", "gamma", "delta"}})}))
"""


def test_adapter_config_hash_is_the_same_under_every_pythonhashseed():
    results = []
    for seed in range(4):
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        done = subprocess.run(
            [sys.executable, "-c", _HASH_IN_A_NEW_PROCESS], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    # The test can fail: the plain serialisation of the same config differs between these processes (set order)...
    assert len({r["raw"] for r in results}) > 1
    # ...while the canonical identities agree.
    assert len({r["hash"] for r in results}) == 1
    assert len({r["set"] for r in results}) == 1
