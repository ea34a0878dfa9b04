"""CPU cost of counting request tokens, the sidecar's main per-request work.

Two questions: does a Codex-style request that re-sends a ~200k-token history plus one
new turn cost almost nothing once the history was seen, and does no 1 MB input make
counting expensive? Figures are CPU time (`time.process_time`), best of a few runs.

Run standalone: `.venv/bin/python bench/bench_counting.py`.
"""

from __future__ import annotations

import base64
import inspect
import json
import random
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from extproc.metering.tokens import TokenCounter, get_encoding  # noqa: E402

ENCODING = "o200k_base"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MB = 1_000_000
T = TypeVar("T")


def _message(role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def _module_doc(path: Path) -> str:
    source = path.read_text(errors="replace")
    parts = source.split('"""')
    doc = inspect.cleandoc(parts[1]) if len(parts) > 2 else source[:600]
    return f"I read `{path.name}`. Summary of what it does:\n\n{doc}"


def codex_body(target_tokens: int = 200_000) -> dict[str, Any]:
    """A Responses request shaped like Codex CLI's: long instructions, tool loop history."""
    enc = get_encoding(ENCODING)
    instructions = "\n\n".join(
        _module_doc(p) for p in sorted(STDLIB.glob("[a-c]*.py"))[:20]
    )  # ~ the size of Codex's system prompt
    items: list[dict[str, Any]] = []
    tokens = len(enc.encode_ordinary(instructions))
    for i, path in enumerate(sorted(STDLIB.glob("*.py"))):
        if tokens >= target_tokens:
            break
        code = path.read_text(errors="replace")[:12_000]
        call_id = f"call_{i:04d}"
        command = {"command": ["bash", "-lc", f"sed -n '1,400p' Lib/{path.name}"]}
        turn = [
            _message("user", f"Open {path.name} and tell me what the main entry points are."),
            {
                "type": "function_call",
                "name": "shell",
                "arguments": json.dumps(command),
                "call_id": call_id,
            },
            {"type": "function_call_output", "call_id": call_id, "output": code},
            _message("assistant", _module_doc(path)),
        ]
        items += turn
        tokens += sum(len(enc.encode_ordinary(t)) for t in _texts_of_items(turn))
    return {
        "model": "gpt-5-codex",
        "instructions": instructions,
        "input": items,
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
        "stream": True,
        "store": False,
        "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    }


def _texts_of_items(items: list[dict[str, Any]]) -> Iterator[str]:
    for item in items:
        kind = item.get("type")
        if kind == "message":
            for part in item["content"]:
                yield part["text"]
        elif kind == "function_call":
            yield item["name"]
            yield item["arguments"]
        elif kind == "function_call_output":
            yield item["output"]


def texts_of(body: dict[str, Any]) -> list[str]:
    return [body["instructions"], *_texts_of_items(body["input"])]


def cpu_ms(fn: Callable[[], T], runs: int = 3) -> tuple[float, T]:
    best = float("inf")
    for _ in range(runs):
        started = time.process_time()
        result = fn()
        best = min(best, time.process_time() - started)
    return best * 1000, result


def _count_all(counter: TokenCounter, texts: list[str]) -> int:
    return sum(counter.count(t, ENCODING) for t in texts)


def worst_cases() -> dict[str, str]:
    rng = random.Random(1)
    return {
        "1 MB one repeated char": "A" * MB,
        "1 MB random base64": base64.b64encode(rng.randbytes(MB)).decode()[:MB],
        "1 MB digits": "".join(rng.choice("0123456789") for _ in range(MB)),
        "1 MB spaces": " " * MB,
        "1 MB Python source": "".join(
            p.read_text(errors="replace") for p in sorted(STDLIB.glob("*.py"))
        )[:MB],
    }


def measure() -> list[tuple[str, int, float, float | None]]:
    """Rows of (case, tokens, extproc CPU ms, plain tiktoken CPU ms or None)."""
    enc = get_encoding(ENCODING)
    rows: list[tuple[str, int, float, float | None]] = []

    body = codex_body()
    wire = json.dumps(body).encode()
    grown = dict(body, input=[*body["input"], _message("user", "Now add type hints please.")])
    grown_wire = json.dumps(grown).encode()

    def cold() -> int:
        return _count_all(TokenCounter(), texts_of(json.loads(wire)))

    cold_ms, tokens = cpu_ms(cold)
    plain_ms, _ = cpu_ms(lambda: sum(len(enc.encode_ordinary(t)) for t in texts_of(body)))
    rows.append(("Codex request, cold", tokens, cold_ms, plain_ms))

    counter = TokenCounter()
    _count_all(counter, texts_of(json.loads(wire)))
    warm_samples = []
    for _ in range(5):
        fresh = texts_of(json.loads(grown_wire))  # new str objects, as for a real request
        started = time.process_time()
        warm_tokens = _count_all(counter, fresh)
        warm_samples.append((time.process_time() - started) * 1000)
    rows.append(("Codex request + 1 new turn, warm", warm_tokens, min(warm_samples), None))

    for name, text in worst_cases().items():
        ms, tokens = cpu_ms(lambda text=text: TokenCounter().count(text, ENCODING))
        plain: float | None = None
        if not name.endswith("spaces"):  # tiktoken alone panics on a 1 MB whitespace run
            plain, _ = cpu_ms(lambda text=text: len(enc.encode_ordinary(text)), runs=1)
        rows.append((name, tokens, ms, plain))
    return rows


def counting_figures() -> dict[str, float]:
    """CPU ms per case, for the main bench report."""
    return {f"{name} ({tokens} tok)": ms for name, tokens, ms, _ in measure()}


def request_path_figures() -> dict[str, float]:
    """Sidecar CPU for the whole request body phase of a Codex-like 200k-token request:
    decode (zstd), strict JSON parse, count, once cold and once with the history seen."""
    import zstandard

    from extproc.metering.decisions import parse_request
    from extproc.metering.tokens import count_text
    from extproc.wire.endpoints import ENDPOINTS

    endpoint = ENDPOINTS["/v1/responses"]
    body = codex_body(200_000)
    first = zstandard.compress(json.dumps(body).encode())
    body["input"].append({"role": "user", "content": "and one more thing"})
    raw = json.dumps(body).encode()
    second = zstandard.compress(raw)

    def run(data: bytes) -> float:
        start = time.process_time()
        parse_request(endpoint, data, "zstd", max_body_bytes=64 << 20, count=count_text)
        return (time.process_time() - start) * 1000

    cold = run(first)
    warm = min(run(second) for _ in range(3))
    return {
        f"request body phase, cold ({len(raw) // 1024} KiB JSON, zstd)": cold,
        "request body phase, history seen + 1 turn": warm,
    }


def main() -> int:
    get_encoding(ENCODING)
    rows = measure()
    print(f"token counting, {ENCODING}, CPU ms (best of runs)")
    print(f"{'case':36} {'tokens':>9} {'extproc':>9} {'tiktoken':>9}")
    for name, tokens, ms, plain in rows:
        reference = f"{plain:9.1f}" if plain is not None else f"{'-':>9}"
        print(f"{name:36} {tokens:9d} {ms:9.2f} {reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
