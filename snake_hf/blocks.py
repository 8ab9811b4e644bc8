"""Find a model's repeated blocks, cut them into contiguous groups, and decide which tensors belong to which group.

The unit that trains and travels is a *part*: `"g0"`, `"g1"`, ... for the block groups, and `"shared"` for the
always-trainable modules outside the blocks (e.g. a newly initialised classifier head, PEFT's `modules_to_save`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "SHARED",
    "BlockGroups",
    "PartMap",
    "find_block_list",
    "frozen_batchnorms",
    "group_boundaries",
    "part_name",
    "part_nbytes",
    "set_trainable",
    "unwrap_model",
]

SHARED = "shared"

# Where the block list lives in common architectures. Discovery below is generic; this list only breaks ties and
# documents what is covered (GPT-2, Falcon, BLOOM: transformer.h; Llama, Mistral, Qwen2, Phi, Gemma: model.layers;
# OPT: model.decoder.layers; GPT-NeoX: gpt_neox.layers; BERT/RoBERTa: encoder.layer; DistilBERT: transformer.layer).
_KNOWN_SUFFIXES = ("transformer.h", "model.layers", "decoder.layers", "gpt_neox.layers", "encoder.layer", "layers")


def part_name(group: int) -> str:
    """The part key of block group `group` (`"g3"`)."""
    return f"g{group}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns the user's model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _resolve(module: nn.Module, path: str) -> nn.Module:
    current = module
    for attr in path.split("."):
        if not hasattr(current, attr):
            raise ValueError(
                f"`block_list_path` ({path!r}) does not exist in {type(module).__name__}: no attribute {attr!r} "
                f"under {type(current).__name__}. Give the dotted path of the block list, e.g. 'features'."
            )
        current = getattr(current, attr)
    return current


def find_block_list(model: nn.Module, block_list_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Finds the list of repeated blocks of `model`.

    Without `block_list_path`, takes the largest `nn.ModuleList` whose entries all have the same type (the
    transformer layers of any Hugging Face model). With it, takes the `nn.ModuleList` or `nn.Sequential` at that
    dotted path (relative to the model inside any PEFT wrapper), e.g. a CNN's stages.

    Args:
        model (`nn.Module`): a model, possibly wrapped by PEFT.
        block_list_path (`str`, *optional*): dotted path to the block list.

    Returns:
        `tuple[str, nn.ModuleList]`: the path (relative to the unwrapped model) and the block list.

    Example:
        ```python
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> path, blocks = find_block_list(GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2)))
        >>> path, len(blocks)
        ('transformer.h', 4)
        ```
    """
    base = unwrap_model(model)
    if block_list_path is not None:
        blocks = _resolve(base, block_list_path)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(
                f"`block_list_path` ({block_list_path!r}) points to a {type(blocks).__name__}; it must point to a "
                "non-empty nn.ModuleList or nn.Sequential of blocks."
            )
        return block_list_path, blocks

    candidates = []
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            known = any(name == s or name.endswith("." + s) for s in _KNOWN_SUFFIXES)
            candidates.append((size, known, name, module))
    if not candidates:
        raise ValueError(
            f"Could not find a list of repeated blocks in {type(base).__name__} (no nn.ModuleList of same-type "
            "modules). Pass `block_list_path` with the dotted path of the block list, e.g. 'features' for a CNN "
            "whose stages sit in an nn.Sequential named features."
        )
    size, _, name, module = max(candidates, key=lambda c: (c[0], c[1]))
    return name, module


def group_boundaries(num_blocks: int, num_groups: int) -> list[int]:
    """Cuts `num_blocks` blocks into `num_groups` contiguous groups whose sizes differ by at most one.

    Lower groups get the extra blocks. Returns the boundaries `[0, b1, ..., num_blocks]`; group g is
    `[boundaries[g], boundaries[g + 1])`.

    Example:
        ```python
        >>> group_boundaries(10, 3)
        [0, 4, 7, 10]
        ```
    """
    if num_groups > num_blocks:
        raise ValueError(
            f"`num_block_groups` ({num_groups}) exceeds the model's {num_blocks} blocks; lower it or pass "
            "`group_boundaries`."
        )
    base, extra = divmod(num_blocks, num_groups)
    bounds = [0]
    for g in range(num_groups):
        bounds.append(bounds[-1] + base + (1 if g < extra else 0))
    return bounds


@dataclass
class BlockGroups:
    """A model's block list cut into contiguous groups.

    Args:
        path (`str`, *optional*): dotted path of the block list in the unwrapped model; `None` for a model without one
            ([`BlockGroups.whole_model`]: one group holding every trainable tensor).
        num_blocks (`int`): number of blocks.
        boundaries (`list[int]`): `[0, ..., num_blocks]`, strictly increasing.
    """

    path: str | None
    num_blocks: int
    boundaries: list[int]

    @classmethod
    def whole_model(cls) -> BlockGroups:
        """One group that is the whole model, for a model with no list of repeated blocks (a plain MLP, a model
        `find_block_list` cannot read): it trains as `Trainer` would, in every stage."""
        return cls(path=None, num_blocks=1, boundaries=[0, 1])

    @property
    def is_whole_model(self) -> bool:
        return self.path is None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        num_groups: int | None = None,
        boundaries: Sequence[int] | None = None,
        block_list_path: str | None = None,
    ) -> BlockGroups:
        path, blocks = find_block_list(model, block_list_path)
        num_blocks = len(blocks)
        if boundaries is not None:
            bounds = [int(b) for b in boundaries]
            if bounds[0] != 0 or bounds[-1] != num_blocks or any(a >= b for a, b in zip(bounds, bounds[1:])):
                raise ValueError(
                    f"`group_boundaries` ({bounds}) must start at 0, end at the model's {num_blocks} blocks and "
                    f"strictly increase, e.g. {group_boundaries(num_blocks, min(2, num_blocks))}."
                )
        else:
            bounds = group_boundaries(num_blocks, num_groups or 1)
        return cls(path=path, num_blocks=num_blocks, boundaries=bounds)

    @property
    def num_groups(self) -> int:
        return len(self.boundaries) - 1

    def blocks_of(self, group: int) -> range:
        return range(self.boundaries[group], self.boundaries[group + 1])

    def group_of_block(self, block: int) -> int:
        for g in range(self.num_groups):
            if block < self.boundaries[g + 1]:
                return g
        raise IndexError(block)


@dataclass
class PartMap:
    """Which tensor (by `state_dict` name of the trained model) belongs to which part.

    Built once per run. `params[part]` are the trainable parameter names of the part; `buffers[part]` are buffers
    that travel with it in full mode (batch-norm running statistics belong to their group).
    """

    groups: BlockGroups
    params: dict[str, list[str]] = field(default_factory=dict)
    buffers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return [part_name(g) for g in range(self.groups.num_groups)] + ([SHARED] if self.params.get(SHARED) else [])

    def tensor_names(self, part: str) -> list[str]:
        return self.params.get(part, []) + self.buffers.get(part, [])

    @classmethod
    def build(
        cls,
        model: nn.Module,
        groups: BlockGroups,
        mode: str,
        always_trainable: Iterable[str] = (),
    ) -> PartMap:
        """Assigns every trainable tensor of `model` to a part.

        Args:
            model (`nn.Module`): the model that trains (a `PeftModel` in LoRA mode).
            groups (`BlockGroups`): the cut.
            mode (`str`): `"lora"` or `"full"`. In both, parts hold the parameters that require grad now (PEFT marks
                its adapters and `modules_to_save` so; in full mode the user's own `requires_grad` is kept: a frozen
                tensor stays frozen). PEFT's `modules_to_save` and adapter tensors outside the blocks go to the
                `"shared"` part, which trains in every stage. In full mode, weights outside the blocks join the first
                group when their module comes before the blocks (embeddings) and the last group when it comes after
                (final norm, head), so a stage's backward never runs below its group and no large tensor travels on
                every hop; the buffers of a group's blocks (batch-norm statistics) travel with it.
            always_trainable (`Iterable[str]`): names (or dotted suffixes) of modules outside the blocks that train
                in every stage, added to the `"shared"` part even if they do not require grad now.
        """
        block_re = _block_name_pattern(model, groups.path) if not groups.is_whole_model else None
        patterns = [re.compile(rf"(^|\.){re.escape(n)}(\.|$)") for n in always_trainable]
        part_map = cls(groups=groups)
        for g in range(groups.num_groups):
            part_map.params[part_name(g)] = []
            part_map.buffers[part_name(g)] = []
        part_map.params[SHARED] = []
        part_map.buffers[SHARED] = []
        outside, shared = [], []
        side = _side_of_blocks(model, groups.path) if block_re is not None else None
        for name, param in model.named_parameters():
            explicit = any(p.search(name) for p in patterns)
            if not param.requires_grad and not explicit:
                continue
            if block_re is None:  # the whole model is the one group
                part_map.params[part_name(0)].append(name)
                continue
            block = _block_index(block_re, name)
            if block is not None:
                part_map.params[part_name(groups.group_of_block(block))].append(name)
            elif explicit or "modules_to_save" in name:
                part_map.params[SHARED].append(name)
            elif mode == "lora":  # a small adapter outside the blocks (e.g. LoRA on a pooler): every stage
                part_map.params[SHARED].append(name)
                shared.append(name)
            else:  # full weights: before the blocks (embeddings) with the first group, after (norm, head) the last
                group = 0 if side(name) == "before" else groups.num_groups - 1
                part_map.params[part_name(group)].append(name)
                outside.append((name, group))
        if shared:
            logger.warning(
                f"{len(shared)} adapter tensors sit outside the block list (e.g. {shared[0]}); they train in every "
                "stage and travel as the 'shared' part."
            )
        if outside and groups.num_groups > 1:
            first = [n for n, g in outside if g == 0]
            last = [n for n, g in outside if g != 0]
            logger.info(
                f"{len(outside)} trainable tensors sit outside the block list: {len(first)} before it train with group 0"
                f"{f' (e.g. {first[0]})' if first else ''}, {len(last)} after it with group {groups.num_groups - 1}"
                f"{f' (e.g. {last[0]})' if last else ''}. Name modules in always_trainable_modules to train them in "
                "every stage instead, or freeze them (requires_grad_(False)) to leave them out."
            )
        if mode == "full":
            for name, _ in model.named_buffers():
                if block_re is None:
                    part_map.buffers[part_name(0)].append(name)
                    continue
                block = _block_index(block_re, name)
                if block is not None:
                    part_map.buffers[part_name(groups.group_of_block(block))].append(name)
                elif any(p.search(name) for p in patterns):
                    part_map.buffers[SHARED].append(name)
        return part_map

    def trainable_names(self, group: int) -> set[str]:
        return set(self.params[part_name(group)]) | set(self.params.get(SHARED, []))


def _side_of_blocks(model: nn.Module, block_path: str):
    """A function telling, for a parameter name outside the block list, whether its module comes `"before"` or
    `"after"` the blocks in the model's module order (the order a Hugging Face model registers them in, which is the
    order its forward runs them: embeddings before, final norm and head after)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    pattern = re.compile(rf"(?:^|\.){re.escape(block_path)}$")
    blocks_at = min(i for name, i in order.items() if pattern.search(name))

    def side(param_name: str) -> str:
        owner = param_name.rsplit(".", 1)[0]
        return "before" if order.get(owner, blocks_at + 1) < blocks_at else "after"

    return side


def _block_name_pattern(model: nn.Module, block_path: str) -> re.Pattern:
    """Matches `<...>.<block_path>.<index>.` in parameter names of the (possibly PEFT-wrapped) model."""
    return re.compile(rf"(?:^|\.){re.escape(block_path)}\.(\d+)\.")


def _block_index(pattern: re.Pattern, name: str) -> int | None:
    match = pattern.search(name)
    return int(match.group(1)) if match else None


def set_trainable(model: nn.Module, names: set[str]) -> int:
    """Makes exactly the parameters in `names` require grad; returns how many tensors train.

    Call it again after any PEFT call that touches adapters: `set_adapter` re-enables every layer's LoRA weights.
    """
    count = 0
    for name, param in model.named_parameters():
        train = name in names
        param.requires_grad_(train)
        count += train
    return count


def frozen_batchnorms(model: nn.Module, groups: BlockGroups, active_group: int) -> list[nn.Module]:
    """Batch-norm layers inside the blocks of every group except `active_group` (kept in eval mode in full mode)."""
    if groups.num_groups == 1:
        return []
    _, blocks = find_block_list(model, groups.path)
    result = []
    for g in range(groups.num_groups):
        if g == active_group:
            continue
        for b in groups.blocks_of(g):
            result.extend(m for m in blocks[b].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return result


def part_nbytes(part_map: PartMap, model: nn.Module) -> dict[str, int]:
    """Bytes of the tensors in each part (what a payload of that part carries, manifest excluded)."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return {part: sum(_nbytes(state[n]) for n in part_map.tensor_names(part)) for part in part_map.parts}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
