"""The price table: catalogue + price file compiled to integer rates, and exact charges.

The oracle for every catalogue row is the catalogue package itself (genai-prices'
`calc_price`, exact Decimal arithmetic of its own): our compiled integer tables must bill
every row, tier and token kind to the nano-dollar what it computes.
"""

from __future__ import annotations

import dataclasses
import math
import random
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import genai_prices
import pytest
from genai_prices import data_snapshot

from extproc.metering.prices import (
    NANOS_PER_DOLLAR,
    Charge,
    PriceTable,
    PriceTableError,
    default_table,
    usd,
)
from extproc.metering.rates import MILLION, Part, Price, token_parts, total_nanos
from extproc.wire.billing import ToolRequest
from extproc.wire.usage import ImageCall, ToolCalls, Usage

REQUIRED = (
    "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5-codex", "gpt-5.1", "gpt-5.1-codex",
    "gpt-5.1-codex-mini", "codex-mini-latest", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
    "gpt-4o", "gpt-4o-mini", "o3", "o4-mini", "o3-mini", "text-embedding-3-small",
    "text-embedding-3-large", "text-embedding-ada-002", "gpt-3.5-turbo",
    # the models the issue found unpriced, and the Codex CLI's default
    "gpt-5.2", "gpt-5.4", "gpt-5.4-mini", "gpt-5.5", "gpt-5.6-sol", "gpt-5-pro",
    "gpt-4.5-preview", "o1-mini", "computer-use-preview", "gpt-4o-audio-preview",
    "gpt-4o-search-preview", "gpt-6.2-sol",
)  # fmt: skip


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def _genai_usage(usage: Usage) -> genai_prices.Usage:
    return genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        input_audio_tokens=usage.input_audio_tokens,
        cache_audio_read_tokens=0,  # the APIs we meter report no cached audio separately
        output_tokens=usage.output_tokens,
        output_audio_tokens=usage.output_audio_tokens,
    )


def genai_nanos(model: str, usage: Usage, context: dict[str, str] | None = None) -> int:
    """What genai-prices' own calculator says, rounded up to a nano-dollar as we round."""
    result = genai_prices.calc_price(
        _genai_usage(usage), model, provider_id="openai", price_context=context
    )
    return math.ceil(result.total_price * NANOS_PER_DOLLAR)


def genai_row_nanos(row: str, usage: Usage, context: dict[str, str] | None) -> int:
    """genai-prices' own calculation on one of its rows (some rows match no single name)."""
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == "openai")
    model = next(m for m in provider.models if m.id.lower() == row)
    result = model.calc_price(
        _genai_usage(usage), provider, genai_request_timestamp=datetime.now(UTC),
        price_context=context,
    )  # fmt: skip
    return math.ceil(result.total_price * NANOS_PER_DOLLAR)


# --- the compiled table ---------------------------------------------------------------------


def test_the_table_stamps_both_versions(table: PriceTable) -> None:
    assert table.catalogue_version == f"genai-prices {genai_prices.__version__}"
    assert table.override_version == "2026-12-07.1"
    assert table.version == f"{table.catalogue_version}+{table.override_version}"
    assert default_table() is default_table()


@pytest.mark.parametrize("model", REQUIRED)
def test_every_model_in_use_is_priced(table: PriceTable, model: str) -> None:
    price, known = table.price_for(model)
    assert known, model
    assert price.cards["default"].base.input > 0


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-5", ("1.25", "0.125", "10")),
        ("gpt-4o-mini", ("0.15", "0.075", "0.6")),
        ("gpt-5.4-mini", ("0.75", "0.075", "4.5")),
        ("gpt-5-pro", ("15", "15", "120")),
        ("gpt-6.2-sol", ("2", "0.1", "10")),
        ("text-embedding-3-small", ("0.02", "0.02", "0")),
    ],
)
def test_spot_prices(table: PriceTable, model: str, expected: tuple[str, str, str]) -> None:
    price, _ = table.price_for(model)
    assert (price.input, price.cached_input, price.output) == tuple(map(Decimal, expected))


@pytest.mark.parametrize(
    ("model", "row"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-chat-latest", "gpt-5"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-2025-04-16", "o3"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("  GPT-4o-Mini  ", "gpt-4o-mini"),
        # fine-tuned inference costs more than its base model: the catalogue's own rows
        ("ft:gpt-4o-mini-2024-07-18:acme::AbC123", "ft:gpt-4o-mini"),
        # the price file's correction wins over the catalogue's row of the same name
        ("gpt-4o-audio-preview", "gpt-4o-audio-preview"),
    ],
)
def test_names_resolve_to_their_row(table: PriceTable, model: str, row: str) -> None:
    assert table.family_of(model) == row


@pytest.mark.parametrize("model", ["gpt-4o-minimal", "gpt-5.10", "unknown-model", "", "-latest"])
def test_unlisted_models_do_not_borrow_a_neighbours_price(table: PriceTable, model: str) -> None:
    assert table.family_of(model) is None
    price, known = table.price_for(model)
    assert not known and price.origin == "provisional"


def test_lookups_are_remembered_and_the_memo_is_bounded() -> None:
    fresh = PriceTable.load()
    for n in range(1100):
        assert fresh.row(f"no-such-model-{n}") is None
    assert len(fresh._memo) <= 1024
    assert fresh.family_of("gpt-5-mini-2025-08-07") == "gpt-5-mini"


# --- the independent oracle -----------------------------------------------------------------


def _usages(rng: random.Random) -> list[Usage]:
    out = [Usage(1000, 0, 500), Usage(0, 0, 0), Usage(300_000, 200_000, 7, 5)]
    for _ in range(6):
        inp = rng.choice([rng.randrange(1, 5000), rng.randrange(200_000, 400_000)])
        cached = rng.randrange(0, inp // 2 + 1)
        write = rng.randrange(0, (inp - cached) // 2 + 1)
        audio = rng.randrange(0, (inp - cached - write) // 3 + 1)
        out_tokens = rng.randrange(0, 20_000)
        out.append(
            Usage(
                input_tokens=inp,
                cached_input_tokens=cached,
                output_tokens=out_tokens,
                cache_write_tokens=write,
                input_audio_tokens=audio,
                output_audio_tokens=rng.randrange(0, out_tokens // 4 + 1),
            )
        )
    return out


def test_every_catalogue_row_bills_what_the_catalogue_computes(table: PriceTable) -> None:
    """Every OpenAI row, every service tier it lists, every token kind, tiers crossed or not."""
    rng = random.Random(18)
    checked = 0
    for row, price in table.catalogue.prices.items():
        if row in table.overrides:  # corrected by our own file: not the catalogue's price
            continue
        for tier in price.cards:
            context = {"processing": "batch"} if tier == "batch" else {"service_tier": tier}
            for usage in _usages(rng):
                if tier == "batch" or table.row(row) is not price:  # batch; a prefix-only row
                    ours = _charge_on_card(price, usage, tier)
                else:
                    ours = table.charge(row, Usage(**{**_fields(usage), "service_tier": tier}))
                    assert ours.tier == tier
                    ours = ours.nanos
                assert ours == genai_row_nanos(
                    row, usage, None if tier == "default" else context
                ), (
                    row,
                    tier,
                    usage,
                )
                checked += 1
    assert checked > 1000


def _fields(usage: Usage) -> dict[str, object]:
    return {f.name: getattr(usage, f.name) for f in dataclasses.fields(usage)}


def _charge_on_card(price: Price, usage: Usage, tier: str) -> int:
    """A row's card applied directly (batch is not a tier a response reports; some rows
    match only names with a suffix, like "ft:gpt-4o-2024-...")."""
    rates, _ = price.cards[tier].at(usage.input_tokens)
    return total_nanos(token_parts(rates, usage))


# --- the arithmetic -----------------------------------------------------------------------


def test_rates_that_are_not_whole_nanos_per_token_stay_exact(table: PriceTable) -> None:
    """gpt-5.4-mini on flex: cached input at $0.0375 per 1M = 37.5 nano-dollars a token."""
    charge = table.charge("gpt-5.4-mini", Usage(4, 3, 1, service_tier="flex"))
    assert charge.tier == "flex"
    assert [(p.kind, p.quantity, p.rate) for p in charge.parts] == [
        ("input", 1, 375_000_000),
        ("cached_input", 3, 37_500_000),
        ("output", 1, 2_250_000_000),
    ]
    # 375 + 112.5 + 2250 = 2737.5 nano-dollars: exact in the parts, rounded up once.
    assert sum(p.femtos for p in charge.parts) == 2_737_500_000
    assert charge.nanos == 2738


def test_the_cost_is_the_exact_sum_of_the_parts_rounded_up_once() -> None:
    parts = [Part("a", 1, 400_000), Part("b", 1, 400_000), Part("c", 1, 400_000)]
    assert total_nanos(parts) == 2  # 1.2 nano-dollars; three parts rounded alone would make 3
    assert total_nanos([Part("a", 3, MILLION)]) == 3


def test_flex_and_priority_are_billed_by_the_tier_the_response_reports(table: PriceTable) -> None:
    usage = Usage(10_000, 0, 1_000)
    default = table.charge("gpt-5", usage).nanos
    assert table.charge("gpt-5", Usage(10_000, 0, 1_000, service_tier="flex")).nanos * 2 == default
    assert (
        table.charge("gpt-5", Usage(10_000, 0, 1_000, service_tier="priority")).nanos == 2 * default
    )
    for standard in ("default", "scale", "auto", ""):
        assert (
            table.charge("gpt-5", Usage(10_000, 0, 1_000, service_tier=standard)).nanos == default
        )


def test_a_long_context_call_is_billed_at_the_tier_above_the_threshold(table: PriceTable) -> None:
    short = table.charge("gpt-5.4", Usage(272_000, 0, 100))
    long = table.charge("gpt-5.4", Usage(272_001, 0, 100))
    assert (short.threshold, long.threshold) == (0, 272_000)
    assert short.nanos == 272_000 * 2_500 + 100 * 15_000
    assert long.nanos == 272_001 * 5_000 + 100 * 22_500  # every token at the tier's rate


def test_cache_writes_and_audio_have_parts_of_their_own(table: PriceTable) -> None:
    charge = table.charge("gpt-6.2-sol", Usage(1_000, 200, 50, cache_write_tokens=300))
    kinds = {p.kind: (p.quantity, p.rate) for p in charge.parts}
    assert kinds == {
        "input": (500, 2_000_000_000),
        "cached_input": (200, 100_000_000),
        "cache_write": (300, 2_500_000_000),
        "output": (50, 10_000_000_000),
    }
    audio = table.charge(
        "gpt-4o-audio-preview",
        Usage(1_000, 0, 200, input_audio_tokens=300, output_audio_tokens=100),
    )
    assert audio.nanos == 700 * 2_500 + 300 * 40_000 + 100 * 10_000 + 100 * 80_000


def test_reasoning_is_output_and_inconsistent_counts_are_clamped(table: PriceTable) -> None:
    assert table.charge("gpt-5", Usage(0, 0, 100, 90)).nanos == 100 * 10_000
    assert table.charge("gpt-5", Usage(100, 150, 0)).nanos == 100 * 125


# --- built-in tools ---------------------------------------------------------------------------


def test_tool_calls_are_billed_per_call(table: PriceTable) -> None:
    calls = ToolCalls(web_search=3, file_search=2, code_interpreter=1)
    charge = table.charge("gpt-5", Usage(100, 0, 10, tools=calls))
    assert {
        p.kind: (p.quantity, p.rate) for p in charge.parts if p.kind.endswith(("search", "er"))
    } == {
        "web_search": (3, 10_000_000 * MILLION),
        "file_search": (2, 2_500_000 * MILLION),
        "code_interpreter": (1, 30_000_000 * MILLION),
    }
    assert charge.nanos == 100 * 1_250 + 10 * 10_000 + 30_000_000 + 5_000_000 + 30_000_000


def test_the_preview_search_tool_costs_more_on_non_reasoning_models(table: PriceTable) -> None:
    preview = ToolRequest(("web_search_preview",))
    usage = Usage(0, 0, 0, tools=ToolCalls(web_search=1))
    assert table.charge("gpt-4o", usage, preview).nanos == 25_000_000
    assert table.charge("gpt-4o", usage, ToolRequest(("web_search",))).nanos == 10_000_000
    assert table.charge("gpt-5", usage, preview).nanos == 10_000_000


def test_images_are_billed_by_their_tokens_else_by_size_and_quality(table: PriceTable) -> None:
    request = ToolRequest(("image_generation",), image=ImageCall("1024x1536", "medium"))
    by_tokens = ToolCalls(images=(ImageCall("1024x1024", "high", image_tokens=4000),))
    by_size = ToolCalls(images=(ImageCall(),))
    assert table.charge("gpt-5", Usage(tools=by_tokens), request).nanos == 4000 * 40_000
    assert table.charge("gpt-5", Usage(tools=by_size), request).nanos == 1584 * 40_000
    auto = ToolCalls(images=(ImageCall("auto", "auto"),))
    assert table.charge("gpt-5", Usage(tools=auto)).nanos == 6240 * 40_000  # the largest


# --- reservations ---------------------------------------------------------------------------


def test_reservations_hold_the_dearest_rates_the_call_may_be_billed_at(table: PriceTable) -> None:
    assert table.reserve_nanos("gpt-5", 1_000, 100) == 1_000 * 1_250 + 100 * 10_000
    assert table.reserve_nanos("gpt-5", 1_000, 100, service_tier="priority") == 2 * (
        1_000 * 1_250 + 100 * 10_000
    )
    assert (
        table.reserve_nanos("gpt-5", 1_000, 100, service_tier="flex")
        == 1_000 * 1_250 + 100 * 10_000
    )
    # cache writes cost more than plain input on gpt-6.2-sol: the hold assumes them
    assert table.reserve_nanos("gpt-6.2-sol", 1_000, 0) == 1_000 * 2_500
    # just under the long-context threshold by our own count: held at the tier above
    assert table.reserve_nanos("gpt-5.4", 271_000, 0) == 271_000 * 5_000


def test_reservations_cover_tool_calls(table: PriceTable) -> None:
    tools = ToolRequest(("web_search", "code_interpreter"), max_tool_calls=4)
    base = table.reserve_nanos("gpt-5", 0, 0)
    assert table.reserve_nanos("gpt-5", 0, 0, tools=tools) == base + 4 * 30_000_000
    defaults = ToolRequest(("web_search", "code_interpreter"))
    held = table.reserve_nanos(
        "gpt-5", 0, 0, tools=defaults, tool_calls={"web_search": 5, "code_interpreter": 1}
    )
    assert held == 5 * 10_000_000 + 30_000_000


# --- unknown models -------------------------------------------------------------------------


def test_an_unknown_model_gets_its_class_highest_rates_flagged(table: PriceTable) -> None:
    charge = table.charge("gpt-6.3-sol", Usage(1_000, 0, 100))
    assert charge.fallback and charge.origin == "provisional"
    assert charge.family == "provisional:sol"
    members = [p for name, p in table.catalogue.prices.items() if "-sol" in name]
    highest_input = max(p.cards["default"].highest().input for p in members)
    assert charge.parts[0].rate == highest_input
    # nothing in the class is charged more than the provisional rate
    for p in members:
        assert table.charge(p.family, Usage(1_000, 0, 100)).nanos <= charge.nanos


def test_a_name_no_class_matches_gets_the_highest_rates_of_the_table(table: PriceTable) -> None:
    price, known = table.price_for("brand-new-thing")
    assert not known and price is table.fallback
    for row in table.catalogue.prices.values():
        assert row.cards["default"].base.output <= price.cards["default"].base.output


# --- the price file ---------------------------------------------------------------------------

FILE = """
version = "t1"
updated = 2026-01-02

[models."gpt-x"]
input = "1.00"
cached_input = "0.10"
output = "4.00"
source = "https://example.com/gpt-x"
as_of = 2026-01-01

[models."gpt-5"]
input = "1.00"
source = "https://example.com/negotiated"
as_of = 2026-01-01
note = "negotiated"

[models."gpt-x-pro"]
like = "gpt-x"
output = "40.00"
long_context = { above = 1000, input = "2.00", output = "80.00" }
tiers.priority = { input = "3.00", output = "90.00" }
source = "https://example.com/gpt-x-pro"
as_of = 2026-01-01

[tools]
code_interpreter_per_container = "0.05"
source = "https://example.com/tools"
as_of = 2026-01-01
"""


def test_the_file_adds_models_and_corrects_the_catalogue() -> None:
    t = PriceTable.from_toml(FILE)
    assert t.override_version == "t1"
    assert t.charge("gpt-x", Usage(100, 10, 10)).nanos == 90 * 1_000 + 10 * 100 + 10 * 4_000
    negotiated = t.row("gpt-5")
    assert negotiated is not None and negotiated.origin == "override"
    assert negotiated.input == Decimal("1") and negotiated.output == Decimal("10")
    assert "flex" in negotiated.cards  # the catalogue's other cards are kept
    pro = t.charge("gpt-x-pro", Usage(1_001, 0, 1))
    assert pro.threshold == 1_000 and pro.nanos == 1_001 * 2_000 + 80_000
    assert t.charge("gpt-x-pro", Usage(10, 0, 1, service_tier="priority")).nanos == 30_000 + 90_000
    assert t.tools.code_interpreter == 50_000_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input = 1", 'models."gpt-y".input: must be a decimal string like "1.25", got 1 (int)'),
        ('input = "-1"', 'models."gpt-y".input: must not be negative, got "-1" (str)'),
        (
            'input = "0.0000000001"',
            'models."gpt-y".input: 0.0000000001 per 1M tokens is not a whole',
        ),
        ('ouptut = "1"', 'models."gpt-y".ouptut: unknown field'),
        ('input = "2"\ncached_input = "3"', 'models."gpt-y".cached_input: must not exceed input'),
        ("like = 3", 'models."gpt-y".like: must be a string, got 3 (int)'),
        ("long_context = { above = -1 }", 'models."gpt-y".long_context.above: must be a positive'),
    ],
)
def test_problems_name_the_row_and_field(text: str, message: str) -> None:
    doc = f'version = "t"\nupdated = 2026-01-02\n[models."gpt-y"]\n{text}\n'
    doc += 'source = "https://example.com"\nas_of = 2026-01-01\n'
    with pytest.raises(PriceTableError) as info:
        PriceTable.from_toml(doc)
    assert any(p.startswith(f"prices.toml: {message}") for p in info.value.problems), info.value


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("version = 3\nupdated = 2026-01-02\n", "version: must be a non-empty string, got 3 (int)"),
        (
            'version = "t"\nupdated = "x"\n',
            'updated: must be a date like 2026-12-07, got "x" (str)',
        ),
        ('version = "t"\nupdated = 2026-01-02\nmodles = {}\n', "modles: unknown top-level key"),
        (
            'version = "t"\nupdated = 2026-01-02\n[models."gpt-new"]\ninput = "1"\n'
            'source = "https://e.com"\nas_of = 2026-01-01\n',
            'models."gpt-new": input and output are required for a model the catalogue lacks',
        ),
        (
            'version = "t"\nupdated = 2026-01-02\n[models."gpt-y"]\nsource = "e.com"\n'
            "as_of = 2026-01-01\n",
            'models."gpt-y".source: must be an https:// URL, got "e.com" (str)',
        ),
        (
            'version = "t"\nupdated = 2026-01-02\n[[provisional]]\nclass = "x"\nmatch = "("\n',
            "provisional[0].match: not a regular expression",
        ),
    ],
)
def test_file_problems_name_where(doc: str, message: str) -> None:
    with pytest.raises(PriceTableError) as info:
        PriceTable.from_toml(doc)
    assert any(p.startswith(f"prices.toml: {message}") for p in info.value.problems), info.value


def test_load_names_the_file_it_read(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("version = 1\n")
    with pytest.raises(PriceTableError, match=str(path)):
        PriceTable.load(path)
    with pytest.raises(PriceTableError, match="cannot read"):
        PriceTable.load(tmp_path / "absent.toml")


# --- money formatting ---------------------------------------------------------------------


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
