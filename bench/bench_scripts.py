"""Redis work per enforced request (one reserve, one settle): these scripts against a revision's.

Both scripts are fed the arguments the sidecar builds for `make bench`'s request (the bench
policy, a key with a rate limit, a chat completion with its orphan settlement), in batches
of pipelined calls, alternating between the two versions on one server, each under its own
workspace. Under `--callgrind` (valgrind installed) the figure is instructions executed by
the server per request, exact to a fraction of a percent run to run; without, it is the
server's CPU time (INFO cpu), which a shared machine makes noisy. `--aof` turns on the
append-only file, as deployed (each write a script makes is also appended there).

Settlement: a version whose settle script takes a batch (this tree's) gets `--batch`
settlements per call, as the ledger writer sends them (one call per workspace and loop
turn); a revision whose settle.lua settles one request per call (before the batched one)
gets one call per request, its arguments laid out as it expects.

    .venv/bin/python bench/bench_scripts.py --against main --callgrind --aof --batch 8
"""

from __future__ import annotations

import argparse
import glob
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import BENCH_POLICY  # noqa: E402

SCRIPTS = ("reserve", "settle")
_BATCH = 16


def sources(revision: str | None) -> dict[str, str]:
    """The reserve and settle sources (settle with release.lua before it, as loaded)."""

    def read(name: str) -> str:
        path = f"extproc/store/lua/{name}.lua"
        if revision is None:
            return (ROOT / path).read_text()
        show = ["git", "-C", str(ROOT), "show", f"{revision}:{path}"]
        return subprocess.run(show, capture_output=True, text=True, check=True).stdout

    return {"reserve": read("reserve"), "settle": read("release") + read("settle")}


def batched(source: str) -> bool:
    """Whether a settle.lua settles a batch per call (this tree's) or one request."""
    return "then m items" in source


def legacy_settle(item: list[Any], maxlen: int, window: int) -> list[Any]:
    """One settlement's item (this tree's layout) as a per-request settle.lua wants it."""
    return [*item[:7], maxlen, *item[7:], window]


def request_args(now_ms: int) -> Callable[[str], tuple[list[Any], list[Any]]]:
    """Reserve arguments and the settle item of one bench request, as the sidecar builds
    them (the item is one settlement's part of a settle call)."""
    from extproc.governance.budget import _args, plan_request
    from extproc.governance.keys import Identity
    from extproc.governance.policy import parse_policy_text
    from extproc.metering.ledger import Ledger
    from extproc.metering.prices import PriceTable
    from extproc.metering.settlement import Charged, settlement_for
    from extproc.store.schema import workspace_prefix
    from extproc.v1.ledger_pb2 import UsageRecord

    policy, prices = parse_policy_text(BENCH_POLICY), PriceTable.load()
    who = Identity("key_bench", "bench", None, "load", None, 0)
    plan = plan_request(
        policy, who, model="gpt-5-mini", counted_input=18, output_cap=16, prices=prices,
        now_ms=now_ms,
    )  # fmt: skip
    ledger = Ledger(None, spool_dir=tempfile.gettempdir())  # type: ignore[arg-type]
    local = datetime.fromtimestamp(now_ms / 1000, UTC)

    def settlement(request_id: str, rid: str, cost: int) -> Any:
        record = UsageRecord(
            request_id=request_id, time_ms=now_ms, cost_nanos=cost, workspace="bench",
            service="load", key_id="key_bench", model_served="gpt-5-mini", input_tokens=18,
            output_tokens=16,
        )  # fmt: skip
        charged = [Charged(s.scope, s.soft_nanos) for s in plan.scopes]
        return settlement_for(
            record, charged, prefix=plan.prefix, period_id=plan.period.id, local_time=local,
            prices=prices,
            reservation_id=rid, attributed=True,
        )  # fmt: skip

    def one(workspace: str) -> tuple[list[Any], list[Any]]:
        rid, request_id = uuid.uuid4().hex, uuid.uuid4().hex
        orphan = settlement(request_id, "", 34_000).SerializeToString()
        prefix = workspace_prefix(workspace)
        reserve = [1, prefix, *_args(plan, rid, now_ms, orphan=orphan)]
        settle = [prefix, *ledger.settle_args([settlement(request_id, rid, 36_500)])[3:]]
        return reserve, settle

    return one


class Server:
    """A Redis-protocol server, under callgrind if asked; `work()` = work since last call."""

    def __init__(self, directory: Path, *, callgrind: bool, aof: bool) -> None:
        import redis

        from extproc.devstack.stack import free_port, redis_server_binary

        self.port, self.dir, self.callgrind = free_port(), directory, callgrind
        argv = [redis_server_binary(), "--port", str(self.port), "--save", "", "--dir",
                str(directory), "--appendonly", "yes" if aof else "no"]  # fmt: skip
        if callgrind:
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/cg.%p",
                    *argv]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the server (under valgrind: slowly) is still starting
        self._cpu = self._server_cpu()

    def _server_cpu(self) -> float:
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"])

    def work(self) -> float:
        """Instructions (callgrind: a dump zeroes the counters) or CPU µs since last call."""
        if self.callgrind:
            before = set(glob.glob(f"{self.dir}/cg.*"))
            subprocess.run(["callgrind_control", "-d", str(self.proc.pid)], capture_output=True)
            (dump,) = set(glob.glob(f"{self.dir}/cg.*")) - before
            for line in Path(dump).read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return float(line.split()[1])
            raise RuntimeError(f"no totals in {dump}")
        last, self._cpu = self._cpu, self._server_cpu()
        return (self._cpu - last) * 1e6

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def measure(
    server: Server,
    shas: dict[str, str],
    workspace: str,
    one: Callable[..., Any],
    n: int,
    batch: int | None,
) -> tuple[float, float]:
    """(work per request, Redis commands run inside the scripts per request).

    `batch`: settlements per settle call, or None for a per-request settle script."""
    from extproc.metering.ledger import SEEN_WINDOW_S

    maxlen = 1_000_000
    requests = [one(workspace) for _ in range(n)]
    server.client.config_resetstat()
    server.work()
    for start in range(0, n, _BATCH):
        chunk = requests[start : start + _BATCH]
        pipe = server.client.pipeline(transaction=False)
        for reserve, _ in chunk:
            pipe.execute_command("EVALSHA", shas["reserve"], *reserve)
        for reply in pipe.execute():
            assert reply[0] == b"ok", reply
        pipe = server.client.pipeline(transaction=False)
        if batch is None:
            for _, (prefix, *item) in chunk:
                args = legacy_settle(item, maxlen, SEEN_WINDOW_S)
                pipe.execute_command("EVALSHA", shas["settle"], 1, prefix, *args)
            for reply in pipe.execute():
                assert reply[0] == b"ok", reply
            continue
        for at in range(0, len(chunk), batch):
            part = chunk[at : at + batch]
            items = [x for _, (_prefix, *item) in part for x in item]
            prefix = part[0][1][0]
            args = [len(part), maxlen, SEEN_WINDOW_S, *items]
            pipe.execute_command("EVALSHA", shas["settle"], 1, prefix, *args)
        for reply in pipe.execute():
            assert set(reply[0].decode()) == {"1"}, reply
    work = server.work() / n
    stats = server.client.info("commandstats")
    inner = sum(
        v["calls"] for k, v in stats.items() if k.split("_", 1)[1] not in ("evalsha", "info")
    )
    return work, inner / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--aof", action="store_true", help="append-only file on, as deployed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="per round and version")
    parser.add_argument("--batch", type=int, default=8, help="settlements per batched call")
    opts = parser.parse_args()

    versions = {opts.against: sources(opts.against), "this tree": sources(None)}
    one = request_args(int(time.time() * 1000))
    with tempfile.TemporaryDirectory(prefix="extproc-bench-scripts-") as tmp:
        server = Server(Path(tmp), callgrind=opts.callgrind, aof=opts.aof)
        try:
            shas = {
                name: {s: server.client.script_load(src[s]) for s in SCRIPTS}
                for name, src in versions.items()
            }
            figures: dict[str, list[float]] = {name: [] for name in versions}
            calls: dict[str, float] = {}
            for round_ in range(opts.rounds):
                order = list(versions) if round_ % 2 == 0 else list(versions)[::-1]
                for name in order:
                    ws = "bench-" + ("a" if name == opts.against else "b")
                    batch = opts.batch if batched(versions[name]["settle"]) else None
                    work, calls[name] = measure(server, shas[name], ws, one, opts.requests, batch)
                    figures[name].append(work)
        finally:
            server.stop()
    unit = "instructions" if opts.callgrind else "CPU µs"
    print(f"Redis {unit} per request (reserve + settle; batched settle: {opts.batch} per "
          f"call), AOF {'on' if opts.aof else 'off'}, "
          f"median of {opts.rounds} alternating rounds [min, max]:")  # fmt: skip
    for name, values in figures.items():
        print(f"  {name:>12}: {statistics.median(values):>10,.0f} [{min(values):,.0f}, "
              f"{max(values):,.0f}]  commands inside the scripts: {calls[name]:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
