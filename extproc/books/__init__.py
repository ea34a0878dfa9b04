"""The books: usage records leaving Redis durably, exported for finance, reconciled with
the provider's bill. Pure functions over records, with Redis and files at the edges.

May import `wire`, `store` and `metering`."""
