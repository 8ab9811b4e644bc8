"""Heterogeneous nodes: per-block training memory measured on the real model (`estimate.py`), node profiles, the
designated cut, steps by speed or data, and `explain()` (`planner.py`)."""

from . import planner
from .planner import *  # noqa: F403 - this package is the module's public face


__all__ = planner.__all__
