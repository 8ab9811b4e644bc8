"""Float32 master weights for the group in training over a half-precision model (`SnakeConfig.master_dtype`).

A model loaded in bfloat16 trains, under `Trainer`, in bfloat16: AdamW's update is added to bfloat16 weights, and an
update smaller than half a bfloat16 step (2^-9 of the weight's magnitude) is lost. Mixed-precision training keeps a
float32 copy of each trained weight (the "master" weight), applies the update to it, and gives the model its bfloat16
rounding. Snake trains one group at a time, so only that group needs a master copy, for the length of its stage.

[`keep_master_weights`] turns an optimizer built over a group's half-precision parameters into one that steps float32
masters of them, using the optimizer's own hooks (no wrapper class, so `Trainer`, Accelerate and the learning-rate
scheduler see the optimizer they built):

* its param groups hold the masters (float32 copies of the parameters as the stage starts);
* before each step, each master's gradient is its parameter's gradient in float32; after it, each parameter takes its
  master's value, rounded to the parameter's dtype;
* its `state_dict` carries the masters, and `load_state_dict` restores them, so a run resumed from a checkpoint inside
  a stage continues from the same float32 values.

What travels at the end of the stage is the model's (rounded) parameter: payload bytes are unchanged. Parameters
already in the master dtype (LoRA adapters, which peft keeps in float32) are stepped directly.

A leaf module (torch only).
"""

from __future__ import annotations

import torch


__all__ = ["MASTER_KEY", "keep_master_weights"]

MASTER_KEY = "snake_master_weights"  # the masters' entry in the optimizer's state_dict


def keep_master_weights(optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.float32) -> int:
    """Makes `optimizer` (fresh: no step taken) step `dtype` masters of its narrower floating-point parameters;
    returns how many parameters got a master.

    Example:
        ```python
        >>> weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        >>> optimizer = torch.optim.SGD([weight], lr=1e-4)
        >>> keep_master_weights(optimizer)
        1
        >>> for _ in range(100):
        ...     weight.grad = torch.ones_like(weight)
        ...     optimizer.step()
        >>> weight[0].item()  # plain bfloat16 SGD would stay at 1.0: each 1e-4 step is under half a bfloat16 step
        0.98828125
        ```
    """
    if getattr(optimizer, "_snake_master_dtype", None) is not None:
        return 0  # already stepping masters
    if optimizer.state:
        raise ValueError("keep_master_weights needs a fresh optimizer (one that has not stepped yet).")
    optimizer._snake_master_dtype = dtype
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if param.is_floating_point() and torch.finfo(param.dtype).bits < torch.finfo(dtype).bits:
                master = param.detach().to(dtype).requires_grad_(True)
                group["params"][index] = master
                pairs.append((param, master))
    if not pairs:
        return 0

    def gradients_in(optimizer, args, kwargs):
        for param, master in pairs:
            master.grad = None if param.grad is None else param.grad.to(dtype)

    def values_out(optimizer, args, kwargs):
        with torch.no_grad():
            for param, master in pairs:
                param.copy_(master)

    def save_masters(optimizer, state_dict):
        state_dict[MASTER_KEY] = [master.detach().clone() for _, master in pairs]
        return state_dict

    def take_masters(optimizer, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop(MASTER_KEY, None)
        if saved is not None:
            if len(saved) != len(pairs) or any(s.shape != m.shape for s, (_, m) in zip(saved, pairs, strict=True)):
                raise ValueError(
                    f"The optimizer state holds {len(saved)} master weights that do not fit this stage's "
                    f"{len(pairs)}: it was saved by another stage or model."
                )
            with torch.no_grad():
                for value, (param, master) in zip(saved, pairs, strict=True):
                    master.copy_(value)
                    param.copy_(master)
        return state_dict

    optimizer.register_step_pre_hook(gradients_in)
    optimizer.register_step_post_hook(values_out)
    optimizer.register_state_dict_post_hook(save_masters)
    optimizer.register_load_state_dict_pre_hook(take_masters)
    return len(pairs)
