"""Sidecar settings: a small YAML file, validated up front, with environment overrides.

A sidecar that starts with a typo in its config and silently uses a default is how a
budget ends up unenforced, so every unknown or ill-typed field is an error that names
the field and says what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the path of the offending field in its message."""


@dataclass(frozen=True, slots=True)
class Settings:
    # gRPC listen address: "host:port" or "unix:/path".
    listen: str = "127.0.0.1:9001"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Largest request body accepted on the wire and after decompression (Codex bodies are big).
    max_body_bytes: int = 32 * 1024 * 1024
    # Bodies above this size are decoded, parsed and counted on a worker thread so that one
    # huge request never stalls the event loop that serves every other stream.
    offload_bytes: int = 256 * 1024
    # What to do with a metered request whose body cannot be understood (bad JSON, bad
    # encoding, missing model): "reject" answers 4xx in OpenAI's error shape; "pass" forwards
    # it untouched and still meters the response.
    bad_request: str = "reject"
    # Budget policy (YAML: workspaces, keys, limits). Required unless `metering_only`: a sidecar
    # whose policy variable was mistyped must not start forwarding ungoverned traffic.
    policy: str = ""
    # Meter only, on purpose: no policy, no virtual keys; each client's own credential goes to
    # the provider and key-less requests are forwarded. Never the fallback for a missing policy.
    metering_only: bool = False
    # A second policy evaluated beside the real one and never enforced: its decision goes on
    # each ledger record and span ("shadow"), so a change can be watched before it bites.
    shadow_policy: str = ""
    # The price file (TOML) on top of the genai-prices catalogue; empty means the one bundled
    # with extproc. Hot-reloaded; see docs/prices.md.
    prices: str = ""
    # How many usage records the Redis ledger keeps (approximate trim).
    ledger_max_records: int = 1_000_000
    # Where records wait when Redis is unreachable, replayed when it returns.
    spool_dir: str = ".data/spool"
    # Seconds an in-flight stream gets to finish after SIGTERM.
    grace_seconds: float = 30.0
    # Sidecar processes; 0: one per usable CPU. With more than one, each also listens on a
    # port of its own (`worker_listen`), which Envoy lists as an endpoint per worker.
    workers: int = 0
    # With several workers, worker 0's own "host:port"; worker i listens on port + i. Empty:
    # loopback, from the port after `listen`'s (listen 0.0.0.0:9001 -> 127.0.0.1:9002, 9003...).
    worker_listen: str = ""
    # With several workers, one whose event loop sends no heartbeat for this long (or whose
    # ledger writer is wedged) is killed and replaced by the supervisor; 0: never.
    worker_hang_seconds: float = 20.0
    # Seconds a budget hold lives without renewal. A live sidecar renews its holds every
    # quarter of this; once a dead or hung sidecar's hold expires, any replica bills its
    # estimate (outcome "orphaned") and releases it. Shorter: orphans billed and budget
    # freed sooner; longer: more tolerance for a sidecar paused (GC, CPU starvation).
    hold_expiry_seconds: float = 120.0
    # Budget leases: a caller busy on this replica gets a slice of its caps' room and its
    # requests are admitted locally against it (one orphan write each, no script call);
    # near a cap, and for everyone else, each request is held exactly. See docs/budgets.md.
    budget_leases: bool = True
    # Seconds between two looks of the burn-rate watch, which also refreshes the budget
    # utilization gauge from Redis (one pipelined read per look).
    burn_check_seconds: float = 60.0
    # With replicas (Sentinel): usage records count as written once this many replicas
    # acknowledge them (Redis WAIT); until then they stay in the spool and are replayed.
    # 0: the primary's acknowledgement is enough (one node, or a managed Redis).
    redis_wait_replicas: int = 0
    # Where each workspace's provider key comes from: "policy" (its upstream.key_env or
    # key_file), or "simulated" for a local simulator upstream that accepts any key: every
    # workspace, one added to the live policy too, gets `sk-simulated-<workspace>`. `make
    # run` sets it when it starts the simulator; never use it towards a real provider.
    upstream_keys: str = "policy"
    # The gateway's address as developers reach it ("https://ai-gateway.example.com"): budget
    # refusals link to its /extproc/topup page. Empty: the refusal names the path alone.
    public_url: str = ""
    # The console's address, for links in top-up notices and pause refusals ("" for none).
    console_url: str = ""
    # Seconds between two looks of the runaway breaker at new ledger records (and of the
    # top-up expiry sweep); only one replica looks at a time (a lease in Redis).
    breaker_check_seconds: float = 1.0


_ENV = {
    "listen": "EXTPROC_LISTEN",
    "redis_url": "EXTPROC_REDIS_URL",
    "max_body_bytes": "EXTPROC_MAX_BODY_BYTES",
    "bad_request": "EXTPROC_BAD_REQUEST",
    "prices": "EXTPROC_PRICES",
    "policy": "EXTPROC_POLICY",
    "metering_only": "EXTPROC_METERING_ONLY",
    "shadow_policy": "EXTPROC_SHADOW_POLICY",
    "spool_dir": "EXTPROC_SPOOL_DIR",
    "workers": "EXTPROC_WORKERS",
    "worker_listen": "EXTPROC_WORKER_LISTEN",
    "worker_hang_seconds": "EXTPROC_WORKER_HANG_SECONDS",
    "hold_expiry_seconds": "EXTPROC_HOLD_EXPIRY_SECONDS",
    "budget_leases": "EXTPROC_BUDGET_LEASES",
    "grace_seconds": "EXTPROC_GRACE_SECONDS",
    "burn_check_seconds": "EXTPROC_BURN_CHECK_SECONDS",
    "redis_wait_replicas": "EXTPROC_REDIS_WAIT_REPLICAS",
    "upstream_keys": "EXTPROC_UPSTREAM_KEYS",
    "public_url": "EXTPROC_PUBLIC_URL",
    "console_url": "EXTPROC_CONSOLE_URL",
    "breaker_check_seconds": "EXTPROC_BREAKER_CHECK_SECONDS",
}
_CHOICES = {"bad_request": ("reject", "pass"), "upstream_keys": ("policy", "simulated")}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_ZERO_MEANS_AUTO = frozenset({"workers", "redis_wait_replicas"})


def _coerce(name: str, value: Any, expected: type, where: str) -> Any:
    if expected is bool:
        text = value.strip().lower() if isinstance(value, str) else value
        if text in _TRUE or text is True:
            return True
        if text in _FALSE or text is False:
            return False
        raise ConfigError(f"{where}: {name}: must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        least = 0 if name in _ZERO_MEANS_AUTO else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = "a whole number (0: automatic)" if least == 0 else "a positive integer"
            raise ConfigError(f"{where}: {name}: must be {what}, got {value!r}")
    elif expected is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name}: must be a number, got {value!r}") from None
        if value < 0:
            raise ConfigError(f"{where}: {name}: must not be negative, got {value!r}")
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name}: must be a string, got {value!r}")
        choices = _CHOICES.get(name)
        if choices and value not in choices:
            raise ConfigError(
                f"{where}: {name}: must be one of {', '.join(choices)}, got {value!r}"
            )
    return value


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Settings from an optional YAML file, then `EXTPROC_*` environment variables on top."""
    env = os.environ if env is None else env
    path = path or env.get("EXTPROC_CONFIG") or None
    raw: dict[str, Any] = {}
    where = "settings"
    if path:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping of settings")
        raw.update(loaded)
    known = {f.name: f for f in fields(Settings)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{where}: {name}: unknown setting (known: {', '.join(known)})")
    for name, var in _ENV.items():
        if var in env:
            raw[name] = env[var]
    values = {}
    for name, value in raw.items():
        kind = type(known[name].default)
        source = _ENV[name] if name in _ENV and _ENV[name] in env else where
        values[name] = _coerce(name, value, kind, source)
    return Settings(**values)


def check_mode(settings: Settings) -> None:
    """Governed (a policy) or metering-only (said so): never one by accident of the other."""
    if settings.policy and settings.metering_only:
        raise ConfigError(
            "EXTPROC_METERING_ONLY is set and so is a policy "
            f"({settings.policy}): choose one (unset EXTPROC_METERING_ONLY to enforce it)"
        )
    if not settings.policy and not settings.metering_only:
        raise ConfigError(
            "no policy: set EXTPROC_POLICY (or `policy` in the settings file) to the budget "
            "policy; to forward ungoverned traffic on purpose (clients' own keys reach the "
            "provider, none is required), set EXTPROC_METERING_ONLY=1"
        )
