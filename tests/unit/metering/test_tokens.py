# ruff: noqa: RUF001  (the CJK corpora use fullwidth punctuation on purpose)
from __future__ import annotations

import base64
import inspect
import itertools
import json
import random
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import regex

from extproc.metering.tokens import (
    TokenCounter,
    count_text,
    default_counter,
    encoding_name_for_model,
    get_encoding,
    plan_chunks,
)

ENCODINGS = ("o200k_base", "cl100k_base")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def whole(text: str, encoding: str) -> int:
    return len(get_encoding(encoding).encode_ordinary(text))


# --- model mapping --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-nano-2025-04-14", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini-2025-08-07", "o200k_base"),
        ("gpt-5.1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-preview", "o200k_base"),
        ("o3", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5-codex", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("gpt-5.1-codex-mini", "o200k_base"),
        ("codex-mini-latest", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme:custom:abc123", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::xyz", "cl100k_base"),
        ("some-future-model", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str, expected: str) -> None:
    assert encoding_name_for_model(model) == expected


def test_count_text_uses_the_model_encoding_and_the_default_counter() -> None:
    text = "Ünïcödé ∑ 数学 " * 40
    before = default_counter().stats()
    assert count_text(text, "gpt-4o") == whole(text, "o200k_base")
    assert count_text(text, "gpt-4") == whole(text, "cl100k_base")
    assert count_text("", "gpt-4o") == 0
    assert default_counter().stats().misses >= before.misses + 2


# --- exactness ------------------------------------------------------------------------


@cache
def _source_code() -> str:
    return "".join(p.read_text() for p in sorted((STDLIB / "asyncio").glob("*.py")))[:200_000]


@cache
def _prose() -> str:
    import asyncio
    import collections
    import dataclasses
    import decimal
    import logging
    import textwrap

    docs = []
    for module in (asyncio, collections, dataclasses, decimal, logging, textwrap):
        docs.append(inspect.getdoc(module) or "")
        docs += [inspect.getdoc(v) or "" for v in vars(module).values() if callable(v)]
    return (STDLIB / "LICENSE.txt").read_text() + "\n\n".join(dict.fromkeys(docs))


def _json_text() -> str:
    rows = [
        {"id": i, "line": line, "tags": ["α", "β", str(i * 7)], "ok": i % 3 == 0, "v": i / 7}
        for i, line in enumerate(_source_code().splitlines()[:600])
    ]
    return json.dumps(rows) + json.dumps(rows[:200], indent=2, ensure_ascii=False)


def _cjk_text() -> str:
    sentences = [
        "今天的会议讨论了新系统的部署计划，大家一致认为需要先在测试环境中验证。",
        "数据库迁移预计需要三个小时，期间服务将暂停，请提前通知所有用户。",
        "東京の天気は晴れで、気温は二十五度まで上がる見込みです。",
        "このプログラムはファイルを読み込み、結果を標準出力に書き出します。",
        "오늘 회의에서는 새로운 배포 계획을 논의했습니다。",
        "版本号为v2.3.1，修复了内存泄漏（issue #4521）的问题！",
    ]
    rng = random.Random(3)
    paragraphs = []
    for p in range(40):
        body = "".join(rng.choice(sentences) for _ in range(rng.randint(10, 60)))
        paragraphs.append(f"第{p}段：{body}")
    return "\n".join(paragraphs)


def _emoji_text() -> str:
    parts = ["👍", "👨‍👩‍👧‍👦", "🇫🇷", "👋🏽", "❤️", "😀😃😄", " ", "ok ", "\n", "✅ done.", "🚀🚀"]
    rng = random.Random(9)
    return "".join(rng.choice(parts) for _ in range(20_000))


CORPORA = {
    "source": _source_code,
    "prose": _prose,
    "json": _json_text,
    "cjk": _cjk_text,
    "emoji": _emoji_text,
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_chunked_count_is_exact_on_realistic_text(corpus: str, encoding: str) -> None:
    text = CORPORA[corpus]()
    assert len(text) > 20_000
    plan = plan_chunks(text, target=600, window=300)
    assert plan.hard_cuts == 0
    assert len(plan.ends) > 30
    counter = TokenCounter(chunk_chars=600, search_chars=300)
    assert counter.count(text, encoding) == whole(text, encoding)
    assert counter.stats().hard_cuts == 0


TRICKY = [
    " ", "  ", "\n", "\r\n", "\r", "\t", "\u00a0", "\u3000", "\x85", "\u2028", "\x1c",
    "a", "A", "Ab", "hello", "World", "1", "123", "٣", "ǅ", "ʰ", "é", "e\u0301", "\u0301",
    "!", "/", "'", "'s", "'LL", "_", '"', ".", ",", "+", "=", "-", ":", "}", "/\n", "!\n/",
    "中", "文字", "。", "，", "😀", "<|endoftext|>", "\ud800",
]  # fmt: skip


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_planned_cut_keeps_the_count_exact(encoding: str) -> None:
    rng = random.Random(11)
    cuts_checked = 0
    for _ in range(300):
        text = "".join(rng.choice(TRICKY) for _ in range(rng.randint(4, 30)))
        expected = whole(text, encoding)
        for target in range(2, len(text)):
            plan = plan_chunks(text, target=target, window=target - 1)
            if plan.hard_cuts:
                continue
            bounds = (0, *plan.ends)
            counted = sum(whole(text[a:b], encoding) for a, b in itertools.pairwise(bounds))
            assert counted == expected, (text, plan)
            cuts_checked += len(plan.ends) - 1
    assert cuts_checked > 1000


def test_character_classes_match_the_pretokenizer() -> None:
    from extproc.metering import tokens

    every_char = "".join(map(chr, range(0x110000)))
    assert set(regex.findall(r"\p{White_Space}", every_char)) == tokens._WHITE_SPACE
    assert all(c.isspace() for c in tokens._WHITE_SPACE)
    alnum = "".join(c for c in every_char if c.isalnum())
    assert regex.fullmatch(r"[\p{L}\p{N}]+", alnum)
    assert regex.fullmatch(r"[^\s\p{L}\p{N}\p{M}']+", tokens._PIECE_STARTERS)


# --- worst cases ----------------------------------------------------------------------


def _pathological(n: int) -> dict[str, str]:
    rng = random.Random(5)

    def pick(alphabet: str) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return {
        "repeated": "A" * n,
        "spaces": " " * n,
        "newlines": "\n" * n,
        "digits": pick("0123456789"),
        "hex": pick("0123456789abcdef"),
        "letters": pick("abcdefghijklmnopqrstuvwxyz"),
        "cjk": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n)),
        "punct": pick("!@#$%^&*<>"),
        "mixed-space": pick(" \n\t\u3000"),
        "marks": "e\u0301" * (n // 2),
        "base64": base64.b64encode(rng.randbytes(n)).decode()[:n],
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_hard_cuts_stay_within_two_tokens_each(encoding: str) -> None:
    for name, text in _pathological(20_000).items():
        counter = TokenCounter(chunk_chars=500, search_chars=100)
        counted = counter.count(text, encoding)
        cuts = counter.stats().hard_cuts
        assert cuts <= len(text) // 400
        assert abs(counted - whole(text, encoding)) <= 2 * cuts, name


@pytest.mark.parametrize("text", [" " * 1_000_000, "\t" * 1_000_000, "A" * 1_000_000])
def test_megabyte_runs_are_fast_and_never_crash_the_tokenizer(text: str) -> None:
    # tiktoken alone panics on the first two and needs ~0.4 s CPU for the third.
    counter = TokenCounter()
    started = time.process_time()
    counted = counter.count(text, "o200k_base")
    assert time.process_time() - started < 0.1
    assert 0 < counted < len(text)


def test_special_token_text_counts_as_text() -> None:
    counter = TokenCounter()
    for text in ("<|endoftext|>", "x<|im_start|>y<|endofprompt|>" * 20):
        for encoding in ENCODINGS:
            assert counter.count(text, encoding) == whole(text, encoding) > 1


def test_lone_surrogates_are_counted_not_raised() -> None:
    counter = TokenCounter(chunk_chars=100, search_chars=50)
    text = json.loads('"a\\ud800b \\udfff "') * 200
    replaced = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    for encoding in ENCODINGS:
        assert counter.count(text, encoding) == whole(replaced, encoding)
        assert counter.count("\ud800", encoding) == whole("\ufffd", encoding)


# --- cache ----------------------------------------------------------------------------


def _history(turns: int) -> list[str]:
    code = _source_code()
    return [code[i * 2000 : i * 2000 + 1500 + i] for i in range(turns)]


def test_repeated_history_is_served_from_the_cache() -> None:
    counter = TokenCounter()
    history = _history(40)
    first = [counter.count(t, "o200k_base") for t in history]
    assert counter.stats().misses == 40
    # JSON parsing yields new string objects each request; equal content must still hit.
    again = json.loads(json.dumps([*history, "a brand new user turn " * 5]))
    second = [counter.count(t, "o200k_base") for t in again]
    stats = counter.stats()
    assert second[:40] == first
    assert (stats.hits, stats.misses) == (40, 41)
    assert stats.cached_entries == 41
    assert stats.cached_chars == sum(map(len, again))
    assert counter.count(history[0], "cl100k_base") == whole(history[0], "cl100k_base")
    assert counter.stats().misses == 42


def test_short_strings_bypass_the_cache() -> None:
    counter = TokenCounter(min_cached_chars=64)
    assert counter.count("hi there", "o200k_base") == 2
    assert counter.count("hi there", "o200k_base") == 2
    stats = counter.stats()
    assert (stats.hits, stats.misses, stats.cached_entries) == (0, 0, 0)


def test_cache_is_bounded_and_evicts_least_recently_used() -> None:
    budget = 10 * (1000 + TokenCounter.ENTRY_OVERHEAD_CHARS)
    counter = TokenCounter(cache_chars=budget)
    texts = [f"{i:04d} " + "word " * 199 for i in range(12)]
    for text in texts[:10]:
        counter.count(text, "o200k_base")
    counter.count(texts[0], "o200k_base")
    counter.count(texts[10], "o200k_base")
    counter.count(texts[11], "o200k_base")
    stats = counter.stats()
    assert stats.cached_entries == 10
    assert stats.cached_chars == 10 * 1000
    hits = stats.hits
    counter.count(texts[0], "o200k_base")
    assert counter.stats().hits == hits + 1
    counter.count(texts[1], "o200k_base")
    assert counter.stats().hits == hits + 1
    counter.count("x" * (budget + 1), "o200k_base")
    assert counter.stats().cached_chars <= budget


def test_appended_text_resumes_from_the_cached_prefix() -> None:
    counter = TokenCounter(chunk_chars=1000, search_chars=300)
    base = _prose() + _source_code()
    grown = base + "\n\nuser: and one more question about the code above?"
    assert counter.count(base, "o200k_base") == whole(base, "o200k_base")
    assert counter.count(grown, "o200k_base") == whole(grown, "o200k_base")
    assert counter.stats().resumed == 1
    grown_again = grown + "\n\nassistant: here is the answer."
    assert counter.count(grown_again, "o200k_base") == whole(grown_again, "o200k_base")
    assert counter.stats().resumed == 2
    edited = grown[:5000] + "CHANGED" + grown_again[5000:]
    assert counter.count(edited, "o200k_base") == whole(edited, "o200k_base")
    assert counter.stats().resumed == 2


def test_resumed_count_matches_a_fresh_count_even_across_hard_cuts() -> None:
    base = "0123456789" * 5_000 + " tail"
    grown = base + " and more digits 42" * 10
    warm = TokenCounter(chunk_chars=1000, search_chars=100)
    warm.count(base, "o200k_base")
    resumed = warm.count(grown, "o200k_base")
    assert warm.stats().resumed == 1
    assert resumed == TokenCounter(chunk_chars=1000, search_chars=100).count(grown, "o200k_base")


def test_concurrent_counting_matches_sequential_counting() -> None:
    texts = [*_history(60), _cjk_text()[:30_000], _emoji_text()[:30_000]]
    expected = [whole(t, "o200k_base") for t in texts]
    counter = TokenCounter(chunk_chars=4000, search_chars=1000)
    barrier = threading.Barrier(4)

    def work(offset: int) -> list[int]:
        barrier.wait()
        order = texts[offset:] + texts[:offset]
        counts = [counter.count(t, "o200k_base") for t in order]
        return counts[len(texts) - offset :] + counts[: len(texts) - offset]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, (0, 15, 30, 45)))
    assert all(r == expected for r in results)
    stats = counter.stats()
    assert stats.hits + stats.misses == 4 * len(texts)
    assert stats.cached_entries == len(texts)
