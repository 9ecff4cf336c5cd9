"""baleen: an inference engine and OpenAI-compatible server for DeepSeek-V3-family models.

    import baleen
    engine = await baleen.Engine.start(baleen.EngineConfig(model_path=...))
    async for out in engine.generate("Hello", baleen.SamplingParams(max_new_tokens=16)):
        print(out.text, end="")
    await engine.close()
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

# NOTE: this package is the repository root, and its folders are named like PyPI packages (transformers imports
# PyPI's `kernels`; `model` and `api` exist there too). `python -m ...` run from a checkout puts the root first on
# sys.path, where `import kernels` would find our folder. The root is never an import root (its code is reached as
# `baleen.*` through the installed package), so it leaves sys.path as soon as baleen is imported; the Makefile
# also runs Python with PYTHONSAFEPATH=1, which stops the insertion for anything imported before baleen.
_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

if TYPE_CHECKING:
    from baleen.actors.engine import Engine
    from baleen.actors.engine_config import EngineConfig
    from baleen.messages import GrammarSpec, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineConfig", "GrammarSpec", "RequestOutput", "SamplingParams"]
_HOMES = {"Engine": "baleen.actors.engine", "EngineConfig": "baleen.actors.engine_config",
          "GrammarSpec": "baleen.messages", "RequestOutput": "baleen.messages",
          "SamplingParams": "baleen.messages"}


def __getattr__(name: str) -> Any:
    # Imported on first use: `import baleen.api.protocol` (or the CLI's --help) need not load torch.
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'baleen' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
