"""The platform team's console and admin API: a web app of its own, beside the gateway.

`extproc console` serves it (uvicorn, a port apart from Envoy's egress port). The JSON API
lives under `/admin/v1` with its OpenAPI document at `/admin/v1/openapi.json`; the pages
are server-rendered HTML with inline SVG charts and no JavaScript build chain.

May import `wire`, `store`, `metering`, `governance`, `routing`, `books` and `insight`;
never `dataplane`.
"""
