"""The kernel benchmarks live outside the package (loadtest/kernel_bench/) and still start as scripts.

They need a CUDA GPU to time anything; `--help` runs everywhere and proves their imports (each other, by path,
under PYTHONSAFEPATH) and the kernels' names they use.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import baleen.kernels

KERNEL_BENCH = Path(__file__).resolve().parents[2] / "loadtest" / "kernel_bench"
SCRIPTS = sorted(p for p in KERNEL_BENCH.glob("bench_*.py") if p.name != "bench_util.py")
_HELP_EACH = """
import runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        if e.code != 0:
            raise SystemExit(f"{path} --help exited with {e.code}")
"""


def test_the_package_holds_no_benchmark() -> None:
    names = [m.name for m in pkgutil.iter_modules(baleen.kernels.__path__)]
    assert not [n for n in names if n.startswith("bench")], names
    assert len(SCRIPTS) == 5, SCRIPTS


def test_every_kernel_benchmark_starts(tmp_path: Path) -> None:
    # One child (torch imports once) from another folder with -P, as the Makefile runs Python: nothing but each
    # script's own sys.path line finds bench_util. A script that fails to start ends the child with its name.
    proc = subprocess.run([sys.executable, "-P", "-c", _HELP_EACH, *map(str, SCRIPTS)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("usage: ") == len(SCRIPTS), proc.stdout
