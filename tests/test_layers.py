"""The package's layers point one way: a module imports only from layers listed before its own
(README "Layout"), so there are no import cycles between subpackages, the library never imports
its user API, and inference (api, tasks, models) never imports the training loop."""
from __future__ import annotations

import ast
from pathlib import Path

import edge_glass

ROOT = Path(edge_glass.__file__).parent
LAYERS = ["errors", "paths", "registry", "atomic", "tensors", "media", "runtime", "weights", "encoders", "data", "features",
          "heads", "losses", "nested", "decoders", "models", "eval", "nlmm", "config", "runs", "tasks", "export", "report", "train", "api", "cli", "__init__"]


def imports() -> list[tuple[str, str, str]]:
    """(importing layer, imported layer, where) for every relative import in the package."""
    out = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).parts
        src = rel[0] if len(rel) > 1 else rel[0][:-3]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = list(rel[:-1])[: max(0, len(rel) - node.level)] + (node.module.split(".") if node.module else [])
                dst = parts[0] if parts else node.names[0].name
                if dst != src:
                    out.append((src, dst, f"{f.relative_to(ROOT)}:{node.lineno}"))
    return out


def test_every_module_belongs_to_a_known_layer():
    names = {p.name if p.is_dir() else p.stem for p in ROOT.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert names <= set(LAYERS), f"add {sorted(names - set(LAYERS))} to LAYERS (and README's Layout)"


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{where}: {src} imports {dst}" for src, dst, where in imports() if rank[dst] > rank[src]]
    assert not upward, "\n".join(upward)


def test_inference_never_imports_training_and_nothing_imports_the_user_api():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in imports()
           if (dst == "train" and src in ("api", "tasks", "models")) or (dst == "api" and src not in ("cli", "__init__"))]
    assert not bad, "\n".join(bad)
