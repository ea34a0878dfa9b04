"""Every Redis key and budget scope name extproc reads or writes, spelled once.

Why one module: the sidecar (reserve, settle), the key store, the ledger readers, the spend
report and the burn watch all meet in the same hashes. When each spelled the names itself
they drifted (the settlement once charged scopes the reservation did not know). Everything
else calls these functions; the Lua scripts get the workspace prefix from here and append
the suffixes below, which `tests/unit/store/test_schema.py` holds against the scripts.

Layout. Every key of one workspace shares the hash tag `{ws:NAME}`, so a script touches one
Redis Cluster slot:

    {ws:W}:spent:<period>     hash  scope -> nanos spent this budget period (+ counters)
    {ws:W}:held:<period>      hash  scope -> nanos reserved by requests in flight
    {ws:W}:day:<YYYY-MM-DD>   hash  scope -> nanos spent that day
    {ws:W}:hour:<YYYY-MM-DDTHH> hash scope -> nanos spent that hour
    {ws:W}:resv, :resv:data   reservations in flight: deadline zset; hash with each hold's
                              "period|nanos|scopes" (field <id>) and its orphan, what to bill
                              if its sidecar dies (field <id>:o; <id>:orphan from earlier
                              versions), one write per hold
    {ws:W}:resv:orphan        that settlement for holds made before it moved into :resv:data
                              (release.lua still reads and clears it)
    {ws:W}:leases             hash  lease id -> nanos the lease still holds (leases are holds
                              too: "period|granted|scopes" in :resv:data)
    {ws:W}:leases:exp         zset  lease id by expiry (renewed by its replica, reaped by any);
                              see governance.lease
    {ws:W}:orphans:<lease>    hash  request id -> the compact orphan of a request admitted
                              under that lease, billed by the reaper if its replica dies
    {ws:W}:rl:<minute>        hash  rate-limit counters of one minute
    {ws:W}:sess:<key>:<session> a session's input tokens (context-growth guard); a session
                              belongs to the key that started it
    {ws:W}:seen:<minute>      set of request ids settled, by the minute the request
                              started; expires 15 min after its last write (idempotency)
    {ws:W}:prefix:<fingerprint> prompt prefix seen recently (cache hygiene)
    {ws:W}:alerted:...        alert sent once markers (soft, hard, burn)
    {ws:W}:revoked            set of revoked key ids
    {ws:W}:ledger             stream of usage records
    {ws:W}:topups             hash  grant id -> "<scope>|<nanos>|<until_ms>": live top-ups.
                              A scope's cap at `now` is its policy hard limit plus the nanos
                              of its entries with until_ms > now (governance.topups)
    {ws:W}:topup:reqs         zset  top-up request ids by the time they were made
    {ws:W}:topup:req:<id>     hash  one top-up request: who, which scope, how much, until
                              when, why, and its fate (pending, approved, denied, expired)
    {ws:W}:paused             hash  key id -> JSON: keys the runaway breaker paused (and
                              when they were resumed: the breaker counts from then)

Key store keys share `{extproc:keys}`; unattributed usage counters `{extproc:ledger}`.

Scopes are the fields of the money hashes: `ws`, `team:T`, `svc:S`, `key:K`, `model:M`,
`sess:K:S` (session S of key K); the settle script also keeps per-service prompt-cache counters
(`input_tokens:svc:S`, ...).
"""

from __future__ import annotations

UNATTRIBUTED = "_"
"""The workspace name of traffic no key attributes (governance off)."""

# -- per-workspace keys ---------------------------------------------------------------------

SPENT, HELD, DAY, HOUR = "spent", "held", "day", "hour"
RESERVATIONS, RESERVATION_DATA, ORPHANS = "resv", "resv:data", "resv:orphan"
LEASES, LEASE_EXPIRY, LEASE_ORPHANS = "leases", "leases:exp", "orphans"
RATE_MINUTE, SESSION, SEEN, PREFIX = "rl", "sess", "seen", "prefix"
ALERTED, REVOKED, LEDGER = "alerted", "revoked", "ledger"
TOPUPS, TOPUP_REQUESTS, TOPUP_REQUEST, PAUSED = "topups", "topup:reqs", "topup:req", "paused"
TOPUP_AUTO = "topup:auto"
LUA_SUFFIXES = frozenset(
    {
        SPENT,
        HELD,
        DAY,
        HOUR,
        RESERVATIONS,
        RESERVATION_DATA,
        ORPHANS,
        LEASES,
        LEASE_EXPIRY,
        LEASE_ORPHANS,
        RATE_MINUTE,
        SESSION,
        SEEN,
        PREFIX,
        ALERTED,
        REVOKED,
        LEDGER,
        TOPUPS,
        TOPUP_REQUESTS,
        TOPUP_REQUEST,
        TOPUP_AUTO,
        PAUSED,
    }
)
"""The suffixes the Lua scripts append to the prefix they are given."""


def workspace_prefix(workspace: str) -> str:
    """Every key of a workspace shares one hash tag: one slot, one node, atomic scripts."""
    return "{ws:%s}" % (workspace or UNATTRIBUTED)


def spent_key(prefix: str, period_id: str) -> str:
    return f"{prefix}:{SPENT}:{period_id}"


def held_key(prefix: str, period_id: str) -> str:
    return f"{prefix}:{HELD}:{period_id}"


def day_key(prefix: str, day_id: str) -> str:
    return f"{prefix}:{DAY}:{day_id}"


def hour_key(prefix: str, hour_id: str) -> str:
    return f"{prefix}:{HOUR}:{hour_id}"


def ledger_key(prefix: str) -> str:
    return f"{prefix}:{LEDGER}"


def revoked_key(workspace: str) -> str:
    """The set of revoked key ids the budget script checks, in the workspace's own slot."""
    return f"{workspace_prefix(workspace)}:{REVOKED}"


def reservations_key(prefix: str) -> str:
    """Reservations in flight: a sorted set of reservation ids by expiry."""
    return f"{prefix}:{RESERVATIONS}"


def leases_key(prefix: str) -> str:
    """Hash: every live lease of the workspace -> the nanos it still holds."""
    return f"{prefix}:{LEASES}"


def lease_orphans_key(prefix: str, lease_id: str) -> str:
    """Hash: request id -> compact orphan, for the requests admitted under one lease."""
    return f"{prefix}:{LEASE_ORPHANS}:{lease_id}"


def lease_expiry_key(prefix: str) -> str:
    """Zset: every lease of the workspace by the time it expires unless renewed."""
    return f"{prefix}:{LEASE_EXPIRY}"


def rate_minute_key(prefix: str, now_ms: int) -> str:
    """The rate-limit counters of the minute `now_ms` falls in (the reserve script's key)."""
    return f"{prefix}:{RATE_MINUTE}:{now_ms // 60000}"


def rate_field(scope: str, kind: str) -> str:
    """A scope's counter in the minute hash: kind "r" (requests) or "t" (tokens)."""
    return f"{scope}:{kind}"


def session_key(prefix: str, key_id: str, session_id: str) -> str:
    """A session's input tokens over its life (the reserve script's context-growth guard).

    Scoped to the key that sends it: a session id is only a name a client chose, and another
    key of the workspace that learns it must neither read nor grow this total (the reserve
    script builds the same name from its key id and `bounded_session`)."""
    return f"{prefix}:{SESSION}:{key_id}:{bounded_session(session_id)}"


def burn_alerted_key(workspace: str, day_id: str, scope: str) -> str:
    """Set once when a burn-rate alert for (day, scope) went out, by whichever replica."""
    return f"{workspace_prefix(workspace)}:{ALERTED}:burn:{day_id}:{scope}"


def topups_key(workspace: str) -> str:
    """Hash of a workspace's live top-up grants (see the layout above): what raises a cap."""
    return f"{workspace_prefix(workspace)}:{TOPUPS}"


def topup_requests_key(workspace: str) -> str:
    """Sorted set of a workspace's top-up request ids, by when they were made."""
    return f"{workspace_prefix(workspace)}:{TOPUP_REQUESTS}"


def topup_auto_key(workspace: str, period_id: str) -> str:
    """Hash of what auto-approval granted in a budget period, field = scope: the approve
    script checks and adds to it in one step, so concurrent requests cannot pass the
    period's ceiling together."""
    return f"{workspace_prefix(workspace)}:{TOPUP_AUTO}:{period_id}"


def topup_request_key(workspace: str, request_id: str) -> str:
    """Hash of one top-up request (its fields: governance.topups.TopupRequest)."""
    return f"{workspace_prefix(workspace)}:{TOPUP_REQUEST}:{request_id}"


def paused_key(workspace: str) -> str:
    """Hash of the keys the runaway breaker paused in a workspace (key id -> JSON)."""
    return f"{workspace_prefix(workspace)}:{PAUSED}"


def breaker_tripped_key(workspace: str, key_id: str, rule: str, at_ms: int) -> str:
    """Set NX once per trip (a key, a rule, the time of the record that tripped it) when
    the breaker trips, or would in dry run: the replicas together act on it once."""
    return f"{workspace_prefix(workspace)}:{ALERTED}:breaker:{key_id}:{rule}:{at_ms}"


# -- global keys ----------------------------------------------------------------------------

LEDGERS = "extproc:ledgers"
"""The set of per-workspace ledger streams, for readers (`extproc usage`, the spend report)."""
UNMETERED = "{extproc:ledger}:unmetered"
"""Hash: `METHOD /path/*` -> requests seen on paths extproc does not meter."""
REFUSED = "{extproc:ledger}:refused"
"""Hash: reason -> requests refused before anyone was identified (no key, unknown key, a
WebSocket upgrade): counted, not recorded, so a flood of bad keys costs a counter each."""

MODELS_SEEN_PREFIX = "{extproc:models}:unpriced:"
"""`{extproc:models}:unpriced:<model>`: set (NX) by the first replica to see a model the
price table does not know, so its alert goes out once across replicas."""


def unpriced_model_key(model: str) -> str:
    """The once-only marker of an unknown model (names bounded like session ids)."""
    return MODELS_SEEN_PREFIX + model[:SESSION_ID_MAX]


ALERTS = "{extproc:alerts}:recent"
"""Stream of the latest alerts (the console and `GET /admin/v1/alerts` read it)."""

AUDIT = "{extproc:admin}:audit"
"""Stream of administrative actions taken through the console and its API."""

TOPUP_INDEX = "{extproc:topups}:index"
"""Hash: top-up request id -> its workspace (the CLI and the console find a request by id)."""
BREAKER_LEADER = "{extproc:breaker}:leader"
"""String with a TTL: the replica that reads new ledger records for the runaway breaker and
sweeps expired top-ups; the others stand by and take over when it stops renewing."""

# -- the console's people and sessions ------------------------------------------------------
# One hash tag: signing a person out everywhere touches their sessions in one slot. Names
# that come from outside (a session id, an IdP subject) appear only as SHA-256 digests.

CONSOLE_TAG = "{extproc:console}"
CONSOLE_SECRET = f"{CONSOLE_TAG}:secret"
"""String: the key that signs session cookies, made once by whichever replica starts first."""
PEOPLE = f"{CONSOLE_TAG}:people"
"""Set of the digests of every person who signed in (for the people page and key sweeps)."""


def console_session_key(sid_digest: str) -> str:
    """Hash: one browser session (who, their groups, CSRF token, expiry)."""
    return f"{CONSOLE_TAG}:session:{sid_digest}"


def person_sessions_key(person_digest: str) -> str:
    """Set: the session digests of one person (sign out everywhere, disable)."""
    return f"{CONSOLE_TAG}:sessions:{person_digest}"


def person_key(person_digest: str) -> str:
    """Hash: what the console last heard of a person (subject, email, groups, disabled)."""
    return f"{CONSOLE_TAG}:person:{person_digest}"


def login_token_key(token_digest: str) -> str:
    """String with a TTL: a one-time login link's token, usable on any replica, once."""
    return f"{CONSOLE_TAG}:login:{token_digest}"


def flash_key(sid_digest: str) -> str:
    """String with a short TTL: what one page shows once after a redirect (a new key)."""
    return f"{CONSOLE_TAG}:flash:{sid_digest}"


def sign_in_key(state: str) -> str:
    """String with a TTL: an OpenID Connect sign-in under way (PKCE verifier, nonce)."""
    return f"{CONSOLE_TAG}:signin:{state}"


KEY_TAG = "{extproc:keys}"
KEY_HASH_PREFIX = f"{KEY_TAG}:hash:"
KEY_IDS = f"{KEY_TAG}:ids"
KEYS_CHANNEL = "extproc:keys"
"""Pub/sub channel on which every key change is announced to the sidecars' caches, and
every change of a workspace's top-ups or paused keys (`topup <workspace> -`, `pause <key
id> <workspace>`, `resume <key id> <workspace>`) and its budget leases (`leases
<workspace> <why>`)."""
LEASES_NOTICE = "leases"
"""A notice on KEYS_CHANNEL, `leases <workspace> <why>`: every replica closes its budget
leases of the workspace (a replica was refused for want of room that leases hold). A
withdrawn top-up needs none: its `topup` notice closes them (governance.live)."""


def key_hash(secret_sha: str) -> str:
    """The hash holding one virtual key's identity, named by its secret's SHA-256."""
    return KEY_HASH_PREFIX + secret_sha


# -- scopes (fields of the spent / held / day / hour hashes) --------------------------------

WORKSPACE_SCOPE = "ws"
REQUESTS_FIELD = "#requests"
TEAM, SERVICE, KEY, MODEL, SESS = "team:", "svc:", "key:", "model:", "sess:"
GROUP_PREFIXES = {"team": TEAM, "service": SERVICE, "key": KEY, "model": MODEL, "session": SESS}
"""The spend report's `--by` groups and the scope prefix each reads."""
CACHE_FIELDS = (
    "input_tokens",
    "cached_tokens",
    "repeat_tokens",
    "cachemiss_tokens",
    "cachemiss_nanos",
)
"""Per-service prompt-cache counters the settle script keeps, as `<kind>:svc:<service>`."""
SESSION_ID_MAX = 128


def team_scope(team: str) -> str:
    return TEAM + team


def service_scope(service: str) -> str:
    return SERVICE + service


def key_scope(key_id: str) -> str:
    return KEY + key_id


def model_scope(model: str) -> str:
    return MODEL + model


def bounded_session(session_id: str) -> str:
    """Session ids come from clients: bounded so one cannot grow a key or field without end."""
    return session_id[:SESSION_ID_MAX]


def session_scope(key_id: str, session_id: str) -> str:
    """The money a session cost, as a scope: per key, like its token total (`session_key`)."""
    return f"{SESS}{key_id}:{bounded_session(session_id)}"


def team_of(scope: str) -> str | None:
    """The team a `team:T` scope names, else None."""
    return scope.removeprefix(TEAM) if scope.startswith(TEAM) else None


def is_key_scope(scope: str) -> bool:
    return scope.startswith(KEY)


def cache_field(kind: str, service: str) -> str:
    return f"{kind}:{service_scope(service)}"
