"""Ordinary traffic, in the shapes real clients send, for testing the runaway breaker.

A breaker that trips on ordinary work is worse than none, so it is measured against what
ordinary work looks like:

* Codex sessions: the first request's input items have the sizes the real Codex CLI 0.171
  sends (measured against the simulator: its tool list, its instructions and the context
  messages, `CODEX_FIRST_ITEMS`); each agent step then appends a reasoning item, a tool call
  and its output (a file read, a test run), each turn an answer and the next question, with
  a person's pauses between turns and seconds between steps. The history grows every request,
  so no two requests of a session are the same, and a session restarted with the same prompt
  repeats its first request a few times.
* CI: waves of pull-request reviews (a merge train), each job sending the same repository
  context with its own diff, two calls per job, one job in five retried as is.
* A nightly-style batch of small calls (embeddings-sized: under the repeat rule's floor).

`normal_traffic()` is 30 minutes of it with its own clock (seconds from the start), the same
for every run (a seeded generator); `runaway_loop()` is the script that sends one 20k-token
request over and over. `records()` turns calls into ledger records for the breaker's unit
tests; `body()` into request bodies for the end-to-end test.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from extproc.metering.prices import PriceTable
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.usage import Usage

CODEX_FIRST_ITEMS = (6533, 5338, 851, 619, 108, 184, 56)
"""Tokens per input item of Codex CLI 0.171's first request (tools, instructions, context)."""
CODEX_MODEL = "gpt-5.1-codex"
CI_MODEL = "gpt-4.1-mini"
WORDS = (  # noqa: SIM905
    "the of and to in is that for it with as was on be by this are from or at an have not "
    "but which they you were their all one can has will there more if about when what so "
    "some would other into than its time only could new these two may first then do any "
    "like my now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here"
).split()


@dataclass
class Call:
    at_s: float  # seconds from the start of the traffic
    who: str  # the key that sends it ("dev1", "ci-bot", "loop", ...)
    session: str
    items: list[tuple[str, int]]  # (item id, tokens): same id, same text
    model: str
    output_tokens: int
    endpoint: str = "responses"  # or "chat.completions"

    @property
    def input_tokens(self) -> int:
        return sum(n for _i, n in self.items)


@dataclass
class _Session:
    who: str
    name: str
    items: list[tuple[str, int]] = field(default_factory=list)


def _item(rng: random.Random, tokens: int) -> tuple[str, int]:
    return f"i{rng.getrandbits(48):x}", tokens


def codex_session(rng: random.Random, who: str, start: float, turns: int) -> list[Call]:
    s = _Session(who, f"{who}-{rng.getrandbits(32):x}")
    s.items = [(f"codex-{k}", n) for k, n in enumerate(CODEX_FIRST_ITEMS[:-1])]
    s.items.append(_item(rng, CODEX_FIRST_ITEMS[-1]))  # the question
    calls, t = [], start
    for turn in range(turns):
        for _step in range(rng.randint(2, 12)):
            out = rng.randint(80, 700)
            calls.append(Call(t, who, s.name, list(s.items), CODEX_MODEL, out))
            # reasoning, the tool call and its output join the history
            s.items += [_item(rng, rng.randint(60, 400)), _item(rng, rng.randint(30, 120)),
                        _item(rng, rng.choice((150, 400, 900, 2500, 4000)))]  # fmt: skip
            t += rng.uniform(3, 15)
        calls.append(Call(t, who, s.name, list(s.items), CODEX_MODEL, rng.randint(200, 900)))
        s.items += [_item(rng, rng.randint(200, 900)), _item(rng, rng.randint(20, 200))]
        t += rng.uniform(30, 240) if turn < turns - 1 else 0
    return calls


def ci_wave(rng: random.Random, start: float, jobs: int, spread_s: float) -> list[Call]:
    repo = ("repo-context", 20_000)
    system = ("review-instructions", 1_200)
    calls = []
    for job in range(jobs):
        t = start + rng.uniform(0, spread_s)
        diff = _item(rng, rng.randint(800, 6_000))
        review = Call(t, "ci-bot", "", [system, repo, diff], CI_MODEL, rng.randint(300, 1500),
                      "chat.completions")  # fmt: skip
        calls.append(review)
        if job % 5 == 0:  # a 502 upstream of the bot: the same call again, a few seconds on
            calls.append(Call(t + rng.uniform(2, 8), **_same(review)))
        summary = [system, diff, _item(rng, rng.randint(300, 1500))]
        calls.append(Call(t + rng.uniform(10, 30), "ci-bot", "", summary, CI_MODEL, 300,
                          "chat.completions"))  # fmt: skip
    return calls


def _same(call: Call) -> dict[str, object]:
    return {"who": call.who, "session": call.session, "items": call.items, "model": call.model,
            "output_tokens": call.output_tokens, "endpoint": call.endpoint}  # fmt: skip


def normal_traffic(seed: int = 22, minutes: int = 30) -> list[Call]:
    """`minutes` of four developers in Codex and a CI bot's waves, in time order."""
    rng = random.Random(seed)
    calls: list[Call] = []
    end = minutes * 60
    for dev in ("dev1", "dev2", "dev3", "dev4"):
        t = rng.uniform(0, 120)
        while t < end - 60:
            session = codex_session(rng, dev, t, rng.randint(2, 6))
            calls += [c for c in session if c.at_s < end]
            t = (session[-1].at_s if session else t) + rng.uniform(60, 300)
        # the same `codex exec` started again a few times (a flaky local setup)
    first = next(c for c in calls if c.who == "dev2")
    calls += [Call(first.at_s + 20 * k, **_same(first)) for k in (1, 2, 3)]
    for start, jobs, spread in ((180, 8, 90), (840, 15, 120), (1500, 5, 60)):
        calls += ci_wave(rng, start, jobs, spread)
    for k in range(120):  # a batch of small calls: under the repeat rule's floor
        calls.append(Call(600 + k * 0.5, "batch", "", [("batch-doc", 300)], "gpt-4o-mini", 50,
                          "chat.completions"))  # fmt: skip
    return sorted(calls, key=lambda c: c.at_s)


def runaway_loop(
    start: float, count: int, tokens: int = 20_000, every_s: float = 1.0
) -> list[Call]:
    """A script sending the same request again and again."""
    items = [("loop-system", 500), ("loop-context", tokens - 500)]
    return [Call(start + k * every_s, "loop", "", items, "gpt-4o-mini", 200, "chat.completions")
            for k in range(count)]  # fmt: skip


# --- as ledger records (unit tests) -----------------------------------------------------------

PRICES = PriceTable.load()


def _fingerprint(call: Call) -> str:
    """What `insight.cachehygiene` makes of the whole request (its texts are the item ids)."""
    digest = hashlib.blake2b(call.model.encode(), digest_size=16)
    for item_id, tokens in call.items:
        digest.update(f"{item_id}:{tokens}".encode())
    return digest.hexdigest()


def record(call: Call, t0_ms: int, workspace: str = "dev", service: str = "") -> UsageRecord:
    usage = Usage(call.input_tokens, 0, call.output_tokens, 0)
    return UsageRecord(
        request_id=hashlib.sha1(f"{call.at_s}{call.who}{call.input_tokens}".encode()).hexdigest(),
        time_ms=t0_ms + int(call.at_s * 1000),
        endpoint=call.endpoint,
        model_requested=call.model,
        model_served=call.model,
        input_tokens=call.input_tokens,
        counted_input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        cost_nanos=PRICES.charge(call.model, usage).nanos,
        outcome="completed",
        workspace=workspace,
        service=service or call.who,
        key_id=f"key_{call.who}",
        session_id=call.session,
        request_fingerprint=_fingerprint(call) if call.input_tokens >= 1024 else "",
    )


def records(calls: list[Call], t0_ms: int) -> list[UsageRecord]:
    return [record(c, t0_ms) for c in calls]


# --- as request bodies (the end-to-end test) ---------------------------------------------------


def text(item_id: str, tokens: int) -> str:
    """About `tokens` tokens of words, the same for the same item id."""
    rng = random.Random(item_id)
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def body(call: Call, *, stream: bool = False, texts: list[str] | None = None) -> dict[str, object]:
    texts = texts if texts is not None else [text(i, n) for i, n in call.items]
    if call.endpoint == "chat.completions":
        messages = [{"role": "system", "content": texts[0]}]
        messages += [{"role": "user", "content": t} for t in texts[1:]]
        return {"model": call.model, "messages": messages, "max_completion_tokens": 2000}
    items = [{"role": "developer", "content": t} for t in texts[:-1]]
    items.append({"role": "user", "content": texts[-1]})
    return {"model": call.model, "input": items, "max_output_tokens": 2000, "stream": stream}


# --- played through a gateway (the end-to-end test) --------------------------------------------

_TEXTS: dict[tuple[str, int], str] = {}


def cached_text(item_id: str, tokens: int) -> str:
    """`text`, made once per item: a session re-sends its whole history every request."""
    found = _TEXTS.get((item_id, tokens))
    if found is None:
        found = _TEXTS[(item_id, tokens)] = text(item_id, tokens)
    return found


def play(
    calls: list[Call], base_url: str, keys: dict[str, str], *, speed: float, timeout: float = 60
) -> list[tuple[Call, int]]:
    """Send each call at its time divided by `speed` (one thread per sender, each sender's
    calls in order, as a person or a bot sends them); (call, HTTP status) for each."""
    import threading
    import time

    import httpx

    by_who: dict[str, list[Call]] = {}
    for c in calls:
        by_who.setdefault(c.who, []).append(c)
    results: list[tuple[Call, int]] = []
    lock = threading.Lock()
    start = time.monotonic() + 1.0

    def sender(who: str, mine: list[Call]) -> None:
        with httpx.Client(timeout=timeout, headers={"authorization": f"Bearer {keys[who]}"}) as h:
            for c in mine:
                wait = start + c.at_s / speed - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # pacing the load, not waiting for a result
                path = "/responses" if c.endpoint == "responses" else "/chat/completions"
                sent = body(c, texts=[cached_text(i, n) for i, n in c.items])
                status = h.post(base_url + path, json=sent).status_code
                with lock:
                    results.append((c, status))

    threads = [threading.Thread(target=sender, args=item) for item in by_who.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
