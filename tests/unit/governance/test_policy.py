"""The budget policy: validation messages name the field, money is exact, reloads are safe."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from extproc.cli import admin as cli_admin
from extproc.governance.policy import (
    Policy,
    PolicyError,
    PolicyWatcher,
    RateLimits,
    Upstream,
    load_policy,
    parse_policy_text,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "policy.yaml"
B = 1_000_000_000  # nanos per dollar

BASE: dict[str, Any] = {
    "version": 1,
    "workspaces": {
        "dev": {
            "budget_usd": 100,
            "upstream": {"key_env": "OPENAI_API_KEY_DEV"},
            "teams": {"platform": {}, "web": {}},
            "services": {"codex-cli": {"team": "platform"}},
        }
    },
}


def with_value(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted `path` set to `value` (missing mappings created)."""
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


def without(path: str) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    del node[last]
    return doc


_LINE = re.compile(r" \(line \d+\)$")


def unlocated(message: str) -> str:
    """Without the " (line N)" suffix (line numbers are tested on a hand-written file)."""
    return _LINE.sub("", message)


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy_text(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")
    return [unlocated(p) for p in info.value.problems]


def parse(doc: Any) -> Policy:
    return parse_policy_text(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")


# --- the example -------------------------------------------------------------------------


def test_example_policy_loads_with_exact_limits_and_overrides() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.timezone == ZoneInfo("Europe/Berlin")
    assert policy.warnings == ()
    dev, ci, prod = (policy.workspaces[n] for n in ("dev", "ci", "prod"))
    assert (dev.budget_nanos, dev.soft_nanos, dev.hard_nanos) == (500 * B, 375 * B, 550 * B)
    assert (ci.budget_nanos, ci.soft_nanos, ci.hard_nanos) == (1000 * B, 750 * B, 1100 * B)
    assert (prod.budget_nanos, prod.soft_nanos, prod.hard_nanos) == (5000 * B, 3750 * B, 5500 * B)
    assert (dev.on_redis_down, ci.on_redis_down) == ("open", "closed")
    assert (dev.default_output_cap, prod.default_output_cap) == (4096, 2048)
    assert dev.upstream == Upstream("OPENAI_API_KEY_DEV", None, None)
    assert ci.upstream.key_env == "OPENAI_API_KEY_CI"
    assert prod.upstream.key_env == "OPENAI_API_KEY_PROD"
    codex = policy.service("dev", "codex-cli")
    assert codex is not None and codex.team == "platform" and codex.budget_nanos == 100 * B
    assert codex.rate_limits == RateLimits(rpm=60, tpm=500_000)
    # rpm from the service, tpm inherited from defaults
    assert codex.key_rate_limits == RateLimits(rpm=30, tpm=400_000)
    assert policy.service("dev", "nope") is None and policy.service("nope", "codex-cli") is None
    assert policy.webhooks == ()  # the example ships the Slack hook commented out


def test_built_in_defaults_apply_without_a_defaults_section() -> None:
    ws = parse(BASE).workspaces["dev"]
    assert (ws.period, ws.default_output_cap, ws.on_redis_down) == ("month", 4096, "closed")
    assert (ws.soft_nanos, ws.hard_nanos) == (75 * B, 110 * B)
    assert ws.key_rate_limits is None and ws.rate_limits is None
    assert parse(BASE).timezone == ZoneInfo("UTC")


def test_defaults_then_workspace_then_service_override() -> None:
    doc = copy.deepcopy(BASE)
    doc["defaults"] = {
        "period": "week",
        "soft_limit": "50%",
        "on_redis_down": "open",
        "key_rate_limits": {"rpm": 10, "tpm": 1000},
    }
    dev = doc["workspaces"]["dev"]
    dev["period"] = "day"
    dev["key_rate_limits"] = {"tpm": 2000}
    dev["services"]["codex-cli"]["key_rate_limits"] = {"rpm": None}
    dev["services"]["bot"] = {}
    doc["workspaces"]["ci"] = {
        "budget_usd": 10,
        "upstream": {"key_env": "K"},
        "services": {"x": {}},
    }
    policy = parse(doc)
    dev_ws, ci_ws = policy.workspaces["dev"], policy.workspaces["ci"]
    assert (dev_ws.period, ci_ws.period) == ("day", "week")
    assert (dev_ws.on_redis_down, dev_ws.soft_nanos) == ("open", 50 * B)
    assert dev_ws.key_rate_limits == RateLimits(rpm=10, tpm=2000)
    assert ci_ws.key_rate_limits == RateLimits(rpm=10, tpm=1000)
    assert dev_ws.services["bot"].key_rate_limits == RateLimits(rpm=10, tpm=2000)
    # an explicit null lifts the inherited limit
    assert dev_ws.services["codex-cli"].key_rate_limits == RateLimits(rpm=None, tpm=2000)


@pytest.mark.parametrize(
    ("budget", "soft", "hard", "soft_nanos", "hard_nanos"),
    [
        (500, "75%", "110%", 375 * B, 550 * B),
        ("1000", 0.8, 1.1, 800 * B, 1100 * B),
        ("0.000000007", "33.3333%", "100%", 2, 7),  # 2.333331 nanos -> 2
        ("1.000000001", "33%", "1", 330_000_000, 1_000_000_001),  # 330000000.33 -> down
        (12.5, "99.9999999999%", 2, 12_499_999_999, 25 * B),  # never rounded up
        ("999999.999999999", "100%", "500%", 999_999_999_999_999, 4_999_999_999_999_995),
    ],
)
def test_soft_and_hard_nanos_are_exact_and_rounded_down(
    budget: Any, soft: Any, hard: Any, soft_nanos: int, hard_nanos: int
) -> None:
    doc = with_value("workspaces.dev.budget_usd", budget)
    doc["workspaces"]["dev"].update(soft_limit=soft, hard_limit=hard)
    ws = parse(doc).workspaces["dev"]
    assert (ws.soft_nanos, ws.hard_nanos) == (soft_nanos, hard_nanos)
    assert all(type(n) is int for n in (ws.budget_nanos, ws.soft_nanos, ws.hard_nanos))


def test_yaml_decimals_are_never_floats() -> None:
    # 0.1 + 0.2 style values: as floats 1000.3 * 1e9 is 1000299999999.9999
    text = yaml.safe_dump(BASE).replace("budget_usd: 100", "budget_usd: 1000.3")
    assert parse_policy_text(text).workspaces["dev"].budget_nanos == 1_000_300_000_000


# --- every validation error names its field ----------------------------------------------

DEV = "workspaces.dev"
SVC = f"{DEV}.services.codex-cli"
MONEY = 'must be a positive decimal string or number like "1000" or 1000, got'
SHARE = 'must be a percentage like "75%" or a fraction like 0.75, got'
EXACTLY_ONE = "set exactly one of key_env or key_file"
HTTP_URL = "must be an http:// or https:// URL with a host"


def bad(path: str, value: Any, why: str, where: str | None = None) -> tuple[dict[str, Any], str]:
    """BASE with `path` set to `value`, and the problem expected at `where` (default: path)."""
    return with_value(path, value), f"{where or path}: {why}"


def gone(path: str, why: str = "required") -> tuple[dict[str, Any], str]:
    return without(path), f"{path}: {why}"


CASES: list[tuple[dict[str, Any], str]] = [
    gone("version"),
    bad("version", 2, "unsupported version 2 (this extproc reads 1)"),
    bad("version", "1", 'unsupported version "1"'),
    bad("workspace", {}, 'unknown field (did you mean "workspaces"?)'),
    bad(
        "budgets",
        1,
        "unknown field (known: version, timezone, defaults, workspaces, alerts, console)",
    ),
    bad(
        "timezone",
        "Europe/Berlinn",
        'unknown IANA time zone "Europe/Berlinn" (did you mean "Europe/Berlin"?)',
    ),
    bad("timezone", "Nowhere/Atlantis", 'unknown IANA time zone "Nowhere/Atlantis"'),
    bad("timezone", "../../etc/passwd", "unknown IANA time zone"),
    bad("timezone", 1, 'must be an IANA time zone name like "Europe/Berlin", got 1'),
    bad("defaults", [1], "must be a mapping, got a list"),
    bad("defaults.period", "year", 'must be one of month, week, day, got "year"'),
    bad("defaults.perod", "week", 'unknown field (did you mean "period"?)'),
    bad("defaults.budget_usd", 5, "unknown field (known: period, soft_limit, hard_limit,"),
    bad("defaults.soft_limit", "75", 'must be at most 500% (5), got "75" (did you mean "75%"?)'),
    bad("defaults.soft_limit", "high", f'{SHARE} "high"'),
    bad("defaults.soft_limit", "lots%", f'{SHARE} "lots%"'),
    bad("defaults.soft_limit", True, f"{SHARE} true"),
    bad("defaults.soft_limit", 0, "must be greater than 0%, got 0"),
    bad("defaults.hard_limit", 110, 'must be at most 500% (5), got 110 (did you mean "110%"?)'),
    bad("defaults.hard_limit", "900%", 'must be at most 500% (5), got "900%"'),
    bad(
        "defaults",
        {"soft_limit": "90%", "hard_limit": "80%"},
        "hard_limit (80%) must be >= soft_limit (90%)",
        "defaults.hard_limit",
    ),
    bad("defaults.default_output_cap", -1, "must be a positive integer, got -1"),
    bad("defaults.default_output_cap", True, "must be a positive integer, got true"),
    bad("defaults.on_redis_down", "fail", 'must be one of closed, open, got "fail"'),
    bad("defaults.key_rate_limits", "120", 'must be a mapping, got "120"'),
    bad("defaults.key_rate_limits.rpm", 0, "must be a positive integer, got 0"),
    bad("defaults.key_rate_limits.rph", 5, 'unknown field (did you mean "rpm"?)'),
    gone("workspaces"),
    bad("workspaces", {}, "must define at least one workspace"),
    bad("workspaces", "dev", 'must be a mapping of names, got "dev"'),
    bad("workspaces.bad name", {}, "name must be 1-64 letters, digits, '-' or '_'"),
    bad("workspaces.{ws}", {}, "name must be 1-64 letters"),
    bad(f"{DEV}.budget_usd", "-5", f'{MONEY} "-5"'),
    bad(f"{DEV}.budget_usd", -5, f"{MONEY} -5"),
    bad(f"{DEV}.budget_usd", 0, f"{MONEY} 0"),
    bad(f"{DEV}.budget_usd", "$500", f'{MONEY} "$500"'),
    bad(f"{DEV}.budget_usd", "1e3", f'{MONEY} "1e3"'),
    bad(f"{DEV}.budget_usd", True, f"{MONEY} true"),
    bad(f"{DEV}.budget_usd", "0.0000000001", 'has more than 9 decimal places, got "0.0000000001"'),
    bad(f"{DEV}.budget_usd", 2_000_000, "must be at most 1000000 per period, got 2000000"),
    gone(f"{DEV}.budget_usd"),
    bad(f"{DEV}.buget_usd", 1, 'unknown field (did you mean "budget_usd"?)'),
    bad(f"{DEV}.soft_limit", "120%", "soft_limit (120%) must be <= hard_limit (110%)"),
    bad(f"{DEV}.hard_limit", "70%", "hard_limit (70%) must be >= soft_limit (75%)"),
    bad(f"{DEV}.period", "quarter", 'must be one of month, week, day, got "quarter"'),
    bad(f"{DEV}.on_redis_down", False, "must be one of closed, open, got false"),
    gone(f"{DEV}.upstream"),
    bad(f"{DEV}.upstream", {"key_env": "A", "key_file": "/k"}, EXACTLY_ONE),
    bad(f"{DEV}.upstream", {}, EXACTLY_ONE),
    bad(f"{DEV}.upstream", "OPENAI_API_KEY", 'must be a mapping, got "OPENAI_API_KEY"'),
    bad(f"{DEV}.upstream.key_env", "1BAD", 'not an environment variable name: "1BAD"'),
    bad(f"{DEV}.upstream.key_fil", "/k", 'unknown field (did you mean "key_file"?)'),
    bad(f"{DEV}.upstream.base_url", "ftp://x", HTTP_URL),
    bad(f"{DEV}.rate_limits.rpm", "fast", 'must be a positive integer, got "fast"'),
    bad(f"{DEV}.teams", ["platform"], "must be a mapping of names, got a list"),
    bad(f"{DEV}.teams.platform.budget_usd", "x", f'{MONEY} "x"'),
    bad(f"{DEV}.teams.platform.rate_limits.tpm", 1.5, "must be a positive integer, got 1.5"),
    bad(
        f"{DEV}.teams.platform.owner",
        "x",
        "unknown field (known: budget_usd, rate_limits, contact, approvers)",
    ),
    bad(f"{DEV}.teams.platform.contact", "", 'must be a non-empty string, got ""'),
    bad(f"{SVC}.team", "plat", 'unknown team "plat" (teams in dev: platform, web)'),
    bad(f"{SVC}.team", 7, "must be a non-empty string, got 7"),
    bad(f"{SVC}.key_rate_limits.tpm", -3, "must be a positive integer, got -3"),
    bad(f"{SVC}.rate_limits.tph", 3, 'unknown field (did you mean "tpm"?)'),
    bad(f"{SVC}.period", "day", "unknown field"),
    bad(SVC, "platform", 'must be a mapping, got "platform"'),
    bad("alerts.webhooks", "https://x", 'must be a list of webhooks, got "https://x"'),
    bad("alerts.webhooks", [{"events": ["soft_limit"]}], "required", "alerts.webhooks[0].url"),
    bad("alerts.webhooks", [{"url": "hooks.slack.com/x"}], HTTP_URL, "alerts.webhooks[0].url"),
    bad(
        "alerts.webhooks",
        [{"url": "https://h/x", "events": []}],
        "must be a non-empty list of burn_rate, hard_limit, key_paused, key_resumed, "
        "reconcile_drift, soft_limit, topup_approved, topup_denied, topup_expired, "
        "topup_requested, unknown_model (omit it for all), got a list",
        "alerts.webhooks[0].events",
    ),
    bad(
        "alerts.webhooks",
        [{"url": "https://h/x", "events": ["soft_limt"]}],
        'unknown event "soft_limt" (did you mean "soft_limit"?)',
        "alerts.webhooks[0].events",
    ),
    bad("alerts.email", "x@y", "unknown field (known: webhooks)"),
]


@pytest.mark.parametrize(("doc", "expected"), CASES, ids=[c[1][:60] for c in CASES])
def test_each_problem_names_the_field_and_why(doc: dict[str, Any], expected: str) -> None:
    problems = problems_of(doc)
    assert any(p.startswith(f"policy.yaml: {expected}") for p in problems), problems


def test_service_team_in_a_workspace_without_teams() -> None:
    doc = without(f"{DEV}.teams")
    assert problems_of(doc) == [
        'policy.yaml: workspaces.dev.services.codex-cli.team: unknown team "platform" '
        "(dev has no teams)"
    ]


def test_every_problem_is_reported_at_once_one_per_line() -> None:
    doc = with_value(f"{DEV}.budget_usd", "-5")
    doc["timezone"] = "Mars/Olympus"
    doc["workspaces"]["dev"]["services"]["codex-cli"]["team"] = "plat"
    with pytest.raises(PolicyError) as info:
        parse_policy_text(yaml.safe_dump(doc), "policy.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and lines == list(info.value.problems)
    assert [line.split(": ")[1] for line in lines] == [
        "timezone",
        "workspaces.dev.budget_usd",
        "workspaces.dev.services.codex-cli.team",
    ]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\nworkspaces:\n  dev: {}\n  dev: {}\n", 'line 4: duplicate key "dev"'),
        ("version: 1\nworkspaces: [unclosed\n", "not valid YAML"),
        ("", "empty file"),
        ("- 1\n- 2\n", "policy: must be a mapping, got a list"),
        (
            "version: 1\nworkspaces:\n  yes: {}\n",
            "workspaces: name true must be a string (quote it)",
        ),
    ],
)
def test_yaml_level_problems(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_text(text, "p.yaml")
    assert any(p.startswith(f"p.yaml: {expected}") for p in info.value.problems), info.value


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read: No such file"):
        load_policy(tmp_path / "missing.yaml")


def test_budgets_above_the_workspace_are_allowed_with_warnings() -> None:
    doc = copy.deepcopy(BASE)
    dev = doc["workspaces"]["dev"]
    dev["teams"]["platform"] = {"budget_usd": 150}
    dev["services"]["codex-cli"]["budget_usd"] = 200
    doc["workspaces"]["empty"] = {"budget_usd": 1, "upstream": {"key_env": "K"}}
    policy = parse(doc)
    assert tuple(map(unlocated, policy.warnings)) == (
        "policy.yaml: workspaces.dev.teams.platform.budget_usd: larger than the budget of "
        "workspace dev",
        "policy.yaml: workspaces.dev.services.codex-cli.budget_usd: larger than the budget of "
        "workspace dev",
        "policy.yaml: workspaces.dev.services.codex-cli.budget_usd: larger than the budget of "
        "team platform",
        "policy.yaml: workspaces.empty.services: none defined, so no keys can be issued here",
    )
    assert policy.service("dev", "codex-cli").budget_nanos == 200 * B  # type: ignore[union-attr]


# --- upstream keys -----------------------------------------------------------------------


def test_read_key_from_env_and_errors_name_the_variable() -> None:
    upstream = Upstream("OPENAI_API_KEY_DEV", None, None)
    assert upstream.read_key({"OPENAI_API_KEY_DEV": " sk-real \n"}) == "sk-real"
    with pytest.raises(PolicyError, match="environment variable OPENAI_API_KEY_DEV is not set"):
        upstream.read_key({})
    with pytest.raises(PolicyError, match="OPENAI_API_KEY_DEV is empty"):
        upstream.read_key({"OPENAI_API_KEY_DEV": "  "})
    with pytest.raises(PolicyError) as info:
        upstream.read_key({"OPENAI_API_KEY_DEV": "sk-secret-part1 part2"})
    assert "whitespace" in str(info.value) and "secret" not in str(info.value)


def test_key_file_is_relative_to_the_policy_and_read_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "dev").write_text("sk-from-file\n")
    doc = with_value(f"{DEV}.upstream", {"key_file": "secrets/dev"})
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(doc))
    upstream = load_policy(tmp_path / "policy.yaml").workspaces["dev"].upstream
    assert upstream.key_file == str(tmp_path / "secrets" / "dev")
    assert upstream.read_key() == "sk-from-file"
    missing = Upstream(None, str(tmp_path / "nope"), None)
    with pytest.raises(PolicyError, match=r"cannot read key file .*nope: No such file"):
        missing.read_key()


# --- hot reload --------------------------------------------------------------------------


def write_atomically(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    os.replace(tmp, path)


def test_watcher_reloads_changes_and_keeps_the_old_policy_on_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    write_atomically(path, BASE)
    seen: list[Policy] = []
    watcher = PolicyWatcher(path, seen.append, policy=load_policy(path))
    without_initial = PolicyWatcher(path, seen.append)

    async def scenario() -> None:
        assert await watcher.poll_once() is False  # unchanged
        assert await without_initial.poll_once() is False  # the caller loaded this one
        write_atomically(path, with_value(f"{DEV}.budget_usd", 250))
        assert await watcher.poll_once() is True
        assert seen[-1].workspaces["dev"].budget_nanos == 250 * B
        write_atomically(path, with_value(f"{DEV}.budget_usd", 250))  # same content, new inode
        assert await watcher.poll_once() is False
        with caplog.at_level(logging.ERROR, logger="extproc.governance.policy"):
            write_atomically(path, with_value(f"{DEV}.budget_usd", "-5"))
            assert await watcher.poll_once() is False
        assert "workspaces.dev.budget_usd" in caplog.text
        assert watcher.policy is seen[-1] and len(seen) == 1
        write_atomically(path, "version: 1\nworkspaces: [")
        assert await watcher.poll_once() is False
        path.unlink()
        assert await watcher.poll_once() is False
        assert watcher.policy.workspaces["dev"].budget_nanos == 250 * B

    asyncio.run(scenario())


def test_watcher_task_calls_back_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write_atomically(path, BASE)

    async def scenario() -> Policy:
        changed: asyncio.Queue[Policy] = asyncio.Queue()
        watcher = PolicyWatcher(path, changed.put_nowait, policy=load_policy(path), interval=0.02)
        task = asyncio.create_task(watcher.run())
        try:
            write_atomically(path, with_value(f"{DEV}.budget_usd", 42))
            return await asyncio.wait_for(changed.get(), 5)
        finally:
            task.cancel()

    assert asyncio.run(scenario()).workspaces["dev"].budget_nanos == 42 * B


# --- check-config ------------------------------------------------------------------------


def test_check_config_ok_with_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_admin.main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "ok: 3 workspaces (dev $500.00/month, ci $1,000.00/month, prod $5,000.00/month), 7 teams, "
        "9 services, 0 webhooks; periods in Europe/Berlin"
    )


def test_check_config_reports_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = with_value(f"{DEV}.budget_usd", "-5")
    doc["workspaces"]["dev"]["services"]["codex-cli"]["team"] = "plat"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli_admin.main(["check-config", str(path)]) == 2
    err = [unlocated(line) for line in capsys.readouterr().err.splitlines()]
    assert err == [
        f"{path}: workspaces.dev.budget_usd: must be a positive decimal string or number like "
        f'"1000" or 1000, got "-5"',
        f'{path}: workspaces.dev.services.codex-cli.team: unknown team "plat" '
        f"(teams in dev: platform, web)",
        "2 problems; policy not usable",
    ]


LIMITS = """\
version: 1
defaults:
  soft_limit: 75%
  hard_limit: 110%
workspaces:
  dev:
    budget_usd: 100
    upstream: {key_env: K}
    soft_limit: 80%
    hard_limit: 90%
    services:
      cli: {budget_usd: -1}
"""


def test_check_config_blames_the_edited_limit_and_gives_line_numbers(tmp_path: Path) -> None:
    """Both limits are written at each level: the one changed from what it inherits is blamed."""
    edited_soft = LIMITS.replace("  soft_limit: 75%", "  soft_limit: 120%")
    with pytest.raises(PolicyError) as info:
        parse_policy_text(edited_soft, "p.yaml")
    assert info.value.problems == (
        "p.yaml: defaults.soft_limit: soft_limit (120%) must be <= hard_limit (110%) (line 3)",
        "p.yaml: workspaces.dev.services.cli.budget_usd: must be a positive decimal string or "
        'number like "1000" or 1000, got -1 (line 12)',
    )
    edited_hard = LIMITS.replace("    hard_limit: 90%", "    hard_limit: 70%")
    with pytest.raises(PolicyError) as info:
        parse_policy_text(edited_hard, "p.yaml")
    assert info.value.problems[0] == (
        "p.yaml: workspaces.dev.hard_limit: hard_limit (70%) must be >= soft_limit (80%) (line 10)"
    )
    path = tmp_path / "p.yaml"
    path.write_text(edited_soft)
    done = cli_admin.main(["check-config", str(path)])
    assert done == 2
