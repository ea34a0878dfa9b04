"""Insight: spend reports, forecasts, the burn-rate watch, telemetry, alerts and prompt-cache
hygiene. Reads what metering and governance wrote; never decides a request.

May import `metering`, `governance`, `store` and `wire`; never `dataplane` or `cli`.
"""
