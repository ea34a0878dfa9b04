"""HPACK's Huffman code (RFC 7541 Appendix B), decode side only.

The code is canonical, so the code lengths alone define it: the table below is one letter
per symbol (`A` = 5 bits ... `Z` = 30 bits, symbols 0..255 then EOS) and the codes are
rebuilt from it at import. Decoding reads a 30-bit window (the longest code) and finds the
code length with one `bisect` over the per-length upper bounds, so a symbol costs a few
integer operations instead of a walk down a tree bit by bit.
"""

from __future__ import annotations

from bisect import bisect_right

EOS = 256
_LONGEST = 30
_WINDOW = (1 << _LONGEST) - 1
_LENGTH_LETTERS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCCDC"
    "DIOIJBKABABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSSQQRQS"
    "RSSPRRRSRRSVVPORSRUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ"
)
LENGTHS: tuple[int, ...] = tuple(ord(c) - ord("A") + 5 for c in _LENGTH_LETTERS)


class HuffmanError(ValueError):
    pass


def canonical_codes(lengths: tuple[int, ...]) -> list[int]:
    """Codes of a canonical prefix code: by (length, symbol), each one more than the last."""
    codes = [0] * len(lengths)
    code = -1
    prev = 0
    for sym in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[sym] - prev)
        prev = lengths[sym]
        codes[sym] = code
    return codes


CODES: tuple[int, ...] = tuple(canonical_codes(LENGTHS))


def _decode_tables() -> tuple[list[int], list[int], list[int], list[int]]:
    symbols = sorted(range(len(LENGTHS)), key=lambda s: (LENGTHS[s], s))
    limits: list[int] = []
    shifts: list[int] = []
    bases: list[int] = []
    for i, sym in enumerate(symbols):
        length = LENGTHS[sym]
        if i + 1 < len(symbols) and LENGTHS[symbols[i + 1]] == length:
            continue
        first = i
        while first > 0 and LENGTHS[symbols[first - 1]] == length:
            first -= 1
        shift = _LONGEST - length
        limits.append((CODES[sym] + 1) << shift)
        shifts.append(shift)
        bases.append(first - CODES[symbols[first]])
    return limits, shifts, bases, symbols


_LIMITS, _SHIFTS, _BASES, _SYMBOLS = _decode_tables()
_FAST_BITS = 12


def _fast_table() -> list[int]:
    """Top 12 bits of the window -> symbol << 5 | length, or -1 when the code is longer."""
    table = [-1] * (1 << _FAST_BITS)
    for sym, length in enumerate(LENGTHS):
        if length <= _FAST_BITS:
            start = CODES[sym] << (_FAST_BITS - length)
            for i in range(start, start + (1 << (_FAST_BITS - length))):
                table[i] = sym << 5 | length
    return table


_FAST = _fast_table()


def huffman_decode(raw: bytes) -> bytes:
    """Decode a Huffman-coded string; padding must be under 8 bits of ones, EOS is refused."""
    left = len(raw) * 8
    bits = (int.from_bytes(raw, "big") << _LONGEST) | _WINDOW
    out = bytearray()
    fast = _FAST
    fast_shift = _LONGEST - _FAST_BITS
    while left > 0:
        window = (bits >> left) & _WINDOW
        hit = fast[window >> fast_shift]
        if hit >= 0:
            sym = hit >> 5
            length = hit & 31
        else:
            group = bisect_right(_LIMITS, window)
            shift = _SHIFTS[group]
            sym = _SYMBOLS[(window >> shift) + _BASES[group]]
            length = _LONGEST - shift
        if length > left or sym == EOS:
            if left > 7 or (bits >> _LONGEST) & ((1 << left) - 1) != (1 << left) - 1:
                raise HuffmanError("invalid Huffman padding or EOS in string")
            break
        out.append(sym)
        left -= length
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    """Encode with HPACK's Huffman code (used by tests and to pre-compute header blocks)."""
    acc = 0
    nbits = 0
    for byte in data:
        acc = (acc << LENGTHS[byte]) | CODES[byte]
        nbits += LENGTHS[byte]
    pad = -nbits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((nbits + pad) // 8, "big")
