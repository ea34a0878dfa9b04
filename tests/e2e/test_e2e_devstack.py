"""End to end: `make run` (`extproc stack`) as a developer meets it.

Each stack runs as its own `python -m extproc stack` process in a scratch checkout
directory (its `.data/`) with a scratch per-user state directory, exactly as `make run`
starts it; the CLI is run from an unrelated directory to prove it finds the stack.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from extproc.devstack.stack import free_port
from extproc.metering.prices import usd, usd_for_people

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0
CREDENTIAL_VARS = ("OPENAI_API_KEY_DEV", "OPENAI_API_KEY_CI", "OPENAI_API_KEY_PROD")


@dataclass
class RunningStack:
    """One `extproc stack` process and every line it printed (stdout and stderr)."""

    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    seen: threading.Condition = field(default_factory=threading.Condition)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.seen:
                self.lines.append(line.rstrip("\n"))
                self.seen.notify_all()
        with self.seen:
            self.seen.notify_all()

    def wait_line(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def match() -> bool:
            found[:] = [m for m in map(regex.search, self.lines) if m]
            return bool(found) or self.proc.poll() is not None

        with self.seen:
            self.seen.wait_for(match, timeout)
            assert found, f"no line matching {pattern!r}:\n" + "\n".join(self.lines)
            return found[0]

    @property
    def output(self) -> str:
        with self.seen:
            return "\n".join(self.lines)

    def demo_key(self) -> str:
        return self.wait_line(r"demo key\s+: (sk-\S+)")[1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(WAIT_S)


@dataclass
class Checkout:
    """A directory to run `make run` in, and the per-user state directory it reports to."""

    cwd: Path
    state_home: Path
    policy: Path
    elsewhere: Path
    started: list[RunningStack] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EXTPROC_", "OTEL_", "UPSTREAM"))
        }
        for var in CREDENTIAL_VARS:
            env.pop(var, None)
        env.update(XDG_STATE_HOME=str(self.state_home), EXTPROC_POLICY=str(self.policy), **extra)
        return env

    def start(self, port: int, cwd: Path | None = None, **extra: str) -> RunningStack:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "stack"],
            cwd=cwd or self.cwd,
            env=self.env(
                EXTPROC_PORT=str(port), **{"EXTPROC_CONSOLE_PORT": str(free_port()), **extra}
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        running = RunningStack(proc, port)
        threading.Thread(target=running.pump, daemon=True).start()
        self.started.append(running)
        return running

    def cli(
        self, *args: str, cwd: Path | None = None, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """The CLI as a user runs it: from another directory (or `cwd`), no policy or Redis
        given."""
        env = self.env(**extra)
        env.pop("EXTPROC_POLICY")
        return subprocess.run(
            [sys.executable, "-m", "extproc", *args],
            cwd=cwd or self.elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Checkout]:
    cwd, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    cwd.mkdir()
    elsewhere.mkdir()
    policy = tmp_path / "policy.yaml"
    shutil.copy(ROOT / "examples" / "policy.yaml", policy)
    co = Checkout(cwd, tmp_path / "state", policy, elsewhere)
    try:
        yield co
    finally:
        for running in co.started:
            if running.proc.poll() is None:
                running.proc.kill()  # its children are stopped by nobody: say so loudly
                running.proc.wait()
                pytest.fail(f"stack on {running.port} did not stop:\n{running.output}")


def _post(base: str, key: str, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        f"{base}{path}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def test_make_run_one_developer_two_stacks(checkout: Checkout) -> None:
    first_port, second_port = free_port(), free_port()
    first = checkout.start(first_port)
    base = first.wait_line(r"OpenAI base URL : (\S+)")[1]
    key = first.demo_key()
    assert base == f"http://127.0.0.1:{first_port}/v1"
    assert (checkout.cwd / ".data" / str(first_port) / "redis").is_dir()

    # The demo key can do what the README shows, embeddings included.
    resp = _post(base, key, "/responses", {"model": "codex-default", "input": "hi"})
    assert resp.status_code == 200, resp.text
    resp = _post(base, key, "/embeddings", {"model": "text-embedding-3-small", "input": "hi"})
    assert resp.status_code == 200, resp.text

    # The CLI finds the stack from another directory, policy and all.
    usage = checkout.cli("usage", "--limit", "5")
    assert usage.returncode == 0, usage.stderr
    header, *rows = usage.stdout.splitlines()
    assert header.split()[:3] == ["TIME", "WORKSPACE", "SERVICE"]
    assert len(rows) == 2 and all(" dev " in r and " codex-cli " in r for r in rows), rows
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d CE", r) for r in rows), rows
    spend = checkout.cli("spend")
    assert spend.returncode == 0, spend.stderr
    dev_line = next(line for line in spend.stdout.splitlines() if line.startswith("dev "))
    assert re.search(r"\$0\.00\d*[1-9]", dev_line), dev_line  # sub-cent spend, not "$0.00"
    page = checkout.elsewhere / "spend.html"
    html = checkout.cli("spend", "--html", str(page))
    assert html.returncode == 0, html.stderr
    assert html.stdout == "" and page.read_text().lstrip().lower().startswith("<!doctype html")

    # A second stack on the same port is refused before anything starts.
    again = checkout.start(first_port)
    assert again.proc.wait(WAIT_S) == 2
    assert f"port {first_port} is already in use" in again.output
    assert "stack is up" not in again.output
    assert checkout.cli("usage").returncode == 0  # the first stack's record is untouched

    # A broken policy edit shows up live, where the developer is looking.
    checkout.policy.write_text(
        checkout.policy.read_text().replace("budget_usd: 500", "budget_usd: -5")
    )
    first.wait_line(r"\[sidecar\] .* ERROR .*policy reload rejected")
    first.wait_line(r"\[sidecar\] .*workspaces\.dev\.budget_usd")
    shutil.copy(ROOT / "examples" / "policy.yaml", checkout.policy)

    # A second stack on another port, towards a real upstream without credentials: warned
    # about at startup, its data kept apart, and the 503 names the variable to set.
    second = checkout.start(second_port, UPSTREAM_URL=f"http://127.0.0.1:{free_port()}")
    for var in CREDENTIAL_VARS:
        second.wait_line(rf"warning: workspace \w+: environment variable {var} is not set")
    second_key = second.demo_key()
    assert second_key != key
    refused = _post(
        f"http://127.0.0.1:{second_port}/v1",
        second_key,
        "/responses",
        {"model": "codex-default", "input": "hi"},
    )
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "upstream_credential_missing"
    assert "OPENAI_API_KEY_DEV" in error["message"]
    assert (checkout.cwd / ".data" / str(second_port) / "redis").is_dir()

    ambiguous = checkout.cli("usage")
    assert ambiguous.returncode == 1
    assert ambiguous.stderr.strip().count("\n") == 0
    assert "--stack PORT" in ambiguous.stderr and str(second_port) in ambiguous.stderr
    chosen = checkout.cli("keys", "list", "--stack", str(second_port), "--json")
    assert chosen.returncode == 0, chosen.stderr
    assert len(json.loads(chosen.stdout)) == 1

    # Stopping the first removes only its record; a restart shows the same demo key.
    assert first.stop() == 0
    only = checkout.cli("keys", "list", "--json")
    assert only.returncode == 0, only.stderr
    assert [k["workspace"] for k in json.loads(only.stdout)] == ["dev"]
    assert second.stop() == 0
    none = checkout.cli("usage")
    assert none.returncode == 1 and "make run" in none.stderr and "Traceback" not in none.stderr

    restarted = checkout.start(first_port)
    assert restarted.demo_key() == key
    assert "same as last run" in restarted.output
    listed = checkout.cli("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 1  # no new key minted
    assert restarted.stop() == 0
    assert "Traceback" not in first.output + second.output + restarted.output


def test_make_run_refuses_a_port_an_envoy_holds_with_reuse_port(checkout: Checkout) -> None:
    """Envoy's default SO_REUSEPORT would let a second listener share the port silently."""
    import socket

    port = free_port()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        refused = checkout.start(port)
        assert refused.proc.wait(WAIT_S) == 2
    assert f"port {port} is already in use" in refused.output
    assert not (checkout.cwd / ".data" / str(port)).exists()  # nothing was started


def test_make_run_pins_every_internal_port_it_is_given(checkout: Checkout) -> None:
    import redis

    pins = {
        "EXTPROC_SIDECAR_PORT": free_port(),
        "EXTPROC_REDIS_PORT": free_port(),
        "EXTPROC_SIMULATOR_PORT": free_port(),
        "EXTPROC_ENVOY_ADMIN_PORT": free_port(),
        "EXTPROC_PROMETHEUS_PORT": free_port(),
    }
    port = free_port()
    running = checkout.start(port, EXTPROC_WORKERS="2", **{k: str(v) for k, v in pins.items()})
    key = running.demo_key()
    assert running.wait_line(r"redis\s+: (\S+)")[1].endswith(f":{pins['EXTPROC_REDIS_PORT']}/0")
    assert running.wait_line(r"upstream\s+: (\S+)")[1] == (
        f"http://127.0.0.1:{pins['EXTPROC_SIMULATOR_PORT']}"
    )
    resp = _post(f"http://127.0.0.1:{port}/v1", key, "/embeddings",
                 {"model": "text-embedding-3-small", "input": "pinned"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    admin = httpx.get(f"http://127.0.0.1:{pins['EXTPROC_ENVOY_ADMIN_PORT']}/clusters", timeout=5)
    # Envoy's ext_proc endpoints: each worker's own port, right after the pinned one.
    sidecar = pins["EXTPROC_SIDECAR_PORT"]
    targets = {
        line.split("::")[1] for line in admin.text.splitlines() if line.startswith("extproc::1")
    }
    assert targets == {f"127.0.0.1:{sidecar + 1}", f"127.0.0.1:{sidecar + 2}"}, admin.text
    with redis.Redis(port=pins["EXTPROC_REDIS_PORT"]) as r:
        assert r.ping()
    # Two workers, one scrape: the supervisor serves the pinned metrics port for both.
    metrics = httpx.get(f"http://127.0.0.1:{pins['EXTPROC_PROMETHEUS_PORT']}/metrics", timeout=5)
    assert 'extproc_requests_total{decision="allowed",endpoint="embeddings"' in metrics.text
    assert running.stop() == 0
    # A pinned port that is taken is refused before anything starts, naming the variable.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        refused = checkout.start(free_port(), EXTPROC_REDIS_PORT=str(taken))
        assert refused.proc.wait(WAIT_S) == 2
        assert "EXTPROC_REDIS_PORT" in refused.output


def test_make_run_reconciles_hot_adds_and_the_cli_names_its_stack(checkout: Checkout) -> None:
    """The operator's rough edges on a `make run` stack: reconcile out of the box with zero
    drift, a workspace added to the live policy served at once, and the CLI choosing the
    stack of the checkout it runs in, and saying which."""
    port = free_port()
    running = checkout.start(port)
    base, key = running.wait_line(r"OpenAI base URL : (\S+)")[1], running.demo_key()
    upstream = running.wait_line(r"upstream\s+: (\S+)")[1]
    today = datetime.now(UTC).date().isoformat()
    for model in ("codex-default", "gpt-5-nano"):
        resp = _post(base, key, "/responses", {"model": model, "input": "reconcile me"})
        assert resp.status_code == 200, resp.text
    resp = _post(base, key, "/embeddings", {"model": "text-embedding-3-small", "input": "hi"})
    assert resp.status_code == 200, resp.text
    spent = checkout.cli("ledger", "export", "--since", today, "--format", "jsonl")
    assert spent.returncode == 0, spent.stderr
    ledger_nanos = sum(json.loads(line)["cost_nanos"] for line in spent.stdout.splitlines())
    assert ledger_nanos > 0 and len(spent.stdout.splitlines()) == 3

    # No admin key, no base URL, no project ids in the demo policy: the stack's own upstream.
    agreed = checkout.cli("reconcile", "--date", today, "--json")
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    report = json.loads(agreed.stdout)  # stderr names the stack; stdout is only the JSON
    assert report["in_agreement"] is True and report["drift_usd"] == "0", report
    assert all(row["workspace"] for row in report["workspaces"]), report  # no stray project
    (dev,) = [row for row in report["workspaces"] if row["workspace"] == "dev"]
    assert dev["provider_cost_usd"] == dev["ledger_cost_usd"] == usd(ledger_nanos)
    assert f"using the stack on port {port}" in agreed.stderr
    text = checkout.cli("reconcile", "--date", today, "--base-url", upstream)  # no /v1
    assert text.returncode == 0, text.stdout + text.stderr
    assert "in agreement" in text.stdout and text.stdout.count(usd_for_people(ledger_nanos)) == 2
    wrong = checkout.cli("reconcile", "--date", today, "--base-url", f"{upstream}/api")
    assert wrong.returncode == 1 and "ending in /v1" in wrong.stderr, wrong.stderr

    # A workspace added to the live policy: served as soon as the sidecar has reloaded it.
    checkout.policy.write_text(
        checkout.policy.read_text().replace(
            "\nalerts:",
            "\n  lab:\n    budget_usd: 5\n    upstream: {key_env: OPENAI_API_KEY_LAB}\n"
            "    services:\n      notebook: {}\n\nalerts:",
            1,
        )
    )
    made = checkout.cli("keys", "create", "--workspace", "lab", "--service", "notebook", "--json")
    assert made.returncode == 0, made.stderr
    lab_key = json.loads(made.stdout)["key"]
    deadline = time.monotonic() + WAIT_S
    while True:  # the sidecar re-reads the policy about once a second: poll for it
        resp = _post(base, lab_key, "/responses", {"model": "gpt-5-nano", "input": "new here"})
        if resp.status_code != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-extproc-workspace"] == "lab"

    # A second checkout's stack: each checkout's CLI uses its own, and says which.
    other_dir = checkout.cwd.parent / "other-checkout"
    other_dir.mkdir()
    other_port = free_port()
    other = checkout.start(other_port, cwd=other_dir)
    other.demo_key()
    for where, wanted in ((checkout.cwd, port), (other_dir, other_port)):
        listed = checkout.cli("keys", "list", "--json", cwd=where)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)  # stdout is the JSON alone
        assert listed.stderr.strip() == (
            f"extproc: using the stack on port {wanted} (started in {where.resolve()})"
        )
    ambiguous = checkout.cli("keys", "list")
    assert ambiguous.returncode == 1 and "--stack PORT" in ambiguous.stderr
    assert other.stop() == 0 and running.stop() == 0
    assert "Traceback" not in running.output + other.output
