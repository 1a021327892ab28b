#!/bin/sh
# Entrypoint of the macstream image. One optional step, then exec the command:
#
# MACSTREAM_JOIN_RAY=1   join the Ray cluster at $RAY_ADDRESS as a node with no CPUs before the command runs.
#                        A Ray driver (`macstream ingest`, `macstream serve`) started with RAY_ADDRESS=host:port needs
#                        a raylet on its own host; this node reserves nothing, so the cluster's work stays on the
#                        Ray workers (0-CPU actors such as the ingest consumers may still be placed here).
set -eu

if [ "${MACSTREAM_JOIN_RAY:-0}" = "1" ]; then
    : "${RAY_ADDRESS:?MACSTREAM_JOIN_RAY=1 needs RAY_ADDRESS=host:port of the Ray head}"
    ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 \
        --object-store-memory="${MACSTREAM_DRIVER_OBJECT_STORE_BYTES:-134217728}" --disable-usage-stats
fi

exec "$@"
