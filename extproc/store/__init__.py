"""The Redis store: one node or a Cluster chosen by URL, the lean hot-path client, and what
"Redis is away" looks like. Imports nothing else of extproc.
"""
