"""Developer tooling: the local stack (`make run`, tests, bench) and the Envoy config it renders.

Beside the data path, not in it: may import `settings`, `store`, `wire`, `metering`,
`governance` and `simulator`; only `cli`, tests and the benchmark import it.
"""
