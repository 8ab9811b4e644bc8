"""Prints the import layers of the snake_hf package: layer 0 imports no other snake_hf module, layer k only lower ones.

    python scripts/import_layers.py            # one line per layer
    python scripts/import_layers.py --check    # exit 1 if anything outside snake_hf/recipes imports snake_hf.recipes

Reads the source with `ast` (nothing is imported), so it also works on a tree that does not import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "snake_hf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_imports(path: Path) -> set[str]:
    """Absolute names of everything `path` imports: modules, and `module.name` for each `from module import name`
    (relative imports resolved against the file's package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The snake_hf modules `path` depends on: a `from . import x` of a sibling module does not count the package's
    own __init__."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {t for t in all_imports(path) if t in modules and t != name}
    if any(t.startswith(package + ".") for t in found):
        found.discard(package)
    return found


def main() -> int:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {m: imports_of(p, modules) for m, p in paths.items()}
    library = {m for m in modules if m != "snake_hf" and not m.startswith("snake_hf.recipes")}
    layers, placed = [], set()
    while len(placed) < len(library):
        layer = sorted(m for m in library - placed if graph[m] & library <= placed)
        if not layer:
            print("import cycle among:", sorted(library - placed))
            return 1
        layers.append(layer)
        placed |= set(layer)
    for depth, layer in enumerate(layers):
        print(f"layer {depth}: {' '.join(m.removeprefix('snake_hf.') for m in layer)}")
    leaks = sorted(m for m in library if any(t.startswith("snake_hf.recipes") for t in graph[m]))
    print(
        f"{len(library)} library modules on {len(layers)} layers; library modules importing recipes: {leaks or 'none'}"
    )
    return 1 if "--check" in sys.argv and leaks else 0


if __name__ == "__main__":
    sys.exit(main())
