"""Developer tooling: the local stack (`make run`, tests, bench) and the Envoy config it renders."""
