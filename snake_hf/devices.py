"""Which device a rank trains on: `cuda:LOCAL_RANK` on a multi-GPU host, one node per GPU.

Each rank of a distributed Snake run trains as a single-process `Trainer` (DESIGN §5): the launcher's variables are
hidden from `TrainingArguments`, which then picks `cuda:0` and counts every visible GPU (`n_gpu`, so that `Trainer`
would wrap the model in `nn.DataParallel`). A rank must instead take the GPU of its local rank and use it alone.
[`rank_device`] is the rule; `SnakeConfig` applies it where `TrainingArguments` sets up its device.

Payloads never touch the GPU on the wire: they are encoded into host memory and cross ranks over gloo
(`snake_hf.engine.torch_dist`), then copied into the receiving model on its device. Adapters are small (kilobytes to a
few megabytes), so the host copy costs little next to a stage, and gloo needs no GPU on either side, so the same links
serve CPU and GPU ranks alike (NCCL would tie every link to a GPU stream of both ranks while one computes).

A leaf module (torch only).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["check_no_offload", "place_rank", "rank_device"]


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


def check_no_offload(model: nn.Module) -> None:
    """Refuses a model whose Accelerate device map offloads weights (`"cpu"` or `"disk"` entries: `meta` placeholders
    between forwards), before any work.

    Snake checksums, sends and loads the tensors of every part, frozen ones included (the final hand-over carries them
    all), and reads the base's weights for its fingerprint: an offloaded weight has no values in the model. A device map
    that places every block on a device (`device_map="auto"` with a `max_memory` that fits, over several GPUs) keeps
    real tensors and trains as it is: Accelerate's hooks move activations between the devices.
    """
    offloaded = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if offloaded:
        raise ValueError(
            f"The model's device map offloads weights ({len(offloaded)} tensors on the meta device, e.g. "
            f"{offloaded[0]!r}): Snake reads every part's values for checksums and payloads, which offloaded weights "
            "do not hold. Place every block on a device (device_map over GPUs and 'cpu' as main memory, with "
            "max_memory large enough that nothing goes to 'disk' or CPU offload), or load without a device map."
        )
