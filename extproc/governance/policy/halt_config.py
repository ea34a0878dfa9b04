"""The policy's `topups:` and `breaker:` sections, validated (see docs/topups.md).

`topups:` (defaults, workspaces) says what one top-up request may ask for and who is told;
`auto_approve` names services, so it belongs to a workspace only. `breaker:` (defaults,
workspaces, services) holds the runaway breaker's thresholds, inherited field by field like
`key_rate_limits`: a service that only sets `repeats: {more_than: 50}` keeps the inherited
window. A rule set to `false` (or `off`, which YAML reads as false) is switched off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from extproc.governance.policy.check import _Checker, _did_you_mean, _shown
from extproc.governance.policy.model import (
    _PLAIN_DECIMAL,
    BREAKER_MODES,
    MAX_TOPUP_DAYS,
    AutoApprove,
    Breaker,
    Topups,
)

_TOPUP_FIELDS = ("max_usd", "max_days", "auto_approve", "requester_webhooks")
_AUTO_FIELDS = ("services", "under_usd", "period_max_usd")
_BREAKER_FIELDS = ("mode", "repeats", "spend_rate", "session_growth")
_RULES: dict[str, dict[str, str]] = {
    # YAML field -> Breaker field, per rule
    "repeats": {"more_than": "repeat_more_than", "minutes": "repeat_minutes"},
    "spend_rate": {
        "multiple": "rate_multiple",
        "minutes": "rate_minutes",
        "min_usd": "rate_min_nanos",
    },
    "session_growth": {"tokens": "growth_tokens", "turns": "growth_turns"},
}
_SWITCH = {
    "repeats": "repeat_more_than",
    "spend_rate": "rate_multiple",
    "session_growth": "growth_tokens",
}
MAX_WINDOW_MINUTES = 24 * 60
MAX_RATE_MULTIPLE = Decimal(1000)


def _multiple(chk: _Checker, path: str, value: Any) -> Decimal | None:
    number: Decimal | None = None
    if isinstance(value, Decimal) and value.is_finite():
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
        number = Decimal(value.strip())
    if number is None or not 1 < number <= MAX_RATE_MULTIPLE:
        chk.error(
            path,
            f"must be a number above 1 and at most {MAX_RATE_MULTIPLE} (10 trips at ten "
            f"times the key's busiest hour), got {_shown(value)}",
        )
        return None
    return number


def _minutes(chk: _Checker, path: str, value: Any) -> int | None:
    got = chk.positive_int(path, value)
    if got is not None and got > MAX_WINDOW_MINUTES:
        chk.error(path, f"must be at most {MAX_WINDOW_MINUTES} minutes (a day), got {got}")
        return None
    return got


def breaker_overrides(chk: _Checker, path: str, value: Any) -> dict[str, Any]:
    """The Breaker fields set at `path` (to merge over the inherited ones)."""
    if value is None:
        return {}
    raw = chk.mapping(path, value, _BREAKER_FIELDS)
    out: dict[str, Any] = {}
    if "mode" in raw:
        mode = raw["mode"]
        if mode is False:  # `mode: off` reads as false in YAML
            mode = "off"
        found = chk.choice(f"{path}.mode", mode, BREAKER_MODES)
        if found is not None:
            out["mode"] = found
    for rule, fields in _RULES.items():
        if rule not in raw:
            continue
        where = f"{path}.{rule}"
        body = raw[rule]
        if body is False:
            out[_SWITCH[rule]] = None
            continue
        if body is None:
            chk.error(where, "must be a mapping of thresholds, or false to switch the rule off")
            continue
        rule_raw = chk.mapping(where, body, tuple(fields))
        for name, target in fields.items():
            if name not in rule_raw:
                continue
            item, at = rule_raw[name], f"{where}.{name}"
            parsed: Any
            if name == "multiple":
                parsed = _multiple(chk, at, item)
            elif name == "minutes":
                parsed = _minutes(chk, at, item)
            elif name == "min_usd":
                parsed = 0 if item in (0, "0") else chk.money(at, item)
            else:
                parsed = chk.positive_int(at, item)
            if parsed is not None:
                out[target] = parsed
    return out


def merged_breaker(base: Breaker, overrides: Mapping[str, Any]) -> Breaker:
    return dataclasses.replace(base, **overrides) if overrides else base


def topup_overrides(
    chk: _Checker, path: str, value: Any, services: Collection[str] | None
) -> dict[str, Any]:
    """The Topups fields set at `path`; `services` (a workspace's) allows `auto_approve`."""
    if value is None:
        return {}
    raw = chk.mapping(path, value, _TOPUP_FIELDS)
    out: dict[str, Any] = {}
    if "max_usd" in raw:
        out["max_nanos"] = chk.money(f"{path}.max_usd", raw["max_usd"])
    if "max_days" in raw:
        days = chk.positive_int(f"{path}.max_days", raw["max_days"])
        if days is not None and days > MAX_TOPUP_DAYS:
            chk.error(f"{path}.max_days", f"must be at most {MAX_TOPUP_DAYS} days, got {days}")
        elif days is not None:
            out["max_days"] = days
    if "requester_webhooks" in raw:
        prefixes = chk.strings(f"{path}.requester_webhooks", raw["requester_webhooks"])
        checked = []
        for i, prefix in enumerate(prefixes or ()):
            url = chk.url(f"{path}.requester_webhooks[{i}]", prefix)
            if url is not None:
                checked.append(url)
        if prefixes is not None and len(checked) == len(prefixes):
            out["requester_webhooks"] = tuple(checked)
    if "auto_approve" in raw:
        where = f"{path}.auto_approve"
        if services is None:
            chk.error(where, "names services: set it on a workspace, not under defaults")
        else:
            auto = _auto_approve(chk, where, raw["auto_approve"], services)
            if auto is not None:
                out["auto_approve"] = auto
    return out


def _auto_approve(
    chk: _Checker, path: str, value: Any, services: Collection[str]
) -> AutoApprove | None:
    raw = chk.mapping(path, value, _AUTO_FIELDS, required=("services", "under_usd"))
    names = chk.strings(f"{path}.services", raw["services"]) if "services" in raw else None
    for i, name in enumerate(names or ()):
        if name not in services:
            hint = _did_you_mean(name, services) or f" (services: {', '.join(services) or 'none'})"
            chk.error(f"{path}.services[{i}]", f'unknown service "{name}"{hint}')
            names = None
    under = chk.money(f"{path}.under_usd", raw["under_usd"]) if "under_usd" in raw else None
    period_max = under
    if "period_max_usd" in raw:
        period_max = chk.money(f"{path}.period_max_usd", raw["period_max_usd"])
        if period_max is not None and under is not None and period_max < under:
            chk.error(
                f"{path}.period_max_usd",
                "must be at least under_usd (it bounds what auto-approval grants per period)",
            )
            return None
    if names is None or under is None or period_max is None:
        return None
    return AutoApprove(frozenset(names), under, period_max)


def merged_topups(base: Topups, overrides: Mapping[str, Any]) -> Topups:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **clean) if clean else base
