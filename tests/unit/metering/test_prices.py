from __future__ import annotations

import random
import time
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from extproc.metering import prices
from extproc.metering.prices import (
    NANOS_PER_DOLLAR,
    Charge,
    Price,
    PriceTable,
    PriceTableError,
    default_table,
    usd,
)
from extproc.wire.usage import Usage

REQUIRED_FAMILIES = (
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5-codex",
    "gpt-5.1",
    "gpt-5.1-codex",
    "gpt-5.1-codex-mini",
    "codex-mini-latest",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "o4-mini",
    "o3-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "gpt-3.5-turbo",
)
EMBEDDINGS = ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002")


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


# --- the bundled table ----------------------------------------------------------------


def test_bundled_table_is_versioned_and_loads_fast() -> None:
    started = time.perf_counter()
    table = PriceTable.load()
    assert time.perf_counter() - started < 0.05
    assert table.version
    assert table.updated >= date(2025, 8, 7)
    assert default_table() is default_table()


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_every_required_family_is_present_and_priced(table: PriceTable, family: str) -> None:
    price, known = table.price_for(family)
    assert known
    assert price.family == family
    assert price.input > 0
    assert 0 <= price.cached_input <= price.input
    assert price.source.startswith("https://")
    assert price.as_of <= table.updated
    if family in EMBEDDINGS:
        assert (price.cached_input, price.output) == (price.input, 0)
    else:
        assert price.output > price.input


def test_fallback_is_at_least_every_listed_rate(table: PriceTable) -> None:
    fallback = table.fallback
    assert fallback.family == "fallback"
    for family in table.families():
        price, _ = table.price_for(family)
        assert fallback.input >= price.input
        assert fallback.cached_input >= price.cached_input
        assert fallback.output >= price.output


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("gpt-5", ("1.25", "0.125", "10.00")),
        ("gpt-5-mini", ("0.25", "0.025", "2.00")),
        ("gpt-5-nano", ("0.05", "0.005", "0.40")),
        ("codex-mini-latest", ("1.50", "0.375", "6.00")),
        ("gpt-4.1-nano", ("0.10", "0.025", "0.40")),
        ("o4-mini", ("1.10", "0.275", "4.40")),
    ],
)
def test_spot_prices(table: PriceTable, family: str, expected: tuple[str, str, str]) -> None:
    price, _ = table.price_for(family)
    assert (price.input, price.cached_input, price.output) == tuple(map(Decimal, expected))


# --- family resolution ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-chat-latest", "gpt-5"),
        ("gpt-5.1-2025-11-13", "gpt-5.1"),
        ("gpt-5.1-chat-latest", "gpt-5.1"),
        ("gpt-5-codex", "gpt-5-codex"),
        ("gpt-5.1-codex", "gpt-5.1-codex"),
        ("gpt-5.1-codex-mini", "gpt-5.1-codex-mini"),
        ("codex-mini-latest", "codex-mini-latest"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-2025-04-16", "o3"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("text-embedding-3-small", "text-embedding-3-small"),
        ("ft:gpt-4o-mini-2024-07-18:acme::AbC123", "gpt-4o-mini"),
        ("ft:gpt-4.1-nano:acme:custom-suffix:xyz", "gpt-4.1-nano"),
        ("  GPT-4o-Mini  ", "gpt-4o-mini"),
    ],
)
def test_family_of(table: PriceTable, model: str, family: str) -> None:
    assert table.family_of(model) == family


@pytest.mark.parametrize(
    "model",
    [
        "gpt-5-pro",  # far more expensive than gpt-5: never priced as its base
        "gpt-4o-realtime-preview",
        "o3-pro",
        "o3-deep-research",
        "gpt-5.1-codex-max",
        "gpt-4",
        "gpt-4-0613",
        "chatgpt-4o-latest",
        "gpt-5.10",
        "gpt-4o-minimal",
        "-latest",
        "",
        "ft:",
        "unknown-model",
    ],
)
def test_unlisted_models_do_not_borrow_a_neighbours_price(table: PriceTable, model: str) -> None:
    assert table.family_of(model) is None
    assert table.price_for(model) == (table.fallback, False)


def test_families_are_remembered_per_table_and_the_memo_is_bounded(table: PriceTable) -> None:
    fresh = PriceTable.load()
    names = ["gpt-4o-mini-2024-07-18", "unknown-model", "  GPT-4o-Mini  "]
    assert [fresh.family_of(n) for n in names * 2] == ["gpt-4o-mini", None, "gpt-4o-mini"] * 2
    for n in range(prices._FAMILY_MEMO + 10):
        assert fresh.family_of(f"no-such-model-{n}") is None
    assert len(fresh._families) <= prices._FAMILY_MEMO
    assert fresh.family_of("gpt-5-mini-2025-08-07") == "gpt-5-mini"


def test_integer_rates_are_the_decimal_rates(table: PriceTable) -> None:
    for family in table.families():
        price, _known = table.price_for(family)
        rates = (price.input, price.cached_input, price.output)
        assert price.nanos == tuple(prices.nanos_per_token(r) for r in rates)
        assert all(Decimal(n) == r * 1000 for n, r in zip(price.nanos, rates, strict=True))


# --- charging -------------------------------------------------------------------------


def test_gpt5_charge_by_hand(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=1_000_000,
        cached_input_tokens=400_000,
        output_tokens=10_000,
        reasoning_tokens=2_000,
    )
    # 600,000 uncached x $1.25/M = $0.75; 400,000 cached x $0.125/M = $0.05;
    # 10,000 output (reasoning included) x $10/M = $0.10. Total $0.90.
    charge = table.charge("gpt-5-2025-08-07", usage)
    assert charge == Charge(nanos=900_000_000, family="gpt-5", fallback=False)
    assert charge.usd == Decimal("0.9")
    assert charge.nanos == 750_000_000 + 50_000_000 + 100_000_000


@pytest.mark.parametrize(
    ("model", "usage", "nanos"),
    [
        # 3 input tokens at $0.15/M = 450 nanos; 1 cached at $0.075/M = 75; 7 output at $0.60/M.
        ("gpt-4o-mini", Usage(4, 1, 7, 0), 3 * 150 + 75 + 7 * 600),
        ("gpt-5-nano", Usage(1, 1, 1, 1), 5 + 400),
        ("o4-mini", Usage(1_000, 200, 3_000, 2_500), 800 * 1_100 + 200 * 275 + 3_000 * 4_400),
        ("text-embedding-3-small", Usage(123_457, 0, 0, 0), 123_457 * 20),
        ("gpt-3.5-turbo", Usage(10, 10, 0, 0), 10 * 500),
        ("codex-mini-latest", Usage(0, 0, 0, 0), 0),
    ],
)
def test_exact_nanos(table: PriceTable, model: str, usage: Usage, nanos: int) -> None:
    assert table.charge(model, usage).nanos == nanos


def test_reasoning_tokens_are_never_added_on_top_of_output(table: PriceTable) -> None:
    without = table.charge("o3", Usage(100, 0, 500, 0))
    with_reasoning = table.charge("o3", Usage(100, 0, 500, 499))
    assert with_reasoning.nanos == without.nanos == 100 * 2_000 + 500 * 8_000


def test_inconsistent_usage_is_clamped_not_double_billed(table: PriceTable) -> None:
    assert table.charge("gpt-5", Usage(100, 250, 0, 0)).nanos == 100 * 125
    assert table.charge("gpt-5", Usage(-5, -1, -7, 0)).nanos == 0


def test_unknown_model_is_charged_at_the_fallback_and_flagged(table: PriceTable) -> None:
    usage = Usage(1_000, 0, 1_000, 0)
    charge = table.charge("gpt-7-ultra", usage)
    assert charge.fallback
    assert charge.family == "fallback"
    assert charge.nanos == 1_000 * 2_500 + 1_000 * 10_000
    assert charge.nanos >= max(table.charge(f, usage).nanos for f in table.families())


def test_caller_supplied_fallback_wins(tmp_path: Path) -> None:
    custom = Price(
        family="fallback",
        input=Decimal("30"),
        cached_input=Decimal("3"),
        output=Decimal("180"),
        source="https://example.com/prices",
        as_of=date(2026, 1, 1),
    )
    path = tmp_path / "prices.toml"
    path.write_text(MINIMAL)
    table = PriceTable.load(path, fallback=custom)
    assert table.charge("mystery", Usage(1, 0, 1, 0)) == Charge(30_000 + 180_000, "fallback", True)
    assert PriceTable.load(path).charge("gpt-z", Usage(1, 0, 0, 0)).nanos == 1_250


def _decimal_usd(nanos: int, *, cents: bool, grouped: bool) -> str:
    """The oracle: the same amount written by Decimal (ROUND_HALF_UP rounds ties away from 0)."""
    amount = Decimal(nanos).scaleb(-9)
    amount = amount.quantize(Decimal("0.01"), ROUND_HALF_UP) if cents else amount.normalize()
    return f"{amount:,f}" if grouped else f"{amount:f}"


def test_usd_integer_arithmetic_writes_what_decimal_writes() -> None:
    rng = random.Random(10)
    edges = [0, 1, -1, 4_999_999, 5_000_000, 9_995_000_000, 10 * NANOS_PER_DOLLAR, -5_000_000]
    samples = edges + [rng.randrange(-(10**15), 10**15) for _ in range(3000)]
    samples += [rng.randrange(-(10**10), 10**10) // 10 ** rng.randrange(0, 9) for _ in range(3000)]
    for n in samples:
        for cents in (False, True):
            assert usd(n, cents=cents) == _decimal_usd(n, cents=cents, grouped=False), n
            assert usd(n, cents=cents, grouped=True) == _decimal_usd(n, cents=cents, grouped=True)
            assert usd(n, cents=cents, sign=True) == "$" + usd(n, cents=cents)
    assert usd(1_234_500_000_000, grouped=True) == "1,234.5"
    assert (usd(0), usd(-1, cents=True), usd(12_500_000_000)) == ("0", "-0.00", "12.5")


def test_usd_is_exact() -> None:
    assert Charge(1, "gpt-5", False).usd == Decimal("0.000000001")
    assert Charge(123 * NANOS_PER_DOLLAR + 7, "gpt-5", False).usd == Decimal("123.000000007")


def test_usd_for_people_rounds_to_the_cent_but_never_hides_spend() -> None:
    from extproc.metering.prices import usd_for_people

    assert usd_for_people(0) == "$0.00"
    assert usd_for_people(1_087_000) == "$0.001087"  # not "$0.00"
    assert usd_for_people(1) == "$0.000000001"
    assert usd_for_people(-262_500) == "$-0.0002625"
    assert usd_for_people(9_999_999) == "$0.009999999"  # still under a cent: exact
    assert usd_for_people(10_000_000) == "$0.01"
    assert usd_for_people(14_999_999) == "$0.01"
    assert usd_for_people(15_000_000) == "$0.02"  # half up
    assert usd_for_people(1_234_567 * NANOS_PER_DOLLAR // 100) == "$12,345.67"
    assert usd_for_people(500 * NANOS_PER_DOLLAR) == "$500.00"
    rng = random.Random(7)
    for n in [rng.randrange(1, 10**13) for _ in range(2000)]:
        shown = usd_for_people(n)
        assert shown != "$0.00" and Decimal(shown[1:].replace(",", "")) > 0, n


# --- validation -----------------------------------------------------------------------

MINIMAL = """
version = "t1"
updated = 2026-01-02

[fallback]
input = "1.25"
cached_input = "0.125"
output = "10.00"

[models."gpt-x"]
input = "1.00"
cached_input = "0.10"
output = "4.00"
source = "https://example.com/gpt-x"
as_of = 2026-01-01
"""


def broken(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new, 1)


def test_minimal_file_parses() -> None:
    table = PriceTable.from_toml(MINIMAL)
    assert table.version == "t1"
    assert table.families() == ("gpt-x",)
    assert table.fallback.as_of == date(2026, 1, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            broken('output = "4.00"', "output = 4.0"),
            'prices.toml: models."gpt-x".output: must be a decimal string like "10.00", '
            "got 4.0 (float)",
        ),
        (
            broken('input = "1.00"', "input = 1"),
            'prices.toml: models."gpt-x".input: must be a decimal string like "10.00", got 1 (int)',
        ),
        (
            broken('input = "1.00"', 'input = "one"'),
            'prices.toml: models."gpt-x".input: must be a decimal string like "10.00", '
            'got "one" (str)',
        ),
        (
            broken('input = "1.00"', 'input = "1e-3"'),
            'prices.toml: models."gpt-x".input: must be a decimal string like "10.00", '
            'got "1e-3" (str)',
        ),
        (
            broken('output = "4.00"', 'output = "-4.00"'),
            'prices.toml: models."gpt-x".output: must not be negative, got "-4.00" (str)',
        ),
        (
            broken('cached_input = "0.10"', 'cached_input = "0.0001"'),
            'prices.toml: models."gpt-x".cached_input: "0.0001" (str) has more than 3 decimal '
            "places, which is not a whole number of nano-dollars per token",
        ),
        (
            broken('cached_input = "0.10"\n', ""),
            'prices.toml: models."gpt-x".cached_input: missing',
        ),
        (
            broken('cached_input = "0.10"', 'cached_input = "2.00"'),
            'prices.toml: models."gpt-x".cached_input: must not exceed input (2.00 > 1.00)',
        ),
        (
            broken('output = "4.00"', 'output = "4.00"\nouptut = "4.00"'),
            'prices.toml: models."gpt-x".ouptut: unknown field',
        ),
        (
            broken("as_of = 2026-01-01", 'as_of = "last week"'),
            'prices.toml: models."gpt-x".as_of: must be a date like 2025-08-07, '
            'got "last week" (str)',
        ),
        (
            broken("as_of = 2026-01-01", "as_of = 2026-01-01T10:00:00"),
            'prices.toml: models."gpt-x".as_of: must be a date like 2025-08-07, '
            "got 2026-01-01 10:00:00 (datetime)",
        ),
        (
            broken("as_of = 2026-01-01\n", ""),
            'prices.toml: models."gpt-x".as_of: must be a date like 2025-08-07, got nothing',
        ),
        (
            broken('source = "https://example.com/gpt-x"', 'source = "see website"'),
            'prices.toml: models."gpt-x".source: must be an https:// URL, got "see website" (str)',
        ),
        (
            broken('[models."gpt-x"]', '[models."GPT-X"]'),
            'prices.toml: models."GPT-X": family names must be lower-case model ids',
        ),
        (
            broken('version = "t1"', "version = 3"),
            "prices.toml: version: must be a non-empty string, got 3 (int)",
        ),
        (
            broken("updated = 2026-01-02", 'updated = "2026-01-02"'),
            'prices.toml: updated: must be a date like 2025-08-07, got "2026-01-02" (str)',
        ),
        (
            broken('version = "t1"', 'version = "t1"\nmodles = 1'),
            'prices.toml: unknown top-level key "modles"',
        ),
        (
            broken('[fallback]\ninput = "1.25"', '[fallback]\ninput = "1.2501"'),
            'prices.toml: fallback.input: "1.2501" (str) has more than 3 decimal places, '
            "which is not a whole number of nano-dollars per token",
        ),
        ('version = "t1"\nupdated = 2026-01-02\n', "prices.toml: models: must be a non-empty"),
        ("version = ", "prices.toml: not valid TOML"),
    ],
)
def test_validation_errors_name_the_row_and_field(text: str, message: str) -> None:
    with pytest.raises(PriceTableError) as info:
        PriceTable.from_toml(text)
    assert str(info.value).startswith(message)


def test_load_names_the_file_it_read(tmp_path: Path) -> None:
    path = tmp_path / "custom-prices.toml"
    path.write_text(broken('output = "4.00"', "output = 4.0"))
    with pytest.raises(PriceTableError, match=r"custom-prices\.toml: models\.\"gpt-x\"\.output"):
        PriceTable.load(path)


def test_missing_fallback_defaults_to_the_highest_listed_rates() -> None:
    text = broken('[fallback]\ninput = "1.25"\ncached_input = "0.125"\noutput = "10.00"\n', "")
    text += (
        '\n[models."gpt-y"]\ninput = "0.50"\ncached_input = "0.40"\noutput = "9.00"\n'
        'source = "https://example.com/gpt-y"\nas_of = 2026-01-01\n'
    )
    fallback = PriceTable.from_toml(text).fallback
    assert (fallback.input, fallback.cached_input, fallback.output) == (
        Decimal("1.00"),
        Decimal("0.40"),
        Decimal("9.00"),
    )
