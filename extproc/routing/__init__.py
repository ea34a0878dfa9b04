"""Routing: which model serves a request, with which limits, and why; applying that to a body.

Pure functions of the policy and the request facts. May import `governance` (policy types),
`metering` and `wire`.
"""
