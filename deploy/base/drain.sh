#!/bin/bash
# preStop hooks of the extproc pod: Envoy stops taking traffic first, the sidecar goes last.
#
# Kubernetes runs every container's preStop hook at once and sends each container SIGTERM
# only when its own hook returns. Envoy holds the client connections; the sidecar must keep
# answering until the last request through Envoy is done, or those requests fail closed
# (failure_mode_allow: false) and go unmetered. So:
#
#   drain.sh envoy   MAX  fail Envoy's readiness (the pod leaves the Service), give endpoint
#                         removal ENDPOINT_DELAY seconds to reach every client, drain the
#                         client listener (Connection: close, HTTP/2 GOAWAY), then wait until
#                         no request is active, at most MAX seconds in all.
#   drain.sh sidecar MAX  wait until Envoy has exited (its admin port closes), at most MAX
#                         seconds; the sidecar's own SIGTERM drain (grace_seconds) follows.
#
# Both images have bash but no curl, so the admin API is spoken over bash's /dev/tcp.
# The pod's terminationGracePeriodSeconds must exceed sidecar MAX plus grace_seconds.
set -u

ADMIN_HOST=${ENVOY_ADMIN_HOST:-127.0.0.1}
ADMIN_PORT=${ENVOY_ADMIN_PORT:-9901}
ENDPOINT_DELAY=${ENDPOINT_DELAY:-5}
ACTIVE_STAT=${ACTIVE_STAT:-http.openai_egress.downstream_rq_active}

admin() { # METHOD PATH: the response (headers and body) on stdout; fails if Envoy is gone
    exec 3<>"/dev/tcp/${ADMIN_HOST}/${ADMIN_PORT}" || return 1
    printf '%s %s HTTP/1.1\r\nHost: envoy-admin\r\nConnection: close\r\n\r\n' "$1" "$2" >&3
    timeout 5 cat <&3
    local status=$?
    exec 3<&-
    return "$status"
}

admin_up() {
    (exec 3<>"/dev/tcp/${ADMIN_HOST}/${ADMIN_PORT}") 2>/dev/null
}

now_ms() { # wall clock in milliseconds: SECONDS counts whole seconds, so a deadline
    # kept in SECONDS can pass up to a second early (bash 5's EPOCHREALTIME is exact)
    local t=${EPOCHREALTIME//[.,]/}
    echo $((10#$t / 1000))
}

active_requests() {
    admin GET "/stats?filter=^${ACTIVE_STAT//./\\.}\$" | tr -d '\r' |
        awk -F': ' -v stat="$ACTIVE_STAT" '$1 == stat { print $2 }'
}

drain_envoy() {
    local deadline=$(($(now_ms) + $1 * 1000))
    if ! admin POST /healthcheck/fail >/dev/null 2>&1; then
        echo "drain: Envoy's admin API does not answer; nothing to drain"
        return 0
    fi
    echo "drain: readiness failed; waiting ${ENDPOINT_DELAY}s for endpoint removal"
    sleep "$ENDPOINT_DELAY"
    admin POST '/drain_listeners?graceful&inboundonly' >/dev/null || return 0
    local active
    # Look at least once, however long the admin calls above took: a short grace period
    # can be used up before the first look.
    while :; do
        active=$(active_requests) || return 0
        if [[ "$active" == 0 ]]; then
            echo "drain: no active requests"
            return 0
        fi
        echo "drain: ${active:-unknown} requests still active"
        (($(now_ms) < deadline)) || break
        sleep 1
    done
    echo "drain: gave up after $1s with requests still active"
}

wait_for_envoy_exit() {
    local deadline=$(($(now_ms) + $1 * 1000))
    while (($(now_ms) < deadline)) && admin_up; do
        sleep 1
    done
    if admin_up; then
        echo "drain: Envoy still up after $1s"
    else
        echo "drain: Envoy has exited"
    fi
}

case "${1:-}" in
envoy) drain_envoy "${2:?MAX seconds}" ;;
sidecar) wait_for_envoy_exit "${2:?MAX seconds}" ;;
*)
    echo "usage: $0 envoy|sidecar MAX_SECONDS" >&2
    exit 2
    ;;
esac
