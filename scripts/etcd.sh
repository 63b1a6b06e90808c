#!/usr/bin/env bash
# A throwaway single-node etcd on 127.0.0.1 for modules 5 and 6.
#
#   ./scripts/etcd.sh start    # data in a temporary directory, client port 2379
#   ./scripts/etcd.sh status
#   ./scripts/etcd.sh stop     # stops it and deletes its data
#
# ETCD_PORT changes the client port (the peer port is ETCD_PORT+1). The
# binary is Debian's etcd-server package, which scripts/setup.sh installs.
set -euo pipefail

port="${ETCD_PORT:-2379}"
state="${TMPDIR:-/tmp}/spark-disagg-etcd-$port"
pidfile="$state/etcd.pid"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
start)
    if running; then
        echo "etcd already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
        exit 0
    fi
    command -v etcd >/dev/null || {
        echo "etcd is not installed: run ./scripts/setup.sh (Debian/Ubuntu: apt-get install etcd-server)" >&2
        exit 1
    }
    rm -rf "$state" && mkdir -p "$state"
    etcd --name spark-disagg --data-dir "$state/data" \
        --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
        --listen-peer-urls "http://127.0.0.1:$((port + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
        --initial-cluster "spark-disagg=http://127.0.0.1:$((port + 1))" \
        >"$state/etcd.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "etcd running on 127.0.0.1:$port (pid $(cat "$pidfile"), log $state/etcd.log)"
            exit 0
        fi
        running || break
        sleep 0.1
    done
    echo "etcd did not start; its log:" >&2
    cat "$state/etcd.log" >&2
    exit 1
    ;;
stop)
    if running; then
        kill "$(cat "$pidfile")"
        echo "stopped etcd on 127.0.0.1:$port"
    else
        echo "etcd was not running on 127.0.0.1:$port"
    fi
    rm -rf "$state"
    ;;
status)
    if running; then echo "running on 127.0.0.1:$port (pid $(cat "$pidfile"))"; else
        echo "not running"
        exit 1
    fi
    ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
