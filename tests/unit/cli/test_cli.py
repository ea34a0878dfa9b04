"""The `extproc` command line as an operator meets it: help that covers every command and
option, one-line answers instead of tracebacks, and finding the local stack.

Every mistake is made through a real `python -m extproc` process (what a user runs), so a
traceback printed by any layer, logging included, fails the test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.cli.main import build_parser, usage_table
from extproc.devstack import run, state
from extproc.devstack.stack import free_port
from extproc.governance.policy import load_policy

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "policy.yaml"


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for child, subsub in _subparsers(sub):
                    yield f"{name} {child}", subsub


COMMANDS = dict(_subparsers(build_parser()))


def test_every_command_and_option_has_help() -> None:
    assert {"serve", "stack", "simulate", "usage", "spend", "keys", "check-config", "route"} <= set(
        COMMANDS
    )
    missing = [
        f"{name}: {action.option_strings or action.dest}"
        for name, parser in COMMANDS.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not action.help
    ]
    assert not missing, missing


def _extproc(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXTPROC_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        cwd=cwd,
        timeout=60,
    )


def test_help_texts_name_every_command_and_the_stack_environment() -> None:
    top = _extproc("--help")
    assert top.returncode == 0
    top_level = [name for name in COMMANDS if " " not in name]
    assert all(f"    {name}" in top.stdout for name in top_level), top.stdout
    stack = _extproc("stack", "--help")
    for var in ("EXTPROC_PORT", "UPSTREAM_URL", "EXTPROC_POLICY"):
        assert var in stack.stdout
    keys = _extproc("keys")
    assert keys.returncode == 2
    assert "required" not in keys.stdout + keys.stderr
    for sub in ("create", "list", "rotate", "revoke"):
        assert f"    {sub}" in keys.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.yaml").write_text("version: 1\nworkspaces: [unclosed\n")
    (d / "invalid.yaml").write_text("version: 1\nworkspaces:\n  dev: {budget_usd: -1}\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (d / "list.yaml").write_text("- just\n- a list\n")
    (d / "settings.yaml").write_text("listen: [1, 2]\n")
    return {
        "missing": str(d / "nope.yaml"),
        "dir": str(d),
        "broken": str(d / "broken.yaml"),
        "invalid": str(d / "invalid.yaml"),
        "binary": str(d / "binary.yaml"),
        "list": str(d / "list.yaml"),
        "settings": str(d / "settings.yaml"),
        "state": str(d / "state"),
        "out": str(d / "no-such-dir" / "spend.html"),
    }


METERING_ONLY = {"EXTPROC_METERING_ONLY": "1"}


def _mistakes(f: dict[str, str], dead_redis: str) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """(argv, extra env) for every subcommand: no stack, bad arguments, bad files."""
    no_stack: list[tuple[str, ...]] = [
        ("usage",),
        ("usage", "--json"),
        ("spend",),
        ("spend", "--by", "service", "--json"),
        ("keys", "list"),
        ("keys", "create", "--workspace", "dev", "--service", "codex-cli"),
        ("keys", "rotate", "key_0123456789ab"),
        ("keys", "revoke", "key_0123456789ab"),
        ("usage", "--stack", "1"),
        ("console",),
        ("ledger", "export", "--since", "2026-01-01"),
        ("ledger", "ship", "--dir", f["dir"], "--once"),
        ("reconcile",),
        ("policy", "what-if", str(EXAMPLE)),
        ("prices", "check", "--no-policy"),
    ]
    dead = [(*argv, "--redis-url", dead_redis) for argv in no_stack[:8]]
    bad_args: list[tuple[str, ...]] = [
        (),
        ("frobnicate",),
        ("keys",),
        ("keys", "create"),
        ("keys", "rotate"),
        ("keys", "rotate", "key_x", "--overlap", "5x"),
        ("usage", "--limit", "0"),
        ("usage", "--limit", "many"),
        ("spend", "--period", "someday"),
        ("spend", "--by", "planet"),
        ("spend", "--policy", str(EXAMPLE), "--now", "yesterday-ish"),
        ("spend", "--policy", str(EXAMPLE), "--html", f["out"], "--redis-url", dead_redis),
        ("simulate", "--port", "http"),
        ("route", "--workspace", "dev"),
        ("route", "--workspace", "nope", "--service", "x", "--model", "gpt-5", "--policy",
         str(EXAMPLE)),
        ("route", "--workspace", "dev", "--service", "codex-cli", "--model", "gpt-5",
         "--input-tokens", "-3", "--policy", str(EXAMPLE)),
        ("check-config",),
        ("stack", "--port", "1"),
        ("console", "--port", "web"),
        ("ledger",),
        ("policy",),
        ("policy", "what-if", f["missing"], "--redis-url", dead_redis),
        ("policy", "what-if", str(EXAMPLE), "--since", "forever", "--redis-url", dead_redis),
        ("ledger", "export", "--since", "the dawn of time", "--redis-url", dead_redis),
        ("ledger", "export", "--since", "2026-01-01", "--format", "xml"),
        ("reconcile", "--date", "someday", "--redis-url", dead_redis),
        ("prices", "check", "--days", "many"),
        ("prices", "audit"),
        ("prices", "check", "--no-policy", "--redis-url", dead_redis),
        ("topup",),
        ("topup", "approve"),
        ("topup", "list", "--status", "someday"),
        ("topup", "approve", "tu_x", "--policy", str(EXAMPLE), "--redis-url", dead_redis),
        ("topup", "approve", "tu_x", "--policy", f["invalid"], "--redis-url", dead_redis),
        ("keys", "resume", "key_x", "--policy", str(EXAMPLE), "--redis-url", dead_redis),
        ("keys", "paused", "--policy", f["missing"], "--redis-url", dead_redis),
    ]  # fmt: skip
    bad_files: list[tuple[str, ...]] = [
        ("check-config", f[name]) for name in ("missing", "dir", "broken", "invalid", "binary")
    ]
    bad_files += [("check-config", f["list"])]
    for name in ("missing", "broken", "invalid"):
        bad_files += [
            ("spend", "--policy", f[name], "--redis-url", dead_redis),
            ("keys", "create", "--workspace", "dev", "--service", "s", "--policy", f[name],
             "--redis-url", dead_redis),
            ("route", "--workspace", "dev", "--service", "s", "--model", "m", "--policy", f[name]),
            ("usage", "--policy", f[name], "--redis-url", dead_redis),
        ]  # fmt: skip
    bad_files += [("serve", "--config", f[name]) for name in ("missing", "dir", "settings")]
    bad_files += [
        ("prices", "--prices", f[name]) for name in ("missing", "dir", "broken", "binary")
    ]
    cases = [(argv, {}) for argv in [*no_stack, *dead, *bad_args, *bad_files]]
    cases += [
        (("stack",), {"EXTPROC_POLICY": f["invalid"]}),
        (("stack",), {"EXTPROC_POLICY": f["missing"]}),
        (("stack",), {"EXTPROC_PORT": "http"}),
        (("stack",), {"EXTPROC_PORT": "70000"}),
        (("serve",), {"EXTPROC_POLICY": f["missing"]}),
        (("serve",), {"EXTPROC_MAX_BODY_BYTES": "lots"}),
        (
            ("serve",),
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier",
                **METERING_ONLY,
            },
        ),
        (("serve",), {"OTEL_TRACES_EXPORTER": "zipkin", **METERING_ONLY}),
        (("serve",), {}),  # no policy and no EXTPROC_METERING_ONLY
        (("serve",), {"EXTPROC_METERING_ONLY": "maybe"}),
        (("serve",), {"EXTPROC_METERING_ONLY": "1", "EXTPROC_POLICY": str(EXAMPLE)}),
        (("serve", "--workers", "2"), {"EXTPROC_POLICY": f["invalid"]}),
        (("serve",), {"EXTPROC_PRICES": f["broken"], **METERING_ONLY}),
        (("prices",), {"EXTPROC_PRICES": f["invalid"]}),
        (("usage",), {"EXTPROC_PORT": "1"}),
    ]
    return cases


# Runs each case in a child forked from one interpreter that has already imported the CLI:
# a real process with its own stdout/stderr file descriptors and exit code, calling the
# same `main` as the `extproc` script, without paying the import once per case.
_DRIVER = """
import json, os, sys, tempfile
from extproc.cli.main import main

results = []
for argv, env in json.load(sys.stdin):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.environ.update(env)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    said = []
    for f in (out, err):
        f.seek(0)
        said.append(f.read().decode(errors="replace"))
    results.append([os.waitstatus_to_exitcode(status), *said])
json.dump(results, sys.__stdout__)
"""


def test_no_traceback_for_any_user_mistake(files: dict[str, str]) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    cases = _mistakes(files, dead_redis)
    # Every command appears at least once.
    assert {name.split()[0] for name in COMMANDS} <= {argv[0] for argv, _ in cases if argv}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXTPROC_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps([[list(argv), extra] for argv, extra in cases]),
        capture_output=True,
        text=True,
        env={**base, "XDG_STATE_HOME": files["state"]},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    failures = []
    for (argv, extra), (code, out, err) in zip(cases, json.loads(done.stdout), strict=True):
        said = out + err
        if "Traceback" in said or code not in (1, 2) or not said.strip():
            failures.append(f"extproc {' '.join(argv)} {extra} -> {code}:\n{said}")
    assert not failures, "\n\n".join(failures)


def test_no_stack_is_one_line_with_the_fix(tmp_path: Path) -> None:
    done = _extproc("usage", cwd=tmp_path, XDG_STATE_HOME=str(tmp_path / "state"))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "make run" in done.stderr and "--redis-url" in done.stderr


# -- the pieces of `make run`, without starting a stack -------------------------------------


def test_a_port_held_with_reuse_port_is_reported_taken() -> None:
    with socket.socket() as envoy_like:
        envoy_like.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        envoy_like.bind(("127.0.0.1", 0))
        envoy_like.listen()
        port = envoy_like.getsockname()[1]
        problem = run.port_problem(port)
    assert problem is not None and f"port {port} is already in use" in problem
    assert run.port_problem(port) is None  # free again once closed
    assert "not a TCP port" in (run.port_problem(70000) or "")


def test_data_lock_names_its_holder(tmp_path: Path) -> None:
    first = run.DataLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(run.StackRefused, match=f"in use by pid {os.getpid()}"):
            run.DataLock(tmp_path).acquire()
    finally:
        first.release()
    again = run.DataLock(tmp_path)
    again.acquire()
    again.release()


def _record(port: int, pid: int) -> state.StackState:
    return state.StackState(port, pid, f"http://127.0.0.1:{port}/v1", f"redis://r{port}", "p", "d")


def test_stack_records_found_by_port_or_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with pytest.raises(state.NoStackError, match="make run"):
        state.find()
    state.write(_record(10001, os.getpid()))
    assert state.find().redis_url == "redis://r10001"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    state.write(_record(10002, int(dead.stdout)))  # a stack that was killed
    assert state.find().port == 10001
    assert not (state.state_dir() / "10002.json").exists()  # stale record cleaned up
    state.write(_record(10003, os.getpid()))
    with pytest.raises(state.NoStackError, match=r"ports 10001, 10003\): pass --stack PORT"):
        state.find()
    assert state.find(10003).redis_url == "redis://r10003"
    with pytest.raises(state.NoStackError, match="EXTPROC_PORT=10009 make run"):
        state.find(10009)
    state.remove(10003, pid=os.getpid() + 1)  # not ours: kept
    assert state.find(10003)
    state.remove(10003, pid=os.getpid())
    assert state.find().port == 10001


def test_stack_of_this_checkout_is_preferred_and_old_records_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for port, checkout in ((10001, theirs), (10002, mine)):
        record = state.StackState(port, os.getpid(), "b", f"redis://r{port}", "p",
                                  str(checkout / ".data" / str(port)))  # fmt: skip
        state.write(record)
    assert state.find(here=mine / "src" / "deep").port == 10002
    assert state.find(here=theirs).port == 10001
    assert state.find(here=mine).describe() == f"the stack on port 10002 (started in {mine})"
    with pytest.raises(state.NoStackError, match="ports 10001, 10002"):
        state.find(here=tmp_path / "elsewhere")
    # A record written before upstream_url/simulated existed is still a running stack.
    path = state.state_dir() / "10001.json"
    old = json.loads(path.read_text())
    del old["upstream_url"], old["simulated"]
    path.write_text(json.dumps(old))
    found = state.find(10001)
    assert (found.upstream_url, found.simulated) == ("", False)


def test_reconcile_base_url_gets_v1_only_on_a_bare_host() -> None:
    from extproc.cli.reconcile import admin_base_url

    assert admin_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert admin_base_url("https://api.openai.com/") == "https://api.openai.com/v1"
    assert admin_base_url("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert admin_base_url("https://proxy.example/openai/v1") == "https://proxy.example/openai/v1"


def test_credential_warnings_name_the_variable_or_file(tmp_path: Path) -> None:
    policy = load_policy(EXAMPLE)
    lines = run.credential_warnings(policy, env={"OPENAI_API_KEY_CI": "sk-real"})
    assert len(lines) == 2
    assert "workspace dev: environment variable OPENAI_API_KEY_DEV is not set" in lines[0]
    assert "export OPENAI_API_KEY_DEV=" in lines[0]
    assert "OPENAI_API_KEY_PROD" in lines[1]
    secret = tmp_path / "key"
    with_file = tmp_path / "policy.yaml"
    with_file.write_text(
        f"version: 1\nworkspaces:\n  w:\n    budget_usd: 1\n    upstream: {{key_file: {secret}}}\n"
    )
    (line,) = run.credential_warnings(load_policy(with_file), env={})
    assert f"cannot read key file {secret}" in line
    secret.write_text("sk-from-file\n")
    assert run.credential_warnings(load_policy(with_file), env={}) == []


def test_log_echo_passes_warnings_errors_and_their_tracebacks_only() -> None:
    shown: list[str] = []
    echo = run.LogEcho("sidecar", shown.append)
    for line in (
        "2026-12-01 14:00:00,001 INFO extproc.server: policy loaded",
        "2026-12-01 14:00:01,002 ERROR extproc.policy: policy reload rejected; keeping:",
        "policy.yaml: workspaces.dev.budget_usd: must be positive",
        "2026-12-01 14:00:02,003 INFO extproc.server: fine again",
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "2026-12-01 14:00:03,004 WARNING extproc.ledger: spooling",
        "[2026-12-01 14:00:04.005][12][warning][config] deprecated field",
        "[2026-12-01 14:00:05.006][12][info][main] starting",
    ):
        echo(line)
    assert shown == [
        "[sidecar] 2026-12-01 14:00:01,002 ERROR extproc.policy: policy reload rejected; keeping:",
        "[sidecar] policy.yaml: workspaces.dev.budget_usd: must be positive",
        "[sidecar] Traceback (most recent call last):",
        '[sidecar]   File "x.py", line 1',
        "[sidecar] 2026-12-01 14:00:03,004 WARNING extproc.ledger: spooling",
        "[sidecar] [2026-12-01 14:00:04.005][12][warning][config] deprecated field",
    ]


def test_usage_table_has_time_workspace_and_service_in_the_zone() -> None:
    from zoneinfo import ZoneInfo

    row = {
        "time_ms": 1_764_590_400_000,  # 2025-12-01 12:00:00 UTC
        "workspace": "dev",
        "service": "codex-cli",
        "endpoint": "responses",
        "model_served": "gpt-5.1-codex",
        "model_requested": "codex-default",
        "input_tokens": 1200,
        "cached_input_tokens": 0,
        "output_tokens": 35,
        "cost_usd": "0.0018",
        "cost_nanos": 1_800_000,
        "estimated": True,
        "price_fallback": False,
        "outcome": "completed",
    }
    header, line = usage_table([row], ZoneInfo("Europe/Berlin")).splitlines()
    assert header.split() == [
        "TIME", "WORKSPACE", "SERVICE", "ENDPOINT", "MODEL", "IN", "CACHED", "OUT", "USD",
        "OUTCOME",
    ]  # fmt: skip
    assert line.split() == [
        "2025-12-01", "13:00:00", "CET", "dev", "codex-cli", "responses", "gpt-5.1-codex",
        "1200", "0", "35", "$0.0018", "~", "completed",
    ]  # fmt: skip
    assert json.dumps(row)  # the same dict `usage --json` prints
