"""The `routing:` section of a policy: aliases, tiers, the ladder, rules, upstream routes,
and the per-level routing settings inherited like `key_rate_limits`.

Names a rule refers to must exist, because a typo would silently switch a rule off; a
model the price table does not know is only a warning, since new models appear before
the price table is updated. `extproc.routing.decide` applies all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from extproc.governance.policy.check import _Checker, _did_you_mean, _shown
from extproc.governance.policy.model import (
    _LIFTABLE,
    _MATCH_COUNTS,
    _MATCH_FIELDS,
    _MATCH_FLAGS,
    _MATCH_LISTS,
    _MODEL_NAME,
    _ROUTING_FIELDS,
    _RULE_FIELDS,
    _SCOPE_ROUTING_FIELDS,
    _SET_FIELDS,
    CONTEXT_ACTIONS,
    DEFAULT_MODEL,
    EFFORTS,
    ENDPOINT_NAMES,
    NAME_PATTERN,
    Overdraft,
    Routing,
    RoutingSettings,
    Rule,
    RuleChanges,
    RuleMatch,
    UpstreamRoute,
    model_key,
)


def _routing(chk: _Checker, value: Any, scopes: _Scopes) -> Routing:
    raw = chk.mapping("routing", value, _ROUTING_FIELDS)
    routes = _upstream_routes(chk, raw.get("upstream_routes"))
    tiers = _tiers(chk, raw.get("tiers"))
    aliases = _aliases(chk, raw.get("aliases"))
    tier_of = {model_key(m): i for i, tier in enumerate(tiers) for m in tier}
    ladder = _ladder(chk, raw.get("ladder"), tier_of)
    rules = _rules(chk, raw.get("rules"), aliases, routes, scopes)
    return Routing(aliases, tiers, ladder, rules, routes)


def _upstream_routes(chk: _Checker, value: Any) -> dict[str, UpstreamRoute]:
    routes = {}
    for name, body in chk.named("routing.upstream_routes", value).items():
        path = f"routing.upstream_routes.{name}"
        raw = chk.mapping(path, body, ("description",))
        description = None
        if raw.get("description") is not None:
            description = chk.text(f"{path}.description", raw["description"])
        routes[name] = UpstreamRoute(name, description)
    return routes


def _tiers(chk: _Checker, value: Any) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        chk.error("routing.tiers", f"must be a list of model lists, got {_shown(value)}")
        return ()
    seen: dict[str, int] = {}
    tiers = []
    for i, tier in enumerate(value):
        path = f"routing.tiers[{i}]"
        if not isinstance(tier, list) or not tier:
            chk.error(path, f"must be a non-empty list of models, got {_shown(tier)}")
            continue
        names = []
        for j, item in enumerate(tier):
            name = chk.model(f"{path}[{j}]", item)
            if name is None:
                continue
            if model_key(name) in seen:
                chk.error(
                    f"{path}[{j}]",
                    f"model {_shown(name)} is already in tier {seen[model_key(name)]}",
                )
                continue
            seen[model_key(name)] = i
            names.append(name)
        tiers.append(tuple(names))
    return tuple(tiers)


def _model_keys(chk: _Checker, path: str, value: Any) -> dict[str, Any]:
    """A mapping keyed by model ids (aliases, ladder), with each key checked."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        chk.error(path, f"must be a mapping of model names, got {_shown(value)}")
        return {}
    out: dict[str, Any] = {}
    keys: set[str] = set()
    for key, item in value.items():
        if not isinstance(key, str) or not _MODEL_NAME.fullmatch(key):
            chk.error(path, f"not a model name: {_shown(key)} (quote it if it is)")
        elif model_key(key) in keys:
            chk.error(f"{path}.{key}", "listed twice (names compare case-insensitively)")
        else:
            keys.add(model_key(key))
            out[key] = item
    return out


def _aliases(chk: _Checker, value: Any) -> dict[str, str]:
    raw = _model_keys(chk, "routing.aliases", value)
    aliases = {}
    for alias, target in raw.items():
        path = f"routing.aliases.{alias}"
        if alias == DEFAULT_MODEL:
            chk.error(path, f'"{DEFAULT_MODEL}" is built in: it means the caller\'s default_model')
            continue
        name = chk.model(path, target, default_ok=True)
        if name is not None:
            aliases[alias] = name
    for alias, target in aliases.items():
        if target in aliases:
            chk.error(
                f"routing.aliases.{alias}",
                f"points at another alias ({_shown(target)}); aliases resolve once, so name "
                f"the model ({_shown(aliases[target])})",
            )
    return aliases


def _ladder(chk: _Checker, value: Any, tier_of: Mapping[str, int]) -> dict[str, str]:
    raw = _model_keys(chk, "routing.ladder", value)
    ladder: dict[str, str] = {}
    for model, target in raw.items():
        path = f"routing.ladder.{model}"
        chk.model(path, model)
        cheaper = chk.model(path, target)
        if cheaper is None:
            continue
        if model_key(cheaper) == model_key(model):
            chk.error(path, "steps down to itself")
            continue
        here, there = tier_of.get(model_key(model)), tier_of.get(model_key(cheaper))
        if here is not None and there is not None and there < here:
            chk.error(path, f"climbs from tier {here} to tier {there}; a ladder only steps down")
            continue
        ladder[model] = cheaper
    down = {model_key(k): model_key(v) for k, v in ladder.items()}
    reported: set[frozenset[str]] = set()
    for start in ladder:
        path, node = [model_key(start)], down.get(model_key(start))
        while node is not None and node not in path:
            path.append(node)
            node = down.get(node)
        if node == model_key(start) and frozenset(path) not in reported:
            reported.add(frozenset(path))
            chk.error(f"routing.ladder.{start}", f"loops: {' -> '.join([*path, node])}")
    return ladder


def _rules(
    chk: _Checker,
    value: Any,
    aliases: Mapping[str, str],
    routes: Mapping[str, UpstreamRoute],
    scopes: _Scopes,
) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        chk.error("routing.rules", f"must be a list of rules, got {_shown(value)}")
        return ()
    rules: list[Rule] = []
    names: dict[str, int] = {}
    catch_all: tuple[int, str] | None = None
    for i, body in enumerate(value):
        path = f"routing.rules[{i}]"
        raw = chk.mapping(path, body, _RULE_FIELDS, required=("name", "set"))
        name = None
        if "name" in raw:
            name = chk.text(f"{path}.name", raw["name"])
            if name is not None and not NAME_PATTERN.fullmatch(name):
                chk.error(f"{path}.name", "must be 1-64 letters, digits, '-' or '_'")
                name = None
            elif name is not None and name in names:
                chk.error(f"{path}.name", f'"{name}" is already the name of rules[{names[name]}]')
                name = None
        when = _rule_match(chk, f"{path}.when", raw.get("when"), aliases, scopes)
        changes = _rule_changes(chk, f"{path}.set", raw.get("set"), aliases, routes)
        if catch_all is not None and isinstance(body, dict):
            chk.warnings.append(
                f"{path}: never reached: rules[{catch_all[0]}] ({catch_all[1]}) matches every "
                "request"
            )
        if name is None or when is None or changes is None:
            continue
        names[name] = i
        if when == RuleMatch() and catch_all is None:
            catch_all = (i, name)
        rules.append(Rule(name, when, changes))
    return tuple(rules)


def _rule_match(
    chk: _Checker, path: str, value: Any, aliases: Mapping[str, str], scopes: _Scopes
) -> RuleMatch | None:
    before = len(chk.problems)
    raw = chk.mapping(path, value, _MATCH_FIELDS)
    found: dict[str, Any] = {}
    choices = {"endpoint": ENDPOINT_NAMES, "reasoning_effort": EFFORTS}
    for key in _MATCH_LISTS:
        if key in raw:
            found[key] = chk.strings(f"{path}.{key}", raw[key], choices.get(key))
    for key in _MATCH_FLAGS:
        if key in raw:
            found[key] = chk.flag(f"{path}.{key}", raw[key])
    for key in _MATCH_COUNTS:
        if key in raw:
            found[key] = chk.count(f"{path}.{key}", raw[key])
    _check_scope_names(chk, path, found, scopes)
    if found.get("model"):
        for j, model in enumerate(found["model"]):
            if model in aliases:
                chk.error(
                    f"{path}.model[{j}]",
                    f"{_shown(model)} is an alias and rules see models after aliases are "
                    f"resolved; match {_shown(aliases[model])}",
                )
            else:
                chk.model(f"{path}.model[{j}]", model)
        found["model"] = tuple(dict.fromkeys(model_key(m) for m in found["model"]))
    if found.get("task"):
        found["task"] = tuple(t.lower() for t in found["task"])
    over, under = found.get("input_tokens_over"), found.get("input_tokens_under")
    if over is not None and under is not None and under - over < 2:
        chk.error(
            f"{path}.input_tokens_under",
            f"no token count is over {over} and under {under}: the rule never matches",
        )
    if len(chk.problems) > before:
        return None
    return RuleMatch(**found)


def _rule_changes(
    chk: _Checker,
    path: str,
    value: Any,
    aliases: Mapping[str, str],
    routes: Mapping[str, UpstreamRoute],
) -> RuleChanges | None:
    before = len(chk.problems)
    raw = chk.mapping(path, value, _SET_FIELDS)
    found: dict[str, Any] = {}
    if "model" in raw:
        model = chk.model(f"{path}.model", raw["model"])
        if model is not None and model in aliases:
            chk.error(
                f"{path}.model",
                f"{_shown(model)} is an alias; name the model ({_shown(aliases[model])})",
            )
        found["model"] = model
    if "reasoning_effort" in raw:
        found["reasoning_effort"] = chk.choice(
            f"{path}.reasoning_effort", raw["reasoning_effort"], EFFORTS
        )
    if "max_output_tokens" in raw:
        found["max_output_tokens"] = chk.positive_int(
            f"{path}.max_output_tokens", raw["max_output_tokens"]
        )
    if "route" in raw:
        route = chk.text(f"{path}.route", raw["route"])
        if route is not None and route not in routes:
            known = ", ".join(routes) or "none defined"
            hint = _did_you_mean(route, routes)
            chk.error(
                f"{path}.route",
                f"unknown route {_shown(route)}{hint} (routing.upstream_routes: {known})",
            )
        found["route"] = route
    if len(chk.problems) > before:
        return None
    return RuleChanges(**found)


_Scopes = Mapping[str, tuple[set[str], set[str]]]  # workspace -> (teams, services)


def _scopes(chk: _Checker, raw_workspaces: Any) -> dict[str, tuple[set[str], set[str]]]:
    """Workspace, team and service names as written, for checking the names rules use."""
    known: dict[str, tuple[set[str], set[str]]] = {}
    for name, body in chk.named("workspaces", raw_workspaces).items():
        body = body if isinstance(body, dict) else {}
        teams, services = body.get("teams"), body.get("services")
        known[name] = (
            {k for k in teams if isinstance(k, str)} if isinstance(teams, dict) else set(),
            {k for k in services if isinstance(k, str)} if isinstance(services, dict) else set(),
        )
    return known


def _check_scope_names(chk: _Checker, path: str, found: Mapping[str, Any], known: _Scopes) -> None:
    """Names in rules must exist: a typo would silently switch a rule off."""
    for j, ws in enumerate(found.get("workspace") or ()):
        if ws not in known:
            hint = _did_you_mean(ws, known) or f" (workspaces: {', '.join(known)})"
            chk.error(f"{path}.workspace[{j}]", f"unknown workspace {_shown(ws)}{hint}")
    scope = [w for w in found.get("workspace") or known if w in known]
    if not scope:
        return
    where = ", ".join(scope)
    for kind, index in (("team", 0), ("service", 1)):
        names: set[str] = set().union(*(known[w][index] for w in scope))
        for j, name in enumerate(found.get(kind) or ()):
            if name not in names:
                hint = _did_you_mean(name, names)
                chk.error(f"{path}.{kind}[{j}]", f"unknown {kind} {_shown(name)}{hint} in {where}")


def _scope_routing(chk: _Checker, path: str, value: Any, routing: Routing) -> dict[str, Any]:
    """The routing settings this level sets explicitly (None: lift an inherited limit)."""
    raw = chk.mapping(path, value, _SCOPE_ROUTING_FIELDS)
    own: dict[str, Any] = {}
    for name, item in raw.items():
        where = f"{path}.{name}"
        if item is None and name in _LIFTABLE:
            own[name] = None
            continue
        parsed: Any
        if name == "allowed_models":
            listed = chk.strings(where, item)
            models = [chk.model(f"{where}[{j}]", m) for j, m in enumerate(listed or ())]
            parsed = tuple(dict.fromkeys(m for m in models if m)) if listed else None
        elif name == "ceiling_tier":
            parsed = _ceiling(chk, where, item, len(routing.tiers))
        elif name == "default_model":
            parsed = chk.model(where, item)
        elif name in ("degrade_past_soft", "inject_prompt_cache_key"):
            parsed = chk.flag(where, item)
        elif name == "overdraft":
            parsed = _overdraft(chk, where, item)
        elif name in ("max_input_tokens", "max_session_input_tokens"):
            parsed = chk.positive_int(where, item)
        else:
            parsed = chk.choice(where, item, CONTEXT_ACTIONS)
        if parsed is not None:
            own[name] = parsed
    return own


def _ceiling(chk: _Checker, path: str, value: Any, tiers: int) -> int | None:
    if not tiers:
        chk.error(path, "routing.tiers defines no tiers to put a ceiling on")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < tiers:
        chk.error(path, f"must be a tier index from 0 to {tiers - 1}, got {_shown(value)}")
        return None
    return value


def _overdraft(chk: _Checker, path: str, value: Any) -> Overdraft | None:
    raw = chk.mapping(path, value, ("model", "usd"), required=("model", "usd"))
    model = chk.model(f"{path}.model", raw["model"]) if "model" in raw else None
    nanos = chk.money(f"{path}.usd", raw["usd"]) if "usd" in raw else None
    return Overdraft(model, nanos) if model is not None and nanos is not None else None


def _merged_routing(
    chk: _Checker, path: str, own: Mapping[str, Any], base: RoutingSettings, routing: Routing
) -> RoutingSettings:
    """`base` with this level's settings on top, checked where this level changed something."""
    merged = replace(base, **own)
    if not own:
        return merged
    for label, model in (
        ("default_model", merged.default_model),
        ("overdraft.model", merged.overdraft.model if merged.overdraft else None),
    ):
        set_here = label.split(".")[0] in own
        if model is None:
            continue
        if not merged.allows(model) and (set_here or "allowed_models" in own):
            blame = label if set_here else "allowed_models"
            allowed = ", ".join(merged.allowed_models or ())
            chk.error(
                f"{path}.{blame}", f"{label} {_shown(model)} is not in allowed_models ({allowed})"
            )
        tier, ceiling = routing.tier_of(model), merged.ceiling_tier
        if (
            tier is not None
            and ceiling is not None
            and tier < ceiling
            and (set_here or "ceiling_tier" in own)
        ):
            blame = label if set_here else "ceiling_tier"
            chk.error(
                f"{path}.{blame}",
                f"{label} {_shown(model)} is in tier {tier}, above ceiling_tier {ceiling}",
            )
    if not routing.ladder:
        if own.get("degrade_past_soft"):
            chk.warnings.append(
                f"{path}.degrade_past_soft: routing.ladder is empty, so nothing can step down"
            )
        if own.get("on_context_exceeded") == "downgrade":
            chk.warnings.append(
                f"{path}.on_context_exceeded: routing.ladder is empty, so a downgrade always "
                "ends in a refusal"
            )
    return merged
