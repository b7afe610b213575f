#!/usr/bin/env bash
# Restarts the local PostgreSQL with an outage: `scripts/restart-postgres.sh
# [DOWN_SECONDS]` stops the server (fast shutdown: every session is cut),
# keeps it down DOWN_SECONDS (default 5), then starts it again and waits until
# it answers (scripts/ensure-postgres.sh). Used by `scripts/prove.sh db-faults`.
# Refuses (exit 1) when DATABASE_URL names another server than the local one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
down_for="${1:-5}"
# shellcheck source=ensure-postgres.sh
source scripts/ensure-postgres.sh

if ! _pg_url_is_ours; then
    _pg_say "DATABASE_URL names another server; restart it yourself."
    exit 1
fi

versions=$(_pg_versions_with_cluster)
if [[ -z $versions && -n ${PGDATA:-} ]] && command -v pg_ctl >/dev/null 2>&1; then
    _pg_say "stopping the server in PGDATA=$PGDATA (fast)."
    pg_ctl -D "$PGDATA" stop -m fast
elif [[ -n $versions ]]; then
    for version in $versions; do
        _pg_say "stopping cluster $version/main (fast)."
        if command -v pg_ctlcluster >/dev/null 2>&1; then
            _pg_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main stop -m fast
        else
            _pg_as_postgres "/usr/lib/postgresql/$version/bin/pg_ctl" \
                -D "/etc/postgresql/$version/main" stop -m fast
        fi
    done
else
    _pg_say "no PostgreSQL cluster found to restart."
    exit 1
fi
sleep "$down_for"
ensure_postgres
