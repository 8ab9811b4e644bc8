"""The package's shape: imports flow one way, the trainer stays off the wire, the library never loads applications."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script


ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "snake_hf"


LAYERS = load_script(ROOT / "scripts" / "import_layers.py", "import_layers")  # the same reading of imports
_imports = LAYERS.all_imports


def test_the_trainer_package_imports_no_torch_distributed():
    for path in (PACKAGE / "trainer").glob("*.py"):
        wire = {n for n in _imports(path) if n.startswith(("torch.distributed", "snake_hf.engine.torch_dist"))}
        assert not wire, f"{path.name} imports {sorted(wire)}: the engine's session owns the wire"


@pytest.mark.parametrize("folder", ["engine", "data", "capacity"])
def test_lower_layers_do_not_import_the_trainer(folder):
    for path in (PACKAGE / folder).glob("*.py"):
        up = {n for n in _imports(path) if n.startswith("snake_hf.trainer")}
        assert not up, f"{folder}/{path.name} imports {sorted(up)}"


def test_the_config_imports_no_engine_module():
    assert not {n for n in _imports(PACKAGE / "config.py") if n.startswith("snake_hf.engine")}


def test_the_library_imports_no_recipe_or_asset_code_and_has_no_cycle():
    assert LAYERS.main() == 0  # prints the layers; 1 on an import cycle
    library = [p for p in PACKAGE.rglob("*.py") if "recipes" not in p.relative_to(PACKAGE).parts]
    for path in library:
        leaks = {n for n in _imports(path) if n.startswith("snake_hf.recipes")}
        assert not leaks, f"{path.relative_to(ROOT)} imports {sorted(leaks)}"


def test_import_snake_hf_loads_neither_the_trainer_nor_applications():
    code = "import sys, snake_hf; print(sorted(m for m in sys.modules if m.startswith('snake_hf')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['snake_hf']", loaded


def test_public_names_are_few_sorted_and_resolve():
    import snake_hf

    assert snake_hf.__all__ == sorted(snake_hf.__all__) and 20 <= len(snake_hf.__all__) <= 25
    for name in snake_hf.__all__:
        assert getattr(snake_hf, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'VGG11'"):
        snake_hf.VGG11  # noqa: B018 - an application, importable from snake_hf.recipes.vision only
