"""The budget policy: workspaces, their money, teams, services and rate limits, from YAML.

The policy decides who may spend how much, so a mistake in it must never be guessed
around: every unknown field, ill-typed value or dangling reference is an error naming the
exact field path, and all of them are reported at once so one edit fixes the file. Money
is parsed with Decimal and kept in integer nano-dollars; soft and hard limits are exact
fractions of the budget, rounded down, so the enforced figure is the one on paper.

Built-in defaults (overridable under `defaults:` and per workspace): period month, soft
limit 75%, hard limit 110% of the budget, 4096 output tokens reserved when a request sets
no cap, and failing closed when Redis is down.

Rate limits under `key_rate_limits` are inherited field by field (defaults -> workspace ->
service), so a service that only sets `rpm` keeps the inherited `tpm`; an explicit `null`
lifts an inherited limit. Workspace, team and service `rate_limits` are shared by everyone
inside them and are not inherited.

The optional `routing:` section holds the cost-shaping vocabulary (model aliases, price
tiers, the step-down ladder, ordered rules, upstream route names); per-level `routing:`
settings (allowed models, ceiling, default model, degrading, overdraft, context caps) are
inherited like `key_rate_limits`. Names a rule refers to must exist, because a typo would
silently switch a rule off; a model the price table does not know is only a warning, since
new models appear before the price table is updated. `extproc.routing.decide` applies all of it.
"""

from __future__ import annotations

import dataclasses
import zoneinfo
from collections.abc import Iterable, Mapping
from decimal import ROUND_FLOOR, Decimal, localcontext
from pathlib import Path
from typing import Any

import yaml

from extproc.governance.passthrough import DEFAULT as DEFAULT_PASSTHROUGH
from extproc.governance.passthrough import PassthroughPolicy, parse_passthrough
from extproc.governance.policy.access_config import parse_approvers, parse_console
from extproc.governance.policy.check import (
    _Checker,
    _did_you_mean,
    _Loader,
    _pct,
    _shown,
    node_lines,
    with_line,
)
from extproc.governance.policy.halt_config import (
    breaker_overrides,
    merged_breaker,
    merged_topups,
    topup_overrides,
)
from extproc.governance.policy.model import (
    _DEFAULT_FIELDS,
    _DEFAULTS,
    _ENV_NAME,
    _FEATURE_SECTIONS,
    _PLAIN_DECIMAL,
    _SERVICE_FIELDS,
    _TEAM_FIELDS,
    _TOP,
    _UPSTREAM_FIELDS,
    _WORKSPACE_FIELDS,
    ALERT_EVENTS,
    MAX_BURN_MULTIPLE,
    ON_REDIS_DOWN,
    PERIODS,
    VERSION,
    Breaker,
    Policy,
    PolicyError,
    RateLimits,
    Routing,
    RoutingSettings,
    Service,
    Team,
    Topups,
    Upstream,
    Webhook,
    Workspace,
)
from extproc.governance.policy.routing_config import (
    _merged_routing,
    _routing,
    _scope_routing,
    _scopes,
)
from extproc.governance.pricing import DEFAULT as DEFAULT_PRICING
from extproc.governance.pricing import PricingPolicy, parse_pricing
from extproc.metering.prices import NANOS_PER_DOLLAR, PriceTable

DEFAULT_BREAKER, DEFAULT_TOPUPS = Breaker(), Topups()


def _merge_limits(base: RateLimits | None, override: Mapping[str, int | None]) -> RateLimits | None:
    merged = {"rpm": base.rpm if base else None, "tpm": base.tpm if base else None}
    merged.update(override)
    limits = RateLimits(**merged)
    return None if limits == RateLimits() else limits


def _scaled(budget_nanos: int, share: Decimal) -> int:
    with localcontext() as ctx:
        ctx.prec = 80
        return int((budget_nanos * share).to_integral_value(rounding=ROUND_FLOOR))


def _upstream(chk: _Checker, path: str, value: Any) -> Upstream | None:
    raw = chk.mapping(path, value, _UPSTREAM_FIELDS)
    if isinstance(value, dict) and ("key_env" in raw) == ("key_file" in raw):
        chk.error(path, "set exactly one of key_env or key_file")
        return None
    key_env = key_file = base_url = None
    if "key_env" in raw:
        key_env = chk.text(f"{path}.key_env", raw["key_env"])
        if key_env is not None and not _ENV_NAME.fullmatch(key_env):
            chk.error(f"{path}.key_env", f"not an environment variable name: {_shown(key_env)}")
    if "key_file" in raw:
        key_file = chk.text(f"{path}.key_file", raw["key_file"])
        if key_file is not None:
            key_file = str(chk.base_dir / Path(key_file).expanduser())
    if raw.get("base_url") is not None:
        base_url = chk.url(f"{path}.base_url", raw["base_url"])
    project_id = None
    if raw.get("project_id") is not None:
        project_id = chk.text(f"{path}.project_id", raw["project_id"])
    if not isinstance(value, dict):
        return None
    return Upstream(key_env=key_env, key_file=key_file, base_url=base_url, project_id=project_id)


def _settings(chk: _Checker, path: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The period / limit / cap / failure-mode fields present in `raw`, validated."""
    out: dict[str, Any] = {}
    if "period" in raw:
        out["period"] = chk.choice(f"{path}.period", raw["period"], PERIODS)
    for name in ("soft_limit", "hard_limit"):
        if name in raw:
            out[name] = chk.fraction(f"{path}.{name}", raw[name])
    if "default_output_cap" in raw:
        out["default_output_cap"] = chk.positive_int(
            f"{path}.default_output_cap", raw["default_output_cap"]
        )
    if "enforce_output_cap" in raw:
        out["enforce_output_cap"] = chk.flag(
            f"{path}.enforce_output_cap", raw["enforce_output_cap"]
        )
    if "on_redis_down" in raw:
        out["on_redis_down"] = chk.choice(
            f"{path}.on_redis_down", raw["on_redis_down"], ON_REDIS_DOWN
        )
    if "burn_alert_multiple" in raw:
        out["burn_alert_multiple"] = _burn_multiple(
            chk, f"{path}.burn_alert_multiple", raw["burn_alert_multiple"]
        )
    if "burn_alert_min_usd" in raw:
        out["burn_alert_min_usd"] = _burn_floor(
            chk, f"{path}.burn_alert_min_usd", raw["burn_alert_min_usd"]
        )
    return out


def _burn_multiple(chk: _Checker, path: str, value: Any) -> Decimal | None:
    """How many usual days today may be heading for before it alerts: above 1, at most 100."""
    multiple: Decimal | None = None
    if isinstance(value, Decimal) and value.is_finite():
        multiple = value
    elif isinstance(value, int) and not isinstance(value, bool):
        multiple = Decimal(value)
    elif isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
        multiple = Decimal(value.strip())
    if multiple is None or not 1 < multiple <= MAX_BURN_MULTIPLE:
        chk.error(
            path,
            f"must be a number above 1 and at most {MAX_BURN_MULTIPLE} (3 alerts at three "
            f"times the usual daily spend), got {_shown(value)}",
        )
        return None
    return multiple


def _burn_floor(chk: _Checker, path: str, value: Any) -> Decimal | None:
    """While less than this is spent today, nothing alerts; 0 means any amount."""
    if isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value.strip()):
        number: Any = Decimal(value.strip())
    else:
        number = None if isinstance(value, bool) else value
    if isinstance(number, int | Decimal) and number == 0:
        return Decimal(0)
    nanos = chk.money(path, value)
    return None if nanos is None else Decimal(nanos) / NANOS_PER_DOLLAR


def _check_order(
    chk: _Checker,
    path: str,
    own: Mapping[str, Any],
    soft: Decimal | None,
    hard: Decimal | None,
    inherited: Mapping[str, Any],
) -> None:
    """hard >= soft, reported at the field that was changed: the one this level set, or of
    two set here, the one that differs from what it would inherit (hard_limit if both do)."""
    if soft is None or hard is None or hard >= soft:
        return
    here = [f for f in ("soft_limit", "hard_limit") if f in own]
    changed = [f for f in here if own[f] != inherited.get(f)]
    where = changed[0] if len(changed) == 1 else here[-1] if here else "hard_limit"
    if where == "soft_limit":
        message = f"soft_limit ({_pct(soft)}) must be <= hard_limit ({_pct(hard)})"
    else:
        message = f"hard_limit ({_pct(hard)}) must be >= soft_limit ({_pct(soft)})"
    chk.error(f"{path}.{where}", message)


def _timezone(chk: _Checker, value: Any) -> zoneinfo.ZoneInfo:
    utc = zoneinfo.ZoneInfo("UTC")
    if value is None:
        return utc
    if not isinstance(value, str) or not value.strip():
        chk.error(
            "timezone", f'must be an IANA time zone name like "Europe/Berlin", got {_shown(value)}'
        )
        return utc
    try:
        return zoneinfo.ZoneInfo(value.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        hint = _did_you_mean(value.strip(), zoneinfo.available_timezones())
        chk.error("timezone", f"unknown IANA time zone {_shown(value)}{hint}")
        return utc


def _teams(chk: _Checker, ws: str, value: Any, budget: int | None) -> dict[str, Team]:
    teams: dict[str, Team] = {}
    for name, body in chk.named(f"workspaces.{ws}.teams", value).items():
        path = f"workspaces.{ws}.teams.{name}"
        raw = chk.mapping(path, body, _TEAM_FIELDS)
        own_budget = chk.optional_money(path, raw)
        limits = _merge_limits(None, chk.rate_fields(f"{path}.rate_limits", raw.get("rate_limits")))
        contact = chk.text(f"{path}.contact", raw["contact"]) if "contact" in raw else None
        approvers = parse_approvers(chk, f"{path}.approvers", raw.get("approvers"))
        teams[name] = Team(name, own_budget, limits, contact, approvers)
        if budget and own_budget and own_budget > budget:
            chk.warnings.append(f"{path}.budget_usd: larger than the budget of workspace {ws}")
    return teams


def _services(
    chk: _Checker,
    ws: str,
    value: Any,
    budget: int | None,
    teams: Mapping[str, Team],
    key_limits: RateLimits | None,
    routing: Routing,
    ws_routing: RoutingSettings,
    ws_breaker: Breaker = DEFAULT_BREAKER,
) -> dict[str, Service]:
    services: dict[str, Service] = {}
    for name, body in chk.named(f"workspaces.{ws}.services", value).items():
        path = f"workspaces.{ws}.services.{name}"
        raw = chk.mapping(path, body, _SERVICE_FIELDS)
        team = None
        if raw.get("team") is not None:
            team = chk.text(f"{path}.team", raw["team"])
            if team is not None and team not in teams:
                known = f"teams in {ws}: {', '.join(teams)}" if teams else f"{ws} has no teams"
                chk.error(f"{path}.team", f'unknown team "{team}" ({known})')
        own_budget = chk.optional_money(path, raw)
        limits = _merge_limits(None, chk.rate_fields(f"{path}.rate_limits", raw.get("rate_limits")))
        own_keys = chk.rate_fields(f"{path}.key_rate_limits", raw.get("key_rate_limits"))
        own_routing = _scope_routing(chk, f"{path}.routing", raw.get("routing"), routing)
        own_breaker = breaker_overrides(chk, f"{path}.breaker", raw.get("breaker"))
        services[name] = Service(
            name,
            team,
            own_budget,
            limits,
            _merge_limits(key_limits, own_keys),
            _merged_routing(chk, f"{path}.routing", own_routing, ws_routing, routing),
            merged_breaker(ws_breaker, own_breaker),
        )
        if budget and own_budget and own_budget > budget:
            chk.warnings.append(f"{path}.budget_usd: larger than the budget of workspace {ws}")
        team_budget = teams[team].budget_nanos if team in teams else None
        if team_budget and own_budget and own_budget > team_budget:
            chk.warnings.append(f"{path}.budget_usd: larger than the budget of team {team}")
    return services


def _workspace(
    chk: _Checker,
    name: str,
    value: Any,
    defaults: Mapping[str, Any],
    default_key_limits: RateLimits | None,
    routing: Routing,
    default_routing: RoutingSettings,
    default_passthrough: PassthroughPolicy = DEFAULT_PASSTHROUGH,
    default_pricing: PricingPolicy = DEFAULT_PRICING,
    default_topups: Topups = DEFAULT_TOPUPS,
    default_breaker: Breaker = DEFAULT_BREAKER,
) -> Workspace | None:
    path = f"workspaces.{name}"
    before = len(chk.problems)
    raw = chk.mapping(path, value, _WORKSPACE_FIELDS, required=("budget_usd", "upstream"))
    budget = chk.optional_money(path, raw)
    own = _settings(chk, path, raw)
    merged = {**_DEFAULTS, **defaults, **own}
    soft, hard = merged["soft_limit"], merged["hard_limit"]
    if {"soft_limit", "hard_limit"} & own.keys():
        _check_order(chk, path, own, soft, hard, {**_DEFAULTS, **defaults})
    upstream = _upstream(chk, f"{path}.upstream", raw["upstream"]) if "upstream" in raw else None
    rate_limits = _merge_limits(
        None, chk.rate_fields(f"{path}.rate_limits", raw.get("rate_limits"))
    )
    own_keys = chk.rate_fields(f"{path}.key_rate_limits", raw.get("key_rate_limits"))
    key_limits = _merge_limits(default_key_limits, own_keys)
    own_routing = _scope_routing(chk, f"{path}.routing", raw.get("routing"), routing)
    ws_routing = _merged_routing(chk, f"{path}.routing", own_routing, default_routing, routing)
    passthrough = parse_passthrough(
        f"{path}.passthrough", raw.get("passthrough"), default_passthrough, chk.error
    )
    pricing = parse_pricing(f"{path}.pricing", raw.get("pricing"), default_pricing, chk.error)
    teams = _teams(chk, name, raw.get("teams"), budget)
    ws_breaker = merged_breaker(
        default_breaker, breaker_overrides(chk, f"{path}.breaker", raw.get("breaker"))
    )
    services = _services(
        chk, name, raw.get("services"), budget, teams, key_limits, routing, ws_routing, ws_breaker
    )
    service_names = list(raw["services"]) if isinstance(raw.get("services"), dict) else []
    topups = merged_topups(
        default_topups,
        topup_overrides(chk, f"{path}.topups", raw.get("topups"), service_names),
    )
    if isinstance(value, dict) and not services:
        chk.warnings.append(f"{path}.services: none defined, so no keys can be issued here")
    approvers = parse_approvers(chk, f"{path}.approvers", raw.get("approvers"))
    if len(chk.problems) > before or budget is None or upstream is None:
        return None
    return Workspace(
        name=name,
        budget_nanos=budget,
        period=merged["period"],
        soft_nanos=_scaled(budget, soft),
        hard_nanos=_scaled(budget, hard),
        default_output_cap=merged["default_output_cap"],
        enforce_output_cap=bool(merged["enforce_output_cap"]),
        on_redis_down=merged["on_redis_down"],
        upstream=upstream,
        rate_limits=rate_limits,
        key_rate_limits=key_limits,
        teams=teams,
        services=services,
        routing=ws_routing,
        burn_alert_multiple=merged["burn_alert_multiple"],
        burn_alert_min_nanos=int(merged["burn_alert_min_usd"] * NANOS_PER_DOLLAR),
        contact=chk.text(f"{path}.contact", raw["contact"]) if "contact" in raw else None,
        passthrough=passthrough,
        pricing=pricing,
        approvers=approvers,
        topups=topups,
        breaker=ws_breaker,
    )


def _webhooks(chk: _Checker, value: Any) -> tuple[Webhook, ...]:
    raw = chk.mapping("alerts", value, ("webhooks",))
    hooks = raw.get("webhooks")
    if hooks is None:
        return ()
    if not isinstance(hooks, list):
        chk.error("alerts.webhooks", f"must be a list of webhooks, got {_shown(hooks)}")
        return ()
    out = []
    for i, body in enumerate(hooks):
        path = f"alerts.webhooks[{i}]"
        hraw = chk.mapping(path, body, ("url", "events"), required=("url",))
        url = chk.url(f"{path}.url", hraw["url"]) if "url" in hraw else None
        events = ALERT_EVENTS
        if "events" in hraw:
            listed = hraw["events"]
            if not isinstance(listed, list) or not listed:
                chk.error(
                    f"{path}.events",
                    f"must be a non-empty list of {', '.join(sorted(ALERT_EVENTS))} "
                    f"(omit it for all), got {_shown(listed)}",
                )
            else:
                for event in listed:
                    if event not in ALERT_EVENTS:
                        hint = _did_you_mean(str(event), ALERT_EVENTS)
                        chk.error(
                            f"{path}.events",
                            f"unknown event {_shown(event)}{hint} "
                            f"(events: {', '.join(sorted(ALERT_EVENTS))})",
                        )
                events = frozenset(e for e in listed if e in ALERT_EVENTS)
        if url is not None:
            out.append(Webhook(url, events))
    return tuple(out)


def _service_names(raw: Any) -> dict[str, tuple[str, ...]]:
    """Each workspace's service names as written (valid or not: their own problems are
    reported where they are, not again as dangling references)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, body in (raw if isinstance(raw, dict) else {}).items():
        services = body.get("services") if isinstance(body, dict) else None
        out[str(name)] = tuple(str(s) for s in services) if isinstance(services, dict) else ()
    return out


def parse_policy(
    doc: Any,
    source: str = "policy.yaml",
    base_dir: Path | None = None,
    *,
    prices: PriceTable | None = None,
) -> Policy:
    """A Policy from an already-parsed YAML document (a dict), or PolicyError.

    `prices` (default: the bundled table) only decides which model names earn a warning.
    """
    chk = _Checker(base_dir or Path.cwd(), prices)
    raw = chk.mapping("", doc, _TOP, required=("version", "workspaces"), features=_FEATURE_SECTIONS)
    routing = _routing(chk, raw.get("routing"), _scopes(chk, raw.get("workspaces")))
    if "version" in raw and (isinstance(raw["version"], bool) or raw["version"] != VERSION):
        chk.error("version", f"unsupported version {_shown(raw['version'])} (this extproc reads 1)")
    tz = _timezone(chk, raw.get("timezone"))
    draw = chk.mapping("defaults", raw.get("defaults"), _DEFAULT_FIELDS)
    defaults = _settings(chk, "defaults", draw)
    base = {**_DEFAULTS, **defaults}
    _check_order(chk, "defaults", defaults, base["soft_limit"], base["hard_limit"], _DEFAULTS)
    default_keys = _merge_limits(
        None, chk.rate_fields("defaults.key_rate_limits", draw.get("key_rate_limits"))
    )
    own_routing = _scope_routing(chk, "defaults.routing", draw.get("routing"), routing)
    default_routing = _merged_routing(
        chk, "defaults.routing", own_routing, RoutingSettings(), routing
    )
    default_passthrough = parse_passthrough(
        "defaults.passthrough", draw.get("passthrough"), DEFAULT_PASSTHROUGH, chk.error
    )
    default_pricing = parse_pricing(
        "defaults.pricing", draw.get("pricing"), DEFAULT_PRICING, chk.error
    )
    default_topups = merged_topups(
        Topups(), topup_overrides(chk, "defaults.topups", draw.get("topups"), None)
    )
    default_breaker = merged_breaker(
        Breaker(), breaker_overrides(chk, "defaults.breaker", draw.get("breaker"))
    )
    workspaces: dict[str, Workspace] = {}
    if "workspaces" in raw and raw["workspaces"] in (None, {}):
        chk.error("workspaces", "must define at least one workspace")
    valid_defaults = {k: v for k, v in defaults.items() if v is not None}
    for name, body in chk.named("workspaces", raw.get("workspaces")).items():
        ws = _workspace(
            chk,
            name,
            body,
            valid_defaults,
            default_keys,
            routing,
            default_routing,
            default_passthrough,
            default_pricing,
            default_topups,
            default_breaker,
        )
        if ws is not None:
            workspaces[name] = ws
    webhooks = _webhooks(chk, raw.get("alerts"))
    console = parse_console(chk, raw.get("console"), _service_names(raw.get("workspaces")))
    if chk.problems:
        raise PolicyError([f"{source}: {p}" for p in chk.problems])
    return Policy(
        version=VERSION,
        timezone=tz,
        workspaces=workspaces,
        webhooks=webhooks,
        source=source,
        warnings=tuple(f"{source}: {w}" for w in chk.warnings),
        routing=routing,
        console=console,
    )


def load_policy(path: str | Path, *, prices: PriceTable | None = None) -> Policy:
    """Read and validate a policy file; PolicyError lists every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise PolicyError([f"{source}: not UTF-8 text"]) from None
    return parse_policy_text(text, source, Path(path).resolve().parent, prices=prices)


def parse_policy_text(
    text: str,
    source: str = "policy.yaml",
    base_dir: Path | None = None,
    *,
    prices: PriceTable | None = None,
) -> Policy:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        doc = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{source}: not valid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    duplicates = [f"{source}: {d}" for d in loader.duplicates]
    if doc is None:
        raise PolicyError([f"{source}: empty file (expected version: 1 and workspaces:)"])
    lines = node_lines(node)
    prefix = f"{source}: "

    def located(messages: Iterable[str]) -> list[str]:
        """Each problem or warning with the line of the field it names, for the editor."""
        return [
            prefix + with_line(m.removeprefix(prefix), lines) if m.startswith(prefix) else m
            for m in messages
        ]

    try:
        policy = parse_policy(doc, source, base_dir, prices=prices)
    except PolicyError as exc:
        raise PolicyError([*duplicates, *located(exc.problems)]) from None
    if duplicates:
        raise PolicyError(duplicates)
    return dataclasses.replace(policy, warnings=tuple(located(policy.warnings)))
