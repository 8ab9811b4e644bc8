"""Which device a rank trains on: `cuda:LOCAL_RANK` on a multi-GPU host, one node per GPU.

Each rank of a distributed Snake run trains as a single-process `Trainer` (DESIGN §5): the launcher's variables are
hidden from `TrainingArguments`, which then picks `cuda:0` and counts every visible GPU (`n_gpu`, so that `Trainer`
would wrap the model in `nn.DataParallel`). A rank must instead take the GPU of its local rank and use it alone.
[`rank_device`] is the rule; `SnakeConfig` applies it where `TrainingArguments` sets up its device.

Payloads never touch the GPU on the wire: they are encoded into host memory and cross ranks over gloo
(`snake_hf.engine.torch_dist`), then copied into the receiving model on its device. Adapters are small (kilobytes to a
few megabytes), so the host copy costs little next to a stage, and gloo needs no GPU on either side, so the same links
serve CPU and GPU ranks alike (NCCL would tie every link to a GPU stream of both ranks while one computes).

A node whose model does not fit one device spreads it with an Accelerate device map (`device_map="auto"` with
`max_memory`, or an explicit map; `dispatch_model`). Entries on other devices keep real tensors and train as they are.
Entries offloaded to `"cpu"` (with a GPU as main device) or `"disk"` hold `meta` placeholders between forwards: their
values live in the hook's `weights_map` and load for each forward. In LoRA mode that is fine for the frozen base (only
adapters train and travel): [`offloaded_values`] reads the stored values for the base's fingerprint, and
[`materialize_offloaded_adapters`] gives the adapters PEFT creates on an offloaded module (on `meta`, the device of its
base weight) real tensors on the module's execution device. Full mode trains and sends block weights, which an offload
does not hold: [`check_offload`] refuses it by name.

A leaf module (torch; accelerate and peft imported where used).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "check_offload",
    "check_trainable_placed",
    "has_offload",
    "load_adapters_in_place",
    "materialize_offloaded_adapters",
    "offloaded_values",
    "peft_on_offloaded_base",
    "place_rank",
    "rank_device",
]


def rank_device(default: torch.device, local_rank: int | None, device_count: int) -> torch.device:
    """The device of the rank with `local_rank` on a host with `device_count` GPUs; `default` where no rule applies.

    A CUDA `default` under a launcher becomes `cuda:(local_rank % device_count)`: one node per GPU, and ranks beyond
    the GPU count share them round-robin (as accelerate does), e.g. two ranks on a one-GPU host both use `cuda:0`.
    A CPU (or other) default, or no launch (`local_rank=None`), stays as it is.

    Example:
        ```python
        >>> rank_device(torch.device("cuda:0"), local_rank=3, device_count=4)
        device(type='cuda', index=3)
        >>> rank_device(torch.device("cpu"), local_rank=3, device_count=4)
        device(type='cpu')
        ```
    """
    if default.type != "cuda" or local_rank is None or device_count < 1:
        return default
    return torch.device("cuda", local_rank % device_count)


def place_rank(args, default: torch.device, local_rank: int | None) -> torch.device:
    """Moves a launched rank's `TrainingArguments` (`args`) from `default` to its own GPU ([`rank_device`]).

    Sets the current CUDA device (so code that says `"cuda"`, e.g. accelerate's single-process state, means the
    rank's GPU) and `args._n_gpu = 1` (this rank uses one GPU: `Trainer` must not wrap it in `nn.DataParallel`).
    Returns the device `args.device` reports. Not launched, or not on CUDA: `default`, unchanged.
    """
    if default.type != "cuda" or local_rank is None:
        return default
    device = rank_device(default, local_rank, torch.cuda.device_count())
    torch.cuda.set_device(device)
    args._n_gpu = 1  # private field of TrainingArguments (transformers 5.23-5.24): what `n_gpu` reports
    logger.info(f"Local rank {local_rank} trains on {device}.")
    return device


def _offload_hooks(module: nn.Module) -> Iterator:
    """The Accelerate `AlignDevicesHook`s with `offload=True` on `module` itself (a `SequentialHook` is searched)."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        if one is not None and getattr(one, "offload", False) and getattr(one, "weights_map", None) is not None:
            yield one


def _hook_tensor_names(module: nn.Module, hook) -> list[str]:
    """The names (relative to `module`) of the tensors `hook` offloads: its parameters, its buffers if it offloads
    them, and its submodules' when it places them (as `AlignDevicesHook` does)."""
    from accelerate.utils import named_module_tensors

    return [
        name
        for name, _ in named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        )
    ]


def has_offload(model: nn.Module) -> bool:
    """Whether an Accelerate device map offloads any of `model`'s tensors (`"cpu"` with a GPU as main device, or
    `"disk"`)."""
    return any(True for module in model.modules() for _ in _offload_hooks(module))


def load_adapters_in_place(model: nn.Module, folder: str) -> bool:
    """Loads the adapter saved in `folder` into `model`'s active adapter, in place, when `model` is a `PeftModel` over
    an offloaded base; returns whether it did (False: nothing offloaded, load as usual).

    `PeftModel.load_adapter` re-dispatches an offloaded model with a new `"auto"` device map (made for inference),
    which moves `meta` placeholders and fails; a checkpoint of the same run only needs its values copied into the
    adapters that are already placed.
    """
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not isinstance(model, PeftModel) or not has_offload(model):
        return False
    adapter = model.active_adapters[0]
    result = set_peft_model_state_dict(model, load_peft_weights(folder, device="cpu"), adapter_name=adapter)
    if result.unexpected_keys:
        raise ValueError(
            f"The adapter in {folder} does not fit the model: {len(result.unexpected_keys)} tensors have no place "
            f"(e.g. {result.unexpected_keys[0]!r}); it was saved from another model or adapter configuration."
        )
    return True


class _OffloadedValues(Mapping):
    """`state_dict` name -> stored value of each offloaded tensor, read from its hook's `weights_map` when asked for
    (a `"disk"` entry is read from its file then, and not kept)."""

    def __init__(self, model: nn.Module):
        self._where = {
            f"{path}.{name}" if path else name: (hook.weights_map, name)
            for path, module in model.named_modules()
            for hook in _offload_hooks(module)
            for name in _hook_tensor_names(module, hook)
            if name in hook.weights_map
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        weights_map, key = self._where[name]
        return weights_map[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def offloaded_values(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """The stored values of every offloaded tensor of `model`, by its `state_dict` name.

    An offloaded tensor is a `meta` placeholder in the module between forwards; its value sits in the Accelerate
    hook's `weights_map` (host memory, or a memory-mapped file for `"disk"`). The mapping reads a value only when it
    is asked for, so listing the names, or reading one tensor at a time, never holds the offloaded model in memory.
    Empty when nothing is offloaded.
    """
    return _OffloadedValues(model)


def check_offload(model: nn.Module, train_mode: str, peft_config=None) -> None:
    """Refuses, before any work, what an offloading device map cannot train: any offload in full mode (the groups'
    weights train and travel, and an offloaded weight has no values in the model), and `meta` tensors that no
    Accelerate hook holds values for (a model built with `init_empty_weights` and never loaded).

    In LoRA mode the frozen base may be offloaded (`"cpu"` with a GPU as main device, or `"disk"`): only adapters train
    and travel, and they are placed on a device ([`peft_on_offloaded_base`]). A `peft_config` whose initialisation
    reads the base weight (PiSSA, OLoRA, LoftQ, ...) is refused there: the weight is not in memory when PEFT reads it.
    """
    if has_offload(model):
        _check_init(peft_config, "the model's device map offloads weights")
    meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if not meta:
        return
    stored = set(offloaded_values(model))
    for path, layer, _, pending in _unplaced_adapters(model):  # placed by `materialize_offloaded_adapters`
        for attribute, adapter in pending:
            named = _named_tensors(getattr(layer, attribute)[adapter], buffers=True)
            stored |= {f"{path}.{attribute}.{adapter}" + (f".{name}" if name else "") for name, _ in named}
    unheld = [name for name in meta if name not in stored]
    if unheld:
        raise ValueError(
            f"{len(unheld)} of the model's tensors are on the meta device with no stored values (e.g. {unheld[0]!r}): "
            "the model was built without weights (`init_empty_weights`) and never loaded. Load it with "
            "`from_pretrained(..., device_map=...)` or `load_checkpoint_and_dispatch`."
        )
    if train_mode == "full":
        raise ValueError(
            f"`train_mode` is 'full' but the model's device map offloads weights ({len(meta)} tensors, e.g. "
            f"{meta[0]!r}): full mode trains and sends every group's weights, which an offloaded block does not hold "
            "between forwards. Train LoRA adapters on the offloaded base (peft_config=LoraConfig(...)), or use a "
            "device map with nothing on 'disk' (and, with a GPU as main device, nothing on 'cpu')."
        )


@contextmanager
def peft_on_offloaded_base() -> Iterator[None]:
    """Inside it, `get_peft_model` places the adapters of offloaded modules on their execution device, with the values
    PEFT draws for them, so an offloaded base gets the same adapters as the base loaded whole (same seed).

    PEFT creates each adapter on the CPU (drawing its initial values, in module order), then moves it to the device of
    its base layer's weight, which for an offloaded module is `meta`: the values are dropped. Here the move goes to the
    execution device of the base layer's offload hook instead, and the base weight is loaded for the moment (a
    variant's `init` reads it: DoRA's magnitude is its norm) until the next layer is placed. Every process then holds
    the same adapters whatever its device map, as Snake needs (a part's version 0 is the same on every node).
    `SnakeTrainer` wraps a model with its `peft_config` inside this; for a `PeftModel` built outside it, see
    [`materialize_offloaded_adapters`].

    Example:
        ```python
        >>> base = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder="offload")
        >>> with peft_on_offloaded_base():
        ...     model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"]))
        ```
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    # BaseTunerLayer._move_adapter_to_device_of_base_layer: private (peft 0.21); where a peft lacks it, adapters on
    # `meta` are placed afterwards by `materialize_offloaded_adapters` (new draws, with a warning).
    original = getattr(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", None)
    if original is None:
        yield
        return
    loaded: list[tuple[nn.Module, list[str]]] = []

    def move(layer, adapter_name, device=None):
        _offload_again(loaded)
        base = layer.get_base_layer()
        hooks = list(_offload_hooks(base))
        if device is None and hooks and any(t.is_meta for _, t in base.named_parameters(recurse=False)):
            device = _execution_device(hooks[0])
            loaded.append((base, _onload(base, hooks[0], device)))
        return original(layer, adapter_name, device)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = move
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = original
        _offload_again(loaded)


def _execution_device(hook) -> torch.device:
    return torch.device(hook.execution_device) if hook.execution_device is not None else torch.device("cpu")


def _onload(module: nn.Module, hook, device: torch.device) -> list[str]:
    """Loads the tensors `hook` offloads into `module` on `device`; returns their names."""
    from accelerate.utils import set_module_tensor_to_device

    names = _hook_tensor_names(module, hook)
    for name in names:
        set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
    return names


def _offload_again(loaded: list[tuple[nn.Module, list[str]]]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    while loaded:
        module, names = loaded.pop()
        for name in names:
            set_module_tensor_to_device(module, name, "meta")


def materialize_offloaded_adapters(model: nn.Module) -> list[str]:
    """Gives the adapters of offloaded modules real tensors on their module's execution device; returns their names.

    For a `PeftModel` built outside [`peft_on_offloaded_base`]: PEFT placed a new adapter on the device of its base
    layer's weight, which for an offloaded module is `meta`, so the adapter has no values and cannot train (backward
    fails on it). Each such adapter is re-created with `to_empty` on the execution device of the base layer's hook (its
    dtype kept), then initialised by PEFT's own code with the base weight loaded for the moment:
    `reset_lora_parameters` (LoRA's A as `nn.Linear`, or Gaussian; B zero) and the variant's `init` (DoRA's magnitude,
    from the base weight's norm). These are new draws, in `named_modules` order: processes that offload the same
    modules get the same adapters, but not those of the base loaded whole (Snake refuses nodes that start from
    different adapters; wrap inside [`peft_on_offloaded_base`] to keep PEFT's draws). Initialisations that read or
    rewrite the base weight (PiSSA, OLoRA, LoftQ, EVA, ...) are refused by name.
    """
    created = []
    for path, layer, hook, pending in _unplaced_adapters(model):
        base = layer.get_base_layer()
        config = _peft_config_of(model, path)
        init = _check_init(config, f"{path!r} is offloaded")
        device = _execution_device(hook)
        loaded = [(base, _onload(base, hook, device))]  # the base weight in memory while its adapters initialise
        try:
            adapters = sorted({adapter for _, adapter in pending})
            kept = {key: _dtypes_and_grads(getattr(layer, key[0])[key[1]]) for key in pending}
            for attribute, adapter in pending:
                container = getattr(layer, attribute)
                if isinstance(container, nn.ParameterDict):
                    old = container[adapter]
                    container[adapter] = nn.Parameter(
                        torch.empty_like(old, device=device), requires_grad=old.requires_grad
                    )
                else:
                    container[adapter].to_empty(device=device)
            for adapter in adapters:
                layer.reset_lora_parameters(adapter, init)
                variant = getattr(layer, "lora_variant", {}).get(adapter)
                if variant is not None:
                    variant.init(layer, adapter_name=adapter, config=config)
            for (attribute, adapter), state in kept.items():  # as PEFT left them: e.g. float32 over a bf16 base
                _restore_dtypes_and_grads(getattr(layer, attribute)[adapter], state)
        finally:
            _offload_again(loaded)
        created += [f"{path}.{attribute}.{adapter}" for attribute, adapter in pending]
    if created:
        logger.info(f"Placed {len(created)} adapters of offloaded modules on their execution device.")
    return created


def _unplaced_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, object, list[tuple[str, str]]]]:
    """Each PEFT layer whose base layer is offloaded and has adapters on `meta`: its path, the layer, the base layer's
    offload hook and the (adapter attribute, adapter name) pairs to place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        hooks = list(_offload_hooks(layer.get_base_layer()))
        pending = [
            (attribute, adapter)
            for attribute in layer.adapter_layer_names
            for adapter, item in getattr(layer, attribute, {}).items()
            if any(tensor.is_meta for tensor in _tensors_of(item))
        ]
        if hooks and pending:
            yield path, layer, hooks[0], pending


def check_trainable_placed(model: nn.Module) -> None:
    """Refuses a trainable tensor left on the `meta` device (e.g. a `modules_to_save` head, or a layer trained in full,
    inside an offloaded entry of the device map): it has no values to train or send. Refuses DoRA on an offloaded
    module too: its forward reads the base weight outside the base layer's forward, where the offload hook has put
    the placeholder back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, layer in model.named_modules():
        dora = isinstance(layer, BaseTunerLayer) and any(getattr(layer, "use_dora", {}).values())
        if dora and any(True for _ in _offload_hooks(layer.get_base_layer())):
            raise ValueError(
                f"`use_dora` is True and {path!r} is offloaded by the device map: DoRA reads the base weight "
                "outside the base layer's forward, when an offloaded module holds only a meta placeholder. Map "
                "the blocks DoRA targets to a device, or train plain LoRA (use_dora=False) over the offloaded base."
            )
    unplaced = [name for name, param in model.named_parameters() if param.requires_grad and param.is_meta]
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} trainable tensors are offloaded by the device map (e.g. {unplaced[0]!r}): they have no "
            "values between forwards, so they can neither train nor travel. Map the modules that train (a "
            "`modules_to_save` head, layers trained in full) to a device, and offload only frozen blocks."
        )


def _check_init(peft_config, why: str):
    """`peft_config`'s `init_lora_weights`, refused when it reads (or rewrites) the base weight, which `why` says is
    not in memory."""
    init = getattr(peft_config, "init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(
            f"`init_lora_weights` is {init!r} and {why}: that initialisation reads (or rewrites) the base weight, "
            "which an offloaded module does not hold. Use init_lora_weights=True or 'gaussian', or map the module to "
            "a device (nothing offloaded)."
        )
    return init


def _named_tensors(item, buffers: bool = False) -> list[tuple[str, torch.Tensor]]:
    """An adapter entry's tensors by name relative to it ("" for a bare parameter of a `ParameterDict`)."""
    if isinstance(item, torch.Tensor):
        return [("", item)]
    return [*item.named_parameters(), *(item.named_buffers() if buffers else ())]


def _tensors_of(item) -> list[torch.Tensor]:
    return [tensor for _, tensor in _named_tensors(item, buffers=True)]


def _dtypes_and_grads(item) -> dict[str, tuple[torch.dtype, bool]]:
    return {name: (tensor.dtype, tensor.requires_grad) for name, tensor in _named_tensors(item)}


def _restore_dtypes_and_grads(item, state: dict[str, tuple[torch.dtype, bool]]) -> None:
    for name, tensor in _named_tensors(item):
        if name in state:
            dtype, requires_grad = state[name]
            tensor.data = tensor.data.to(dtype)
            tensor.requires_grad_(requires_grad)


def _peft_config_of(model: nn.Module, path: str):
    """The PEFT config of the adapter of the tuner layer at `path` (the model's active adapter's)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError(f"{path!r} is a PEFT layer in a model without `peft_config`; wrap the model with peft.")
    active = getattr(model, "active_adapter", None)
    return configs[active] if active in configs else next(iter(configs.values()))
