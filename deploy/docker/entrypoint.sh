#!/bin/sh
# The image's entry point: the first argument says which Moneta process this
# container is. `moneta --dry-run <command>` prints what would run instead.
#
#   ledger|wallet|budget|fraud [serve|migrate|<command>]   a gRPC service (serve by default)
#   gateway                                                the HTTP API
#   consumer <name>                                        one of the wallet's event consumers
#   relay wallet|budget                                    a service's outbox relay on its own
#   migrate [service...]                                   every service's migrations (the Job)
set -eu

SERVICES="ledger wallet budget fraud"
CONSUMERS="user_created booking_created booking_cancelled"

dry_run=""
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi

usage() {
    echo "usage: moneta [--dry-run] ledger|wallet|budget|fraud [command] | gateway" \
        "| consumer $(echo "$CONSUMERS" | tr ' ' '|') | relay wallet|budget" \
        "| migrate [service...]" >&2
    exit 64
}

# Runs the command in place of this shell (so that it gets SIGTERM), or
# prints it.
run() {
    if [ -n "$dry_run" ]; then
        echo "$*"
        exit 0
    fi
    exec "$@"
}

is_one_of() {
    for candidate in $2; do
        [ "$1" = "$candidate" ] && return 0
    done
    return 1
}

[ $# -ge 1 ] || usage
command="$1"
shift

case "$command" in
    ledger | wallet | budget | fraud)
        run python -m "services.$command" "${@:-serve}"
        ;;
    gateway)
        run python -m services.gateway
        ;;
    consumer)
        [ $# -eq 1 ] && is_one_of "$1" "$CONSUMERS" || usage
        run env "MONETA_EVENTS_CONSUMERS=$1" python -m services.wallet consume
        ;;
    relay)
        [ $# -eq 1 ] && is_one_of "$1" "wallet budget" || usage
        run python -m "services.$1" relay
        ;;
    migrate)
        # One after the other, stopping at the first failure.
        for service in ${@:-$SERVICES}; do
            is_one_of "$service" "$SERVICES" || usage
            if [ -n "$dry_run" ]; then
                echo "python -m services.$service migrate"
            else
                python -m "services.$service" migrate
            fi
        done
        ;;
    *)
        usage
        ;;
esac
