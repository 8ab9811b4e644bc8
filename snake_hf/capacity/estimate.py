"""A training-memory estimate per block group, measured on the real model (DESIGN §6).

Tiny probe steps of the real model record, block by block, the bytes autograd saves (`saved_tensors_hooks`), and the
peak of all live tensors (a dispatch mode that follows every storage until it is freed): once with every block
training and once with every block only passing the gradient through. Probes at (batch, seq) = (1, s0), (2, s0),
(1, 2·s0) fit per block bytes = c + batch·(k + a·seq + q·seq²): `q` catches attention that stores seq×seq scores; a
model whose probe ignores the length (a CNN, where one example is the unit) gets a cost per example. Any group's
estimate is then a sum, so a planner can try every cut.

Assumptions: activations grow linearly with the batch and at most quadratically with the length; the first block of
a group is costed as if its input required grad (a small over-estimate); the activation peak, all gradients and the
optimizer state are added although the optimizer step runs after most activations are freed (errs high).

(About 420 lines: the probe, the fit and the estimate share their bookkeeping; split, each would need the others.)
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode  # private module, public class; checked on torch 2.13
from transformers.utils import logging

from ..blocks import SHARED, BlockGroups, PartMap, find_block_list, set_trainable, unwrap_model


logger = logging.get_logger(__name__)

__all__ = [
    "BlockCosts",
    "MemoryEstimate",
    "default_probe_inputs",
    "estimate_group_memory",
    "format_size",
    "measure_block_costs",
    "parse_size",
]

_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
Fit = tuple[float, float, float, float]  # (c, k, a, q): bytes = c + batch * (k + a * seq + q * seq**2)
ProbeInputs = Callable[[int, int | None], dict]


def parse_size(value: int | float | str) -> int:
    """Bytes from a number or a human size: `"2GiB"`, `"512MiB"`, `"512MB"`, `"1.5 gb"` (`KB` = 1000, `KiB` = 1024).

    Example:
        ```python
        >>> parse_size("2GiB"), parse_size("512MB"), parse_size(1024)
        (2147483648, 512000000, 1024)
        ```
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
    if match is None:
        raise ValueError(f"Memory size {value!r} is not a number of bytes or a size like '2GiB' or '512MB'.")
    number, unit, binary = match.groups()
    power = "_kmgt".index(unit) if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def format_size(num_bytes: float | None) -> str:
    """`1.3 GiB`, `512 MiB`, or `unlimited` for `None`."""
    if num_bytes is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if abs(num_bytes) >= 100 or unit == "B" else f"{num_bytes:.3g} {unit}"
        num_bytes /= 1024


@dataclass
class MemoryEstimate:
    """Training memory of one group on one node, in bytes.

    `frozen_weights + trainable` is the whole model as loaded; `activations` is what autograd keeps for the blocks
    from the group up plus the head and loss; `workspace` the transient peak above them (e.g. logit gradients);
    `gradients` and `optimizer_state` belong to the trainable tensors; `overhead` is the allocator's share (see
    `BlockCosts.allocator_overhead`); `total` is the sum.
    """

    frozen_weights: int
    trainable: int
    activations: int
    workspace: int
    gradients: int
    optimizer_state: int
    overhead: int = 0
    total: int = field(init=False)

    def __post_init__(self):
        self.total = sum(getattr(self, f.name) for f in fields(self) if f.name != "total")

    def summary(self) -> str:
        return ", ".join(f"{f.name} {format_size(getattr(self, f.name))}" for f in fields(self) if f.name != "total")


def _eval_fit(fit: Fit, batch_size: int, seq_len: int | None) -> int:
    c, k, a, q = fit
    if seq_len is None and (a or q):
        raise ValueError("This model's activations grow with the sequence length; pass `seq_len`.")
    seq = seq_len or 0
    return math.ceil(c + batch_size * (k + a * seq + q * seq * seq))


@dataclass
class BlockCosts:
    """A model's measured costs, per block; the estimate for any group `[start, end)` follows from them.

    Args:
        model_bytes (`int`): all parameters and buffers as loaded.
        block_trainable (`list[int]`): bytes of the tensors that train with each block.
        shared_trainable (`int`): bytes of the always-trainable tensors (the `"shared"` part).
        active (`list[Fit]`), above (`list[Fit]`): saved activations of each block when it trains, and when it sits
            above the training group (the gradient only passes through).
        outside (`Fit`): saved activations outside the blocks (head, loss).
        workspace (`Fit`): transient peak beyond the saved activations.
        allocator_overhead (`float`, defaults to 0.25): fraction added to what a step allocates (activations,
            workspace, gradients, optimizer state). The other terms are exact tensor bytes; process peaks exceed
            them: with glibc on CPU by 9-94% on small models (freed 1-4 MiB tensors stay in the heap), by about 0
            with `MALLOC_MMAP_THRESHOLD_` fixed; CUDA's caching allocator commonly adds 5-30%.
    """

    model_bytes: int
    block_trainable: list[int]
    shared_trainable: int
    active: list[Fit]
    above: list[Fit]
    outside: Fit
    workspace: Fit
    allocator_overhead: float = 0.25

    @property
    def num_blocks(self) -> int:
        return len(self.active)

    def estimate(
        self, start: int, end: int, batch_size: int, seq_len: int | None, optimizer: str = "adamw"
    ) -> MemoryEstimate:
        """Estimate for training blocks `[start, end)` on micro-batches of `batch_size` × `seq_len` with `optimizer`
        (`"adamw"`/`"adam"`: 2 states per trainable element, `"sgd_momentum"`: 1, `"sgd"`: 0)."""
        if optimizer not in _OPTIMIZER_STATES:
            raise ValueError(f"`optimizer` ({optimizer!r}) must be one of {list(_OPTIMIZER_STATES)}.")
        if not 0 <= start < end <= self.num_blocks:
            raise ValueError(f"Blocks [{start}, {end}) are not a group of the model's {self.num_blocks} blocks.")
        trainable = sum(self.block_trainable[start:end]) + self.shared_trainable
        kept = [*self.active[start:end], *self.above[end:], self.outside]
        saved = sum(_eval_fit(fit, batch_size, seq_len) for fit in kept)
        workspace = _eval_fit(self.workspace, batch_size, seq_len)
        states = _OPTIMIZER_STATES[optimizer] * trainable
        return MemoryEstimate(
            frozen_weights=self.model_bytes - trainable,
            trainable=trainable,
            activations=saved,
            workspace=workspace,
            gradients=trainable,
            optimizer_state=states,
            overhead=int(self.allocator_overhead * (saved + workspace + trainable + states)),
        )


class _LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed; `peak` is the most bytes alive at once."""

    def __init__(self, exclude: set[int], size: Callable[[torch.Tensor], int]):
        super().__init__()
        self.exclude, self.size = exclude, size
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0  # frees are subtracted only when swept: in between, an upper bound

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = {}
        for tensor in (out,) if isinstance(out, torch.Tensor) else pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage().data_ptr()
                if key and key not in self.exclude:
                    new[key] = tensor
        if new and self.current + sum(self.size(t) for t in new.values()) > self.peak:
            for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]  # only a possible new peak needs the exact count
        for key, tensor in new.items():
            old = self.live.get(key)
            if old is None or old[0].expired():  # a freed storage's address may be reused
                nbytes = self.size(tensor)
                self.current += nbytes - (old[1] if old else 0)
                self.live[key] = (StorageWeakRef(tensor.untyped_storage()), nbytes)
        self.peak = max(self.peak, self.current)  # the op's inputs are still alive here: its own peak
        return out


def _tensor_bytes(tensor: torch.Tensor, dtype_bytes: int | None) -> int:
    return tensor.numel() * (dtype_bytes if dtype_bytes and tensor.is_floating_point() else tensor.element_size())


def _storage_bytes(dtype_bytes: int | None) -> Callable[[torch.Tensor], int]:
    """Bytes of a tensor's whole storage (a view keeps all of it alive), in the dtype the node will run."""

    def size(tensor: torch.Tensor) -> int:
        nbytes = tensor.untyped_storage().nbytes()
        return nbytes * dtype_bytes // tensor.element_size() if dtype_bytes and tensor.is_floating_point() else nbytes

    return size


def _loss_of(outputs) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
    if loss is None:  # no labels: a sum stands in for the loss (it saves nothing)
        first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        loss = first.float().sum()
    return loss


def _input_requires_grad(module, args, kwargs):
    """Block 0's input requires grad in every probe, as any block's input above the group's first does."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}
    return args, kwargs


def _probe(model, blocks, inputs: dict, exclude: set[int], size, backward: bool) -> tuple[list[int], int]:
    """One forward (and backward): saved bytes per block (the last entry: outside the blocks) and the live peak."""
    saved, seen, current = [0] * (len(blocks) + 1), set(), [len(blocks)]

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key and key not in exclude and key not in seen:
            seen.add(key)
            saved[current[0]] += size(tensor)
        return tensor

    handles = [blocks[0].register_forward_pre_hook(_input_requires_grad, with_kwargs=True)]
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, len(blocks))))
    # Gradients are dropped as they land: parameters, gradients and states are counted exactly, apart.
    trained = [p for p in model.parameters() if p.requires_grad]
    handles += [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trained]
    tracker = _LiveBytes(exclude, size)
    try:
        with tracker if backward else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = _loss_of(model(**inputs))
            if backward:
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return saved, tracker.peak


def _fit(p11: float, p21: float, p12: float, s0: int) -> Fit:
    """(c, k, a, q) from probes at (batch, seq) = (1, s0), (2, s0) and (1, 2·s0)."""
    per_example, longer = p21 - p11, p12 - p11
    constant = max(0.0, p11 - per_example)  # e.g. batch-norm statistics, the same at any batch size
    if abs(longer) <= 0.01 * max(per_example, 1):  # no sequence dimension: a cost per example
        return (constant, max(per_example, 0.0), 0.0, 0.0)
    q = max(0.0, (longer - per_example) / (2 * s0 * s0))
    return (constant, 0.0, max(0.0, (per_example - q * s0 * s0) / s0), q)


def default_probe_inputs(model: nn.Module) -> ProbeInputs:
    """Random token batches for a Hugging Face text model, with labels shaped for its task (LM, classification)."""
    base = unwrap_model(model)
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError(
            f"Cannot build probe inputs for {type(base).__name__} (no config.vocab_size); pass `probe_inputs`, a "
            "function (batch_size, seq_len) -> model inputs with labels (for a CNN: images; it ignores seq_len)."
        )
    kind, device = type(base).__name__, next(model.parameters()).device

    def make(batch_size: int, seq_len: int | None) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch_size, seq_len or 1), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "SequenceClassification" in kind:
            inputs["labels"] = torch.zeros(batch_size, dtype=torch.long)
        elif "TokenClassification" in kind:
            inputs["labels"] = torch.zeros_like(ids)
        elif any(tag in kind for tag in ("CausalLM", "LMHead", "MaskedLM", "ConditionalGeneration")):
            inputs["labels"] = ids.clone()
        return {key: value.to(device) for key, value in inputs.items()}

    return make


def _per_block_trainable(model: nn.Module, part_map: PartMap, sizes: dict[str, int]) -> tuple[list[int], int]:
    pattern = re.compile(rf"(?:^|\.){re.escape(part_map.groups.path)}\.(\d+)\.")
    per_block = [0] * part_map.groups.num_blocks
    bounds = part_map.groups.boundaries
    for part, names in part_map.params.items():
        if part == SHARED:
            continue
        group = int(part.removeprefix("g"))
        for name in names:  # a tensor outside the blocks counts with its group's first (group 0) or last block
            match = pattern.search(name)
            block = int(match.group(1)) if match else (0 if group == 0 else bounds[group + 1] - 1)
            per_block[block] += sizes[name]
    return per_block, sum(sizes[name] for name in part_map.params.get(SHARED, []))


@contextlib.contextmanager
def _restored(model: nn.Module):
    """Puts back trainability, train/eval mode, buffers (batch-norm statistics move) and the random streams."""
    training, trainable = model.training, {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = [(b, b.clone()) for b in model.buffers()]
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        set_trainable(model, trainable)
        model.train(training)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def measure_block_costs(
    model: nn.Module,
    mode: str = "lora",
    part_map: PartMap | None = None,
    block_list_path: str | None = None,
    always_trainable: Sequence[str] = (),
    probe_inputs: ProbeInputs | None = None,
    probe_seq_len: int = 16,
    dtype_bytes: int | None = None,
) -> BlockCosts:
    """Measures a model's per-block costs with six tiny probe steps (see the module docstring). Call it before
    training: the model's trainability, mode, buffers and the random streams are restored afterwards.

    Args:
        model (`nn.Module`): the model as it trains (a `PeftModel` in LoRA mode).
        mode (`str`, defaults to `"lora"`): `"lora"` or `"full"`, as in `PartMap.build`.
        part_map (`PartMap`, *optional*): the run's part map (else built from `mode` and `always_trainable`).
        block_list_path (`str`, *optional*): dotted path of the block list (e.g. `"features"` for a CNN).
        always_trainable (`Sequence[str]`, defaults to `()`): modules outside the blocks that always train.
        probe_inputs (`Callable`, *optional*): `(batch_size, seq_len) -> inputs` with labels; defaults to random
            tokens for Hugging Face text models ([`default_probe_inputs`]).
        probe_seq_len (`int`, defaults to 16): the probes' length s0 (they also run at 2·s0).
        dtype_bytes (`int`, *optional*): bytes per element of the floating weights, buffers and activations on the
            node (2 to plan a bf16 load of an fp32 model; in full mode the trained weights, gradients and AdamW
            states follow); `None` = as the model is. LoRA adapters keep their dtype (PEFT keeps them in fp32).

    Example:
        ```python
        >>> costs = measure_block_costs(peft_model)
        >>> costs.estimate(start=4, end=6, batch_size=8, seq_len=128).total
        ```
    """
    if part_map is None:
        groups = BlockGroups.from_model(model, num_groups=1, block_list_path=block_list_path)
        part_map = PartMap.build(model, groups, mode, always_trainable)
    blocks = find_block_list(model, part_map.groups.path)[1]
    size = _storage_bytes(dtype_bytes)
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    make = probe_inputs or default_probe_inputs(model)
    everything = {name for names in part_map.params.values() for name in names}
    shapes = [(1, probe_seq_len), (2, probe_seq_len), (1, 2 * probe_seq_len)]
    with _restored(model):
        model.train()
        set_trainable(model, everything)  # the transient peak is taken with every block training
        active = [_probe(model, blocks, make(b, s), exclude, size, backward=True) for b, s in shapes]
        set_trainable(model, set(part_map.params.get(SHARED, [])))
        above = [_probe(model, blocks, make(b, s), exclude, size, backward=False) for b, s in shapes]
    # With dtype_bytes, every floating tensor is counted in that dtype except LoRA adapters (PEFT keeps them fp32).
    kept = everything if mode == "lora" else set()
    sizes = {name: _tensor_bytes(p, None if name in kept else dtype_bytes) for name, p in model.named_parameters()}
    per_block, shared = _per_block_trainable(model, part_map, sizes)
    model_bytes = sum(sizes.values()) + sum(_tensor_bytes(b, dtype_bytes) for b in model.buffers())

    def fits(results) -> list[Fit]:
        return [_fit(*column, probe_seq_len) for column in zip(*(saved for saved, _ in results))]

    costs = BlockCosts(
        model_bytes=model_bytes,
        block_trainable=per_block,
        shared_trainable=shared,
        active=fits(active)[:-1],
        above=fits(above)[:-1],
        outside=fits(active)[-1],
        workspace=_fit(*(peak - sum(saved) for saved, peak in active), probe_seq_len),
    )
    logger.info(f"Measured block costs of {type(unwrap_model(model)).__name__}: {costs}")
    return costs


def estimate_group_memory(
    model: nn.Module,
    groups: BlockGroups,
    group: int,
    batch_size: int,
    seq_len: int | None,
    mode: str = "lora",
    part_map: PartMap | None = None,
    optimizer: str = "adamw",
    dtype_bytes: int | None = None,
    probe_inputs: ProbeInputs | None = None,
) -> MemoryEstimate:
    """Estimates the memory of training `group` on one node: [`measure_block_costs`], then [`BlockCosts.estimate`].

    Args:
        model (`nn.Module`), mode (`str`), part_map (`PartMap`), dtype_bytes (`int`), probe_inputs (`Callable`): as
            in [`measure_block_costs`].
        groups (`BlockGroups`): the cut; group (`int`): the group that trains.
        batch_size (`int`), seq_len (`int`, *optional*): one micro-batch; `seq_len=None` for models without a
            sequence (one example is the unit).
        optimizer (`str`, defaults to `"adamw"`): as in [`BlockCosts.estimate`].

    Example:
        ```python
        >>> groups = BlockGroups.from_model(model, num_groups=3)
        >>> print(estimate_group_memory(model, groups, group=2, batch_size=8, seq_len=128).summary())
        ```
    """
    costs = measure_block_costs(model, mode, part_map, groups.path, probe_inputs=probe_inputs, dtype_bytes=dtype_bytes)
    return costs.estimate(groups.boundaries[group], groups.boundaries[group + 1], batch_size, seq_len, optimizer)
