"""Applications of snake_hf, not the library: what the recipes, examples and benchmarks share (models, LoRA targets,
evaluation, saving), their data (`data.py`), the offline assets (`assets.py`), the paper's CNN (`vision.py`), the
command line (`cli.py`) and offline `evaluate` metrics (`metrics/`). `import snake_hf` never loads this package.
"""

from . import common
from .common import *  # noqa: F403 - this package is the module's public face


__all__ = common.__all__
