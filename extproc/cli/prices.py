"""`extproc prices`: where the prices come from, and `prices check`: what nothing prices.

`extproc prices` shows the catalogue and price-file versions, how many models each prices,
what the catalogue leaves out, every row of the price file (its source and date), the tool
fees and the provisional classes; `--model NAME` shows how one name resolves and its rates.
`extproc prices check` lists every model seen in the ledger (over `--days`) or named in the
policy that nothing prices: exit 3 when there is one, 0 when everything is priced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from extproc.cli.admin import add_stack_options, fail, load_policy_arg, redacted, redis_url
from extproc.metering.prices import usd

UNPRICED_EXIT = 3


def _table(path: str | None) -> Any:
    from extproc.metering.prices import PriceTable

    return PriceTable.load(path or os.environ.get("EXTPROC_PRICES") or None)


def _dollars(nanos_per_million: int) -> str:
    from extproc.metering.rates import per_million_usd

    return f"${per_million_usd(nanos_per_million)}"


def _card_text(card: Any) -> str:
    b = card.base
    text = f"in {_dollars(b.input)} cached {_dollars(b.cached_input)} out {_dollars(b.output)}"
    if b.cache_write != b.input:
        text += f" cache-write {_dollars(b.cache_write)}"
    if b.input_audio != b.input or b.output_audio != b.output:
        text += f" audio {_dollars(b.input_audio)}/{_dollars(b.output_audio)}"
    for threshold, rates in card.above:
        text += (
            f"; above {threshold:,} input: in {_dollars(rates.input)} out {_dollars(rates.output)}"
        )
    return text


def describe_price(name: str, table: Any) -> dict[str, Any]:
    price, known = table.price_for(name)
    return {
        "model": name,
        "priced": known,
        "row": price.family,
        "source": price.origin,
        "as_of": price.as_of.isoformat(),
        "url": price.source,
        "cards": {tier: _card_text(card) for tier, card in price.cards.items()},
        "web_search_per_1k_usd": usd(price.web_search * 1000),
        "file_search_per_1k_usd": usd(price.file_search * 1000),
        "note": price.note,
    }


def summary(table: Any) -> dict[str, Any]:
    catalogue = table.catalogue
    corrections = [n for n in table.overrides if catalogue.find(n) is not None]
    return {
        "version": table.version,
        "catalogue": {
            "version": table.catalogue_version,
            "rows": len(catalogue.prices),
            "left_out": catalogue.skipped,
            "valid_until": catalogue.valid_until.isoformat() if catalogue.valid_until else None,
        },
        "price_file": {
            "path": table.origin,
            "version": table.override_version,
            "updated": table.updated.isoformat(),
            "rows": len(table.overrides),
            "corrections": len(corrections),
            "new_models": len(table.overrides) - len(corrections),
        },
        "coverage": {"models_priced_by_name": len(table.families())},
        "overrides": [
            {
                "model": name,
                "kind": "correction" if name in corrections else "new model",
                "cards": {t: _card_text(c) for t, c in p.cards.items() if t == "default"},
                "source": p.source,
                "as_of": p.as_of.isoformat(),
                "note": p.note,
            }
            for name, p in sorted(table.overrides.items())
        ],
        "tools": {
            "web_search_per_1k_usd": usd(table.tools.web_search * 1000),
            "file_search_per_1k_usd": usd(table.tools.file_search * 1000),
            "code_interpreter_per_container_usd": usd(table.tools.code_interpreter),
            "web_search_preview": [
                {"models": p, "per_1k_usd": usd(n * 1000)}
                for p, n in table.tools.web_search_preview
            ],
            "image_model": table.tools.image_model,
        },
        "provisional_classes": [
            {"class": c.name, "match": c.match, "rates": _card_text(p.cards["default"])}
            for c, p in table.classes
        ]
        + [
            {
                "class": "any",
                "match": "(no class)",
                "rates": _card_text(table.fallback.cards["default"]),
            }
        ],
    }


def render_summary(s: dict[str, Any]) -> str:
    cat, pf = s["catalogue"], s["price_file"]
    lines = [
        f"prices {s['version']}",
        f"  catalogue   {cat['version']}: {cat['rows']} OpenAI models compiled"
        + (f", {len(cat['left_out'])} left out" if cat["left_out"] else ""),
    ]
    lines += [f"      left out: {name} ({why})" for name, why in sorted(cat["left_out"].items())]
    lines.append(
        f"  price file  {pf['path']} version {pf['version']} (updated {pf['updated']}): "
        f"{pf['rows']} rows ({pf['corrections']} corrections, {pf['new_models']} new models)"
    )
    lines.append(f"  coverage    {s['coverage']['models_priced_by_name']} model names priced")
    if s["overrides"]:
        lines.append("  overrides")
    for row in s["overrides"]:
        lines.append(f"    {row['model']:28} {row['kind']:10} {row['cards']['default']}")
        lines.append(f"    {'':28} {row['source']} ({row['as_of']}) {row['note']}".rstrip())
    t = s["tools"]
    lines.append(
        f"  tools       web search ${t['web_search_per_1k_usd']}/1k, file search "
        f"${t['file_search_per_1k_usd']}/1k, code interpreter "
        f"${t['code_interpreter_per_container_usd']}/container, images by {t['image_model']}"
    )
    lines += [
        f"              preview search {p['models']}: ${p['per_1k_usd']}/1k"
        for p in t["web_search_preview"]
    ]
    lines.append(
        "  unknown models: the highest rates of their class (flagged), or refused by policy"
    )
    lines += [f"    {c['class']:12} {c['match']:26} {c['rates']}" for c in s["provisional_classes"]]
    return "\n".join(lines)


def cmd_prices(args: argparse.Namespace) -> int:
    from extproc.metering.overrides import PriceFileError

    try:
        table = _table(args.prices)
    except PriceFileError as exc:
        return fail(f"the price file is invalid:\n{exc}", 2)
    if args.action == "check":
        return _check(args, table)
    if args.model:
        found = [describe_price(m, table) for m in args.model]
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            for d in found:
                state = f"row {d['row']} ({d['source']}, {d['as_of']})" if d["priced"] else (
                    f"NOT PRICED: provisional {d['row']}")  # fmt: skip
                print(f"{d['model']}: {state}")
                for tier, text in d["cards"].items():
                    print(f"  {tier:10} {text}")
        return 0
    s = summary(table)
    print(json.dumps(s, indent=2) if args.json else render_summary(s))
    return 0


def policy_models(policy: Any) -> dict[str, list[str]]:
    """Every model name the policy names, with where (field paths)."""
    found: dict[str, list[str]] = {}

    def add(name: str | None, where: str) -> None:
        if name and name != "default":
            found.setdefault(name, []).append(where)

    routing = policy.routing
    for alias, target in routing.aliases.items():
        add(target, f"routing.aliases.{alias}")
    for i, tier in enumerate(routing.tiers):
        for model in tier:
            add(model, f"routing.tiers[{i}]")
    for src, dst in routing.ladder.items():
        add(src, "routing.ladder")
        add(dst, f"routing.ladder.{src}")
    for rule in routing.rules:
        add(rule.changes.model, f"routing.rules.{rule.name}.set.model")
        for model in rule.when.model or ():
            add(model, f"routing.rules.{rule.name}.when.model")
    for ws in policy.workspaces.values():
        scopes = [(f"workspaces.{ws.name}", ws.routing)]
        scopes += [
            (f"workspaces.{ws.name}.services.{s.name}", s.routing) for s in ws.services.values()
        ]
        for where, settings in scopes:
            for model in settings.allowed_models or ():
                add(model, f"{where}.routing.allowed_models")
            add(settings.default_model, f"{where}.routing.default_model")
            if settings.overdraft is not None:
                add(settings.overdraft.model, f"{where}.routing.overdraft")
    return found


def _ledger_models(args: argparse.Namespace) -> Counter[str] | str:
    from extproc.books.records import records_between
    from extproc.store.clients import UNAVAILABLE, make_sync_client

    url = redis_url(args.redis_url, args.stack)
    until = datetime.now(UTC) + timedelta(minutes=1)
    try:
        client = make_sync_client(url, socket_connect_timeout=3, socket_timeout=30)
        try:
            records = records_between(client, until - timedelta(days=args.days), until)
        finally:
            client.close()
    except UNAVAILABLE as exc:
        return f"Redis at {redacted(url)}: {exc}"
    seen: Counter[str] = Counter()
    for r in records:
        if r.outcome == "adjustment":
            continue
        name = r.model_served or r.model_requested
        if name:
            seen[name] += 1
    return seen


def _check(args: argparse.Namespace, table: Any) -> int:
    named: dict[str, list[str]] = {}
    if not args.no_policy:
        policy = load_policy_arg(args.policy, args.stack)
        if isinstance(policy, str):
            if args.policy:
                return fail(policy, 2)
        else:
            named = policy_models(policy)
    seen = _ledger_models(args)
    if isinstance(seen, str):
        return fail(seen, 1)
    unpriced = []
    for name in sorted(set(named) | set(seen)):
        if table.row(name) is None:
            unpriced.append(
                {
                    "model": name,
                    "requests": seen.get(name, 0),
                    "named_in_policy": named.get(name, []),
                    "provisional": table.provisional(name).family,
                }
            )
    if args.json:
        print(json.dumps({"version": table.version, "unpriced": unpriced}, indent=2))
    elif not unpriced:
        print(
            f"every model in use is priced ({table.version}; {len(seen)} models in the ledger "
            f"over {args.days} days, {len(named)} in the policy)"
        )
    else:
        print(f"models nothing prices ({table.version}):")
        for u in unpriced:
            where = []
            if u["requests"]:
                where.append(f"{u['requests']} requests in the ledger")
            if u["named_in_policy"]:
                where.append("policy " + ", ".join(u["named_in_policy"]))
            print(f"  {u['model']:28} billed as {u['provisional']}; {'; '.join(where)}")
        print("add a row for each to the price file (docs/prices.md)", file=sys.stderr)
    return UNPRICED_EXIT if unpriced else 0


def register_prices(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "prices",
        help="where prices come from (versions, coverage, overrides); `prices check`: "
        "models in use that nothing prices",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["show", "check"],
        default="show",
        help="show (default): sources, versions, coverage, overrides; check: unpriced models",
    )
    p.add_argument("--prices", help="the price file (else EXTPROC_PRICES, else the bundled one)")
    p.add_argument("--model", action="append", help="show how this model name is priced")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--days", type=int, default=30, help="check: ledger days to scan (default 30)")
    p.add_argument("--policy", help="check: else EXTPROC_POLICY, else the stack's")
    p.add_argument("--no-policy", action="store_true", help="check: the ledger only")
    add_stack_options(p)
    p.set_defaults(func=cmd_prices)
