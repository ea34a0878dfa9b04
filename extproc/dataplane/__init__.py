"""The data path in the sidecar: the ext_proc stream handler, one handler per request chosen
at its headers (metered, passthrough, answered here), admission, the settlement, the
replies it sends Envoy, and the HTTP/2 gRPC transport underneath.

Owns the order of phases and applies decisions, nothing else: admission makes its policy
decisions as values from what `metering`, `governance` and `routing` compute. May import
`wire`, `store`, `metering`, `governance`, `routing`, `insight` and `settings`; never `cli`,
`console`, `devstack` or `simulator`.
"""
