"""The data path in the sidecar: the ext_proc stream handler, one Exchange per request, the
replies it sends Envoy, and the HTTP/2 gRPC transport underneath.

Owns the order of phases, nothing else: every decision it applies is made by `metering`,
`governance` or `routing`. May import every other package except `cli`, `devstack` and `simulator`.
"""
