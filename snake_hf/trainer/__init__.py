"""`SnakeTrainer` and what it needs around `Trainer`: set-up before `Trainer` sees the model, stage checkpoints and
resume, and every use of a private `Trainer`/Accelerate member (`_compat.py`). Nothing here touches the network: the
engine's session (`snake_hf.engine.session`) owns transports and relays.
"""

from .trainer import SnakeTrainer


__all__ = ["SnakeTrainer"]
