"""Insight: spend reports, forecasts, the burn-rate watch, telemetry, alerts and prompt-cache
hygiene. Reads what metering and governance wrote; never decides a request.

May import `wire`, `store`, `metering`, `governance`, `routing` (what-if replays the
routing decision) and `books`; never `dataplane`, `console` or `cli`.
"""
