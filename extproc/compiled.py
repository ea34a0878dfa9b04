"""The request path, compiled with mypyc when it can be, and pure Python whenever it must be.

Why: the sidecar is interpretation (issue 21's profile: three quarters of its CPU is the
interpreter's own work), and mypyc, the compiler mypy ships, turns the typed modules an
enforced request runs through into C extensions without a line of C in this repository.

How it stays safe:
- The build (`python -m extproc.compile build`, run by `make compile`, `make test`,
  `make bench` and the image) puts one extension per module beside its source, plus
  `_compiled.json`, the SHA-256 of every source it compiled. No C compiler, no mypy, a
  type error mypyc refuses: the build says so in one line and everything stays Python.
- CPython prefers `x.cpython-3*.so` over `x.py` in one directory, so a stale extension
  would be loaded silently after a source edit. `guard()`, run when `extproc` is first
  imported, checks the sources against the manifest and, on any difference (or
  `EXTPROC_PURE=1`), routes every compiled module's import to its source instead: a stale
  build is never run, and a half-compiled mix never happens.
- `python -m extproc.compile status` says which one is running and why.

This module is imported before anything else in the package and uses the standard
library only.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
MANIFEST = PACKAGE / "_compiled.json"
GROUP = "extproc._hot"  # mypyc's shared library: extproc/_hot__mypyc.*.so

# Every module an enforced request runs through, from Envoy's message to the ledger's
# batch. A module compiled must be typed cleanly enough for mypyc, and may not be
# subclassed by an interpreted module (wire/ is compiled whole for that reason).
# governance/keys stays Python: its change-channel listener, compiled, did not resubscribe
# after a dropped connection in one test order (tests/unit/governance/test_keys.py), and a
# request spends under a microsecond there (one hash, one dict probe).
HOT_MODULES: tuple[str, ...] = (
    "dataplane/admission",
    "dataplane/answered",
    "dataplane/envoy_msgs",
    "dataplane/lifecycle",
    "dataplane/metered",
    "dataplane/opening",
    "dataplane/passthrough",
    "dataplane/request",
    "dataplane/selfservice",
    "dataplane/server",
    "dataplane/settle",
    "dataplane/h2grpc/frames",
    "dataplane/h2grpc/hpack",
    "dataplane/h2grpc/http2",
    "dataplane/h2grpc/huffman",
    "dataplane/h2grpc/responses",
    "dataplane/h2grpc/rpc",
    "dataplane/h2grpc/server",
    "store/fastredis",
    "store/scripts",
    "store/schema",
    "governance/budget",
    "governance/credentials",
    "governance/guard",
    "governance/periods",
    "governance/lease",
    "governance/holds",
    "metering/decisions",
    "metering/prices",
    "metering/settlement",
    "metering/ledger",
    "metering/tokens",
    "metering/passthrough",
    "metering/orphans",
    "metering/cacheprefix",
    "metering/rates",
    "metering/bill",
    "metering/worstcase",
    "wire/billing",
    "wire/bodies",
    "wire/chat",
    "wire/common",
    "wire/completions",
    "wire/embeddings",
    "wire/endpoints",
    "wire/errors",
    "wire/paths",
    "wire/priced",
    "wire/responses",
    "wire/spec",
    "wire/sse",
    "wire/usage",
    "routing/decide",
    "routing/rewrite",
)

NAMES = {"extproc." + m.replace("/", ".") for m in HOT_MODULES}

# What `guard()` found: "compiled", or why the sources run instead.
state = "pure: not built"


def sources() -> list[tuple[str, Path]]:
    return [(m, PACKAGE / f"{m}.py") for m in HOT_MODULES]


def fingerprint() -> dict[str, str]:
    """SHA-256 of every hot module's source, and the interpreter the build is for."""
    digests = {
        m: hashlib.sha256((PACKAGE / f"{m}.py").read_bytes()).hexdigest() for m in HOT_MODULES
    }
    return {"python": sys.version, **digests}


class _SourcesOnly(importlib.abc.MetaPathFinder):
    """Loads a hot module from its `.py` even when a `.so` sits beside it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in NAMES or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def verdict(pure_env: str, built: object, current: dict[str, str]) -> str:
    """What may run, from `EXTPROC_PURE`, the build's manifest (None: no build) and the sources."""
    if pure_env not in ("", "0"):
        return "pure: EXTPROC_PURE is set"
    if built is None:
        return "pure: not built (make compile)"
    if not isinstance(built, dict):
        return "pure: unreadable build manifest (make compile rebuilds it)"
    if {k: v for k, v in built.items() if k != "opt_level"} == current:
        return "compiled"
    changed = sorted(m for m in HOT_MODULES if built.get(m) != current.get(m))
    what = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    return f"pure: the compiled build is stale ({what or 'another Python'}); make compile"


def guard() -> str:
    """Decide once, before any hot module is imported, whether the compiled build may run."""
    global state
    built: object = None
    if MANIFEST.is_file():
        try:
            built = json.loads(MANIFEST.read_text())
        except (OSError, ValueError):
            built = "unreadable"
    pure_env = os.environ.get("EXTPROC_PURE", "")
    # The sources are hashed only when a build could run: not for EXTPROC_PURE, not unbuilt.
    needed = built is not None and pure_env in ("", "0")
    state = verdict(pure_env, built, fingerprint() if needed else {})
    if state == "compiled":
        return state
    if "stale" in state:
        print(f"extproc: {state}", file=sys.stderr)
    if not any(isinstance(f, _SourcesOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesOnly())
    return state
