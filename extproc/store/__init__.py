"""The Redis store: one node or a Cluster chosen by URL, the lean hot-path client, what
"Redis is away" looks like, the Lua scripts, and `schema`, the one module that names every
key and scope (the scripts get the workspace prefix from it).

Imports nothing else of extproc: every package that touches Redis builds on it.
"""
