"""Governance: the policy file, virtual keys, budgets and rate limits (with their Lua scripts),
and what callers are told when a request is refused.

May import `metering`, `wire` and `store`; never `dataplane`, `insight` or `cli`.
"""
