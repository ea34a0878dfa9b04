"""Metrics of top-ups and the runaway breaker, beside extproc's own (`insight.telemetry`).

Three instruments, labelled by policy names only (workspace, scope, rule; never a key id):

* `extproc_topup_usd{workspace,scope}`: what live top-up grants add to a scope's hard limit,
  as each sidecar's cache last read it (every replica reports the same value: take the max);
* `extproc_keys_paused{workspace}`: keys paused right now;
* `extproc_breaker_trips_total{workspace,rule,mode}`: trips of the breaker, `mode` "enforce"
  (the key was paused) or "dry_run" (it would have been), counted by the replica that acted.
"""

from __future__ import annotations

from opentelemetry.metrics import CallbackOptions, Meter, Observation


class HaltMetrics:
    __slots__ = ("_paused", "_topups", "_trips")

    def __init__(self, meter: Meter) -> None:
        self._topups: dict[tuple[str, str], float] = {}
        self._paused: dict[str, int] = {}
        self._trips: dict[tuple[str, str, str], int] = {}
        meter.create_observable_gauge(
            "extproc.topup.usd",
            callbacks=[self._observe_topups],
            unit="{USD}",
            description="What live top-up grants add to a scope's hard limit.",
        )
        meter.create_observable_gauge(
            "extproc.keys.paused",
            callbacks=[self._observe_paused],
            unit="{key}",
            description="Keys paused by the runaway breaker (or by a person).",
        )
        meter.create_observable_counter(
            "extproc.breaker.trips",
            callbacks=[self._observe_trips],
            unit="{trip}",
            description="Runaway breaker trips, by rule and mode (enforce or dry_run).",
        )

    def live(self, topups: dict[tuple[str, str], float], paused: dict[str, int]) -> None:
        """The whole current state: scopes whose grants ended drop to 0, then out."""
        gone = {k: 0.0 for k in self._topups if k not in topups}
        self._topups = {**gone, **topups}
        self._paused = {**{w: 0 for w in self._paused}, **paused}

    def trip(self, workspace: str, rule: str, mode: str) -> None:
        key = (workspace, rule, mode)
        self._trips[key] = self._trips.get(key, 0) + 1

    def _observe_topups(self, _options: CallbackOptions) -> list[Observation]:
        return [Observation(v, {"workspace": w, "scope": s}) for (w, s), v in self._topups.items()]

    def _observe_paused(self, _options: CallbackOptions) -> list[Observation]:
        return [Observation(n, {"workspace": w}) for w, n in self._paused.items()]

    def _observe_trips(self, _options: CallbackOptions) -> list[Observation]:
        return [
            Observation(n, {"workspace": w, "rule": r, "mode": m})
            for (w, r, m), n in list(self._trips.items())
        ]
