"""Package boundaries of the HTTP layer: it imports no torch, the server and its routes do not import each other,
and model/ imports neither api/ nor actors/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import baleen

ROOT = Path(baleen.__file__).resolve().parent
ROUTES = ("serving_chat", "serving_completion")


def _imports(path: Path) -> set[str]:
    """Every baleen module a file imports (at any depth: function-level imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("baleen"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("baleen"))
    return found


def test_the_http_layer_does_not_import_torch() -> None:
    code = ("import sys, baleen.api.server, baleen.api.cli, baleen.launch_server; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"torch was imported: {proc.stdout.strip()[:200]}"


def test_server_and_routes_do_not_import_each_other() -> None:
    for path in (ROOT / "api").glob("*.py"):
        if path.stem == "server":
            continue
        imported = _imports(path)
        assert "baleen.api.server" not in imported, f"{path.name} imports the server"
        if path.stem in ROUTES:
            others = {f"baleen.api.{r}" for r in ROUTES if r != path.stem}
            assert not imported & others, f"{path.name} imports another route module"


def test_model_imports_neither_api_nor_actors() -> None:
    for path in (ROOT / "model").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("baleen.api", "baleen.actors"))}
        assert not bad, f"model/{path.name} imports {sorted(bad)}"
