#!/bin/sh
# Entrypoint of the macstream image. Two optional steps, then exec the command:
#
# MACSTREAM_JOIN_RAY=1   join the Ray cluster at $RAY_ADDRESS as a node with no CPUs before the command runs.
#                        A Ray driver (`macstream ingest`, `macstream serve`) started with RAY_ADDRESS=host:port needs
#                        a raylet on its own host; this node reserves nothing, so the cluster's work stays on the
#                        Ray workers (0-CPU actors such as the ingest consumers may still be placed here).
# MACSTREAM_METRICS_FORWARD=PUBLIC:LOOPBACK
#                        forward 0.0.0.0:PUBLIC to 127.0.0.1:LOOPBACK. `macstream ingest --metrics-port` binds
#                        127.0.0.1 only, which no other container (Prometheus) can reach.
set -eu

if [ "${MACSTREAM_JOIN_RAY:-0}" = "1" ]; then
    : "${RAY_ADDRESS:?MACSTREAM_JOIN_RAY=1 needs RAY_ADDRESS=host:port of the Ray head}"
    ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 \
        --object-store-memory="${MACSTREAM_DRIVER_OBJECT_STORE_BYTES:-134217728}" --disable-usage-stats
fi

if [ -n "${MACSTREAM_METRICS_FORWARD:-}" ]; then
    public="${MACSTREAM_METRICS_FORWARD%%:*}"
    loopback="${MACSTREAM_METRICS_FORWARD##*:}"
    socat "TCP-LISTEN:${public},fork,reuseaddr" "TCP:127.0.0.1:${loopback}" &
fi

exec "$@"
