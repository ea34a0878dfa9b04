"""Metering: tokens, prices, usage as billed, the usage record and the ledger that stores it.

Decisions here are plain functions of data (what to forward, what to bill); the ledger is the one
piece of I/O. May import `wire`, `store` and the generated `extproc.v1` protobufs.
"""
