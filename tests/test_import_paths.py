"""Our folders never answer top-level imports: `kernels`, `model` and `api` are PyPI's (or nobody's), not ours.

The repository root is the package `baleen`; its folders share names with PyPI packages (transformers 5.25
imports PyPI's `kernels` in its hub-kernels integration). Python puts the current directory on sys.path for
`python -m` and `python -c`; importing baleen takes the root off again, and the Makefile runs every Python
with PYTHONSAFEPATH=1 so nothing gets there before baleen is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import baleen

ROOT = Path(baleen.__file__).resolve().parent
SHADOWED = ("kernels", "model", "api", "actors", "loadtest", "tests")

# Run in a child: where each name resolves, and whether transformers' hub-kernels integration imports.
_PROBE = """
import importlib, importlib.util, json, sys
origins = {}
for name in %r:
    spec = importlib.util.find_spec(name)
    origins[name] = None if spec is None else (spec.origin or list(spec.submodule_search_locations or []))
try:
    importlib.import_module("transformers.integrations.hub_kernels")
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"origins": origins, "error": error}))
"""


def _ours(name: str, origin: object) -> bool:
    """Whether a spec's origin is our folder `name` (a venv inside the checkout is not ours)."""
    paths = origin if isinstance(origin, list) else [origin] if origin else []
    return any(Path(p).resolve().is_relative_to(ROOT / name) for p in paths)


def _probe(*python_flags: str, first: str = "") -> dict[str, object]:
    """Run the probe from the repository root, as `python -c` would be run there by hand."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    code = first + _PROBE % (SHADOWED,)
    proc = subprocess.run([sys.executable, *python_flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_this_process_resolves_none_of_our_folders() -> None:
    for name in SHADOWED:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else (spec.origin or list(spec.submodule_search_locations or []))
        assert not _ours(name, origin), f"`import {name}` would load {origin}"
    importlib.import_module("transformers.integrations.hub_kernels")


def test_importing_baleen_takes_the_checkout_off_sys_path() -> None:
    # `python -c` from the root puts the root first on sys.path; importing baleen removes it again.
    out = _probe(first="import baleen\n")
    assert out["error"] is None, out["error"]
    origins = out["origins"]
    assert isinstance(origins, dict)
    for name, origin in origins.items():
        assert not _ours(name, origin), f"`import {name}` would load {origin}"


def test_safe_path_keeps_the_checkout_off_sys_path() -> None:
    # What the Makefile does (PYTHONSAFEPATH=1, i.e. python -P): nothing of ours answers, baleen or not.
    out = _probe("-P")
    assert out["error"] is None, out["error"]
    origins = out["origins"]
    assert isinstance(origins, dict)
    assert not any(_ours(n, o) for n, o in origins.items()), origins


def test_without_either_the_checkout_would_shadow() -> None:
    # The probe can fail: plain `python -c` from the root, baleen not imported, finds our kernels/ folder.
    out = _probe()
    origins = out["origins"]
    assert isinstance(origins, dict)
    assert _ours("kernels", origins["kernels"]), origins


def test_the_makefile_runs_python_with_a_safe_path() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "export PYTHONSAFEPATH := 1" in makefile
    assert "-P -m pytest" in makefile
