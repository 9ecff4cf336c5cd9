"""Servers for the HTTP tests: real ones in subprocesses (one per configuration, shared by the session) and an
in-process one over a fake engine, for failures a real engine cannot be made to show on demand.

The harness (tests/e2e/harness.py) is imported inside the fixtures, so the other tests here do not pay for
importing the server.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the shared harness

if TYPE_CHECKING:
    from harness import FakeEngine, ServerProcess, ThreadServer


@pytest.fixture(scope="session")
def main_server() -> Iterator[ServerProcess]:
    """V3 template (the checkpoint's), deepseekv3 tool calls, deepseek-v3 reasoning, the scripted processor."""
    from harness import SCRIPTED, ServerProcess

    with ServerProcess("--tool-call-parser", "deepseekv3", "--reasoning-parser", "deepseek-v3",
                       "--enable-custom-logit-processor", "--custom-logit-processor", SCRIPTED) as server:
        yield server


@pytest.fixture(scope="session")
def r1_server() -> Iterator[ServerProcess]:
    """R1 template and reasoning, deepseekv31 tool calls, the engine inside the server process."""
    from harness import SCRIPTED, ServerProcess

    with ServerProcess("--chat-template", "deepseek-r1", "--reasoning-parser", "deepseek-r1", "--tool-call-parser",
                       "deepseekv31", "--custom-logit-processor", SCRIPTED, "--single-process") as server:
        yield server


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    from baleen.model.make_model import default_model_path

    return Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))


@pytest.fixture(scope="module")
def fake_engine(tokenizer: Tokenizer) -> FakeEngine:
    from harness import FakeEngine

    return FakeEngine(tokenizer)


@pytest.fixture(scope="module")
def fake_server(fake_engine: FakeEngine) -> Iterator[ThreadServer]:
    """An in-process server over the fake engine, with an API key and a 4 KiB body limit."""
    from harness import ThreadServer

    from baleen.api.state import ServerConfig

    config = ServerConfig(host="127.0.0.1", port=0, api_key="sekret", max_request_bytes=4096, log_level="warning",
                          served_model_name="fake")
    with ThreadServer(fake_engine, config) as server:
        yield server
