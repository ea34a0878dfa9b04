#!/bin/sh
# Start one pod of the Sentinel-managed set: `start.sh valkey` or `start.sh sentinel`.
# Which pod is the primary is the Sentinels' call once they run; on a first start (no
# Sentinel answers) pod 0 is. Passwords go in on stdin, never on the command line.
set -eu
SELF="${POD_NAME}.extproc-redis"
TLS="--tls-cert-file /tls/tls.crt --tls-key-file /tls/tls.key --tls-ca-cert-file /tls/ca.crt"

primary() {
    for peer in extproc-redis-0 extproc-redis-1 extproc-redis-2; do
        found=$(REDISCLI_AUTH="$REDIS_PASSWORD" timeout 3 valkey-cli --tls $TLS \
            -h "$peer.extproc-redis" -p 26379 sentinel get-master-addr-by-name extproc 2>/dev/null |
            head -n 1) || true
        if [ -n "$found" ]; then echo "$found"; return; fi
    done
    echo "extproc-redis-0.extproc-redis"
}

case "$1" in
valkey)
    PRIMARY=$(primary)
    REPLICAOF=""
    [ "$PRIMARY" = "$SELF" ] || REPLICAOF="replicaof $PRIMARY 6379"
    exec valkey-server - <<CONF
port 0
tls-port 6379
tls-replication yes
tls-cert-file /tls/tls.crt
tls-key-file /tls/tls.key
tls-ca-cert-file /tls/ca.crt
tls-auth-clients optional
dir /data
appendonly yes
appendfsync everysec
save ""
maxmemory 768mb
maxmemory-policy noeviction
replica-announce-ip $SELF
requirepass $REDIS_PASSWORD
masterauth $REDIS_PASSWORD
$REPLICAOF
CONF
    ;;
sentinel)
    PRIMARY=$(primary)
    # Sentinel rewrites its config as it learns: it lives on the writable volume.
    CONF=/data/sentinel.conf
    cat >"$CONF" <<CONF
port 0
tls-port 26379
tls-replication yes
tls-cert-file /tls/tls.crt
tls-key-file /tls/tls.key
tls-ca-cert-file /tls/ca.crt
tls-auth-clients optional
resolve-hostnames yes
announce-hostnames yes
sentinel announce-ip $SELF
requirepass $REDIS_PASSWORD
sentinel monitor extproc $PRIMARY 6379 2
sentinel auth-pass extproc $REDIS_PASSWORD
sentinel down-after-milliseconds extproc 5000
sentinel failover-timeout extproc 60000
sentinel parallel-syncs extproc 1
CONF
    exec valkey-server "$CONF" --sentinel
    ;;
*)
    echo "usage: $0 valkey|sentinel" >&2
    exit 2
    ;;
esac
