"""The policy's people: the `console:` section and each scope's `approvers:`, validated.

Group names and people are the identity provider's words, not ours: any non-empty string is
accepted (an Azure group is a GUID, an Okta group may have spaces), but every list must be a
list, every role and field must be known, and a personal-key grant may only name workspaces
and services the policy defines, since a typo there would silently grant nothing (or, for a
service list, something else than meant).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.governance.policy.check import _Checker, _did_you_mean, _shown
from extproc.governance.policy.model import (
    _APPROVER_FIELDS,
    _CONSOLE_FIELDS,
    _PERSONAL_KEY_FIELDS,
    CONSOLE_ROLES,
    DEFAULT_ROLES_CLAIM,
    MAX_PERSONAL_KEY_DAYS,
    Approvers,
    ConsoleAccess,
    PersonalKeyGrant,
)

MAX_NAME = 256
DEFAULT_PERSONAL_KEY_DAYS = 90


def _names(chk: _Checker, path: str, value: Any) -> tuple[str, ...]:
    """A list of group names or people: strings of at most MAX_NAME printable characters."""
    if not isinstance(value, list):
        chk.error(path, f"must be a list like [platform-admins], got {_shown(value)}")
        return ()
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            chk.error(f"{path}[{i}]", f"must be a non-empty string, got {_shown(item)}")
        elif len(item) > MAX_NAME or not item.isprintable():
            chk.error(f"{path}[{i}]", f"must be printable and at most {MAX_NAME} characters")
        else:
            out.append(item.strip())
    return tuple(out)


def parse_approvers(chk: _Checker, path: str, value: Any) -> Approvers | None:
    """`approvers: {people: [ana@example.com], groups: [leads-dev], webhook: URL}`; null:
    nobody. The webhook (optional) is where their scope's top-up requests are announced."""
    if value is None:
        return None
    raw = chk.mapping(path, value, _APPROVER_FIELDS)
    if isinstance(value, dict) and not raw.get("people") and not raw.get("groups"):
        if not any(p.startswith(f"{path}.") for p in chk.problems):
            chk.error(path, "name at least one of people or groups (omit approvers for nobody)")
        return None
    people = _names(chk, f"{path}.people", raw["people"]) if "people" in raw else ()
    groups = _names(chk, f"{path}.groups", raw["groups"]) if "groups" in raw else ()
    webhook = chk.url(f"{path}.webhook", raw["webhook"]) if "webhook" in raw else None
    return Approvers(frozenset(p.lower() for p in people), frozenset(groups), webhook)


def _claim(chk: _Checker, value: Any) -> str:
    text = chk.text("console.roles_claim", value)
    if text is None:
        return DEFAULT_ROLES_CLAIM
    if len(text) > MAX_NAME or not text.isprintable():
        chk.error("console.roles_claim", f"must be a claim name of at most {MAX_NAME} characters")
        return DEFAULT_ROLES_CLAIM
    return text


def _roles(chk: _Checker, value: Any) -> dict[str, frozenset[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        chk.error(
            "console.roles",
            f"must map roles to groups like {{admin: [platform-admins]}}, got {_shown(value)}",
        )
        return {}
    out: dict[str, frozenset[str]] = {}
    for role, groups in value.items():
        path = f"console.roles.{role}"
        if role not in CONSOLE_ROLES:
            hint = _did_you_mean(str(role), CONSOLE_ROLES)
            hint = hint or f" (roles: {', '.join(CONSOLE_ROLES)})"
            chk.error(path, f"unknown role {_shown(role)}{hint}")
            continue
        out[role] = frozenset(_names(chk, path, groups))
    return out


def _max_days(chk: _Checker, path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        chk.error(path, f"must be a whole number of days, 1 to {MAX_PERSONAL_KEY_DAYS}")
        return DEFAULT_PERSONAL_KEY_DAYS
    if value > MAX_PERSONAL_KEY_DAYS:
        chk.error(path, f"must be at most {MAX_PERSONAL_KEY_DAYS} days, got {value}")
        return MAX_PERSONAL_KEY_DAYS
    return value


def _grant(
    chk: _Checker, path: str, value: Any, services: Mapping[str, tuple[str, ...]]
) -> PersonalKeyGrant | None:
    raw = chk.mapping(path, value, _PERSONAL_KEY_FIELDS, required=("groups", "workspace"))
    groups = _names(chk, f"{path}.groups", raw["groups"]) if "groups" in raw else ()
    if "groups" in raw and not groups and isinstance(raw["groups"], list):
        chk.error(f"{path}.groups", "must name at least one group")
    workspace = chk.text(f"{path}.workspace", raw["workspace"]) if "workspace" in raw else None
    known: tuple[str, ...] = ()
    if workspace is not None:
        if workspace not in services:
            hint = _did_you_mean(workspace, services) or f" (workspaces: {', '.join(services)})"
            chk.error(f"{path}.workspace", f'unknown workspace "{workspace}"{hint}')
            workspace = None
        else:
            known = services[workspace]
    chosen = known
    if "services" in raw and workspace is not None:
        listed = chk.strings(f"{path}.services", raw["services"])
        for i, name in enumerate(listed or ()):
            if name not in known:
                hint = _did_you_mean(name, known) or f" (services: {', '.join(known) or 'none'})"
                chk.error(f"{path}.services[{i}]", f'unknown service "{name}" in {workspace}{hint}')
        chosen = tuple(listed or ())
    days = DEFAULT_PERSONAL_KEY_DAYS
    if "max_days" in raw:
        days = _max_days(chk, f"{path}.max_days", raw["max_days"])
    if not groups or workspace is None or not chosen:
        return None
    return PersonalKeyGrant(frozenset(groups), workspace, chosen, days)


def parse_console(
    chk: _Checker, value: Any, services: Mapping[str, tuple[str, ...]]
) -> ConsoleAccess:
    """The `console:` section; `services` are each valid workspace's service names."""
    raw = chk.mapping("console", value, _CONSOLE_FIELDS)
    claim = _claim(chk, raw["roles_claim"]) if "roles_claim" in raw else DEFAULT_ROLES_CLAIM
    roles = _roles(chk, raw.get("roles"))
    grants: list[PersonalKeyGrant] = []
    listed = raw.get("personal_keys")
    if listed is not None and not isinstance(listed, list):
        chk.error(
            "console.personal_keys",
            f"must be a list of grants like [{{groups: [developers], workspace: dev}}], "
            f"got {_shown(listed)}",
        )
    for i, body in enumerate(listed if isinstance(listed, list) else ()):
        grant = _grant(chk, f"console.personal_keys[{i}]", body, services)
        if grant is not None:
            grants.append(grant)
    return ConsoleAccess(roles_claim=claim, roles=roles, personal_keys=tuple(grants))
