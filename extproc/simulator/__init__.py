"""A fake OpenAI upstream that speaks the real wire formats, with injectable faults.

Envoy forwards to it in tests, in `make run` and in the benchmark, so the metering
path is exercised end to end against the exact bytes OpenAI sends, without network.
May import `wire` and `metering` (token counting); nothing of the data path imports it.
"""

from __future__ import annotations

from extproc.simulator.app import SeenRequest
from extproc.simulator.server import Simulator, main

__all__ = ["SeenRequest", "Simulator", "main"]
