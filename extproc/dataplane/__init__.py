"""The data path in the sidecar: the ext_proc stream handler, one Exchange per request, the
replies it sends Envoy, and the HTTP/2 gRPC transport underneath.

Owns the order of phases, nothing else: every decision it applies is made by `metering`,
`governance` or `routing`. May import `wire`, `store`, `metering`, `governance`,
`routing`, `insight` and `settings`; never `cli`, `console`, `devstack` or `simulator`.
"""
