#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 (for scripts/test.sh,
# scripts/run.sh and any other script that needs the local database).
#
# - It answers already: nothing to do.
# - It is installed but stopped: start the `main` cluster of every version in
#   /etc/postgresql with `pg_ctlcluster --skip-systemctl-redirect` (Debian), or
#   with `pg_ctl` where pg_ctlcluster is absent. A server without any cluster
#   gets one (pg_createcluster).
# - It is not installed: `apt-get install -y postgresql` (through sudo unless
#   root), then start it. A cluster created here is new and local, so it is
#   given passwordless (trust) login from 127.0.0.1 and ::1, which is what the
#   default DATABASE_URL (postgres://postgres@127.0.0.1:5432/…) needs.
# Then wait up to 30 s for it to answer, and check that DATABASE_URL's user can
# log in (a clear message instead of a failed test run later).
#
# When DATABASE_URL names another server than 127.0.0.1:5432 / localhost:5432,
# nothing is done. Run it, or source it and call `ensure_postgres`.

PG_HOST=127.0.0.1
PG_PORT=5432
PG_WAIT_SECONDS=30

_pg_say() { echo "ensure-postgres: $*" >&2; }

_pg_as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _pg_say "this step needs root and sudo is not installed: $*"
        return 1
    fi
}

_pg_as_postgres() {
    if [[ $(id -un) == postgres ]]; then
        "$@"
    elif [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        sudo -u postgres "$@"
    fi
}

# The first pg_isready on PATH or in a versioned bin directory; none: status 1.
_pg_isready_bin() {
    local candidate
    if command -v pg_isready >/dev/null 2>&1; then
        command -v pg_isready
        return 0
    fi
    for candidate in /usr/lib/postgresql/*/bin/pg_isready; do
        if [[ -x $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

_pg_answers() {
    local isready
    isready=$(_pg_isready_bin) || return 1
    "$isready" -q -h "$PG_HOST" -p "$PG_PORT"
}

_pg_server_installed() {
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v postgres >/dev/null 2>&1
}

# Is DATABASE_URL unset or pointing at the server this script manages?
_pg_url_is_ours() {
    local url=${DATABASE_URL:-}
    [[ -z $url ]] && return 0
    local re='^postgres(ql)?://([^@/]*@)?([^/:?]+|\[[^]]*\])(:([0-9]+))?([/?].*)?$'
    if [[ $url =~ $re ]]; then
        local host=${BASH_REMATCH[3]} port=${BASH_REMATCH[5]:-5432}
        [[ ($host == "$PG_HOST" || $host == localhost) && $port == "$PG_PORT" ]]
    else
        return 0 # cannot tell (e.g. a socket URL): treat it as ours
    fi
}

# DATABASE_URL with its database replaced by `postgres` (the database itself
# may not exist yet: the daemon creates it).
_pg_maintenance_url() {
    local url=${DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
    local re='^(postgres(ql)?://[^/?]*)(/[^?]*)?(\?.*)?$'
    if [[ $url =~ $re ]]; then
        printf '%s/postgres%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[4]}"
    else
        printf '%s\n' "$url"
    fi
}

_pg_versions_with_cluster() {
    local conf
    for conf in /etc/postgresql/*/main/postgresql.conf; do
        [[ -f $conf ]] || continue
        basename "$(dirname "$(dirname "$conf")")"
    done
}

_pg_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _pg_say "PostgreSQL is not installed and apt-get is not available; install PostgreSQL and start it on $PG_HOST:$PG_PORT."
        return 1
    fi
    _pg_say "PostgreSQL is not installed; installing it with apt-get."
    _pg_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || return 1
    _pg_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql || return 1
}

# Creates a `main` cluster for the newest installed version when none exists.
_pg_create_cluster() {
    local bin version
    bin=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -n 1) || true
    [[ -n $bin ]] || return 1
    version=$(basename "$(dirname "$(dirname "$bin")")")
    if ! command -v pg_createcluster >/dev/null 2>&1; then
        _pg_say "no cluster in /etc/postgresql and pg_createcluster is absent; create one for PostgreSQL $version."
        return 1
    fi
    _pg_say "creating cluster $version/main."
    _pg_as_root pg_createcluster --port "$PG_PORT" "$version" main || return 1
}

# Puts passwordless login from the loopback first in a new cluster's pg_hba.conf.
_pg_trust_loopback() {
    local version=$1 hba="/etc/postgresql/$1/main/pg_hba.conf" tmp
    _pg_as_root test -f "$hba" || return 0
    if _pg_as_root grep -q 'added by scripts/ensure-postgres.sh' "$hba"; then
        return 0
    fi
    _pg_say "allowing passwordless login from $PG_HOST and ::1 in $hba (new local cluster)."
    tmp=$(mktemp)
    {
        echo "# orderbridge local development: trust the loopback (added by scripts/ensure-postgres.sh)"
        echo "host    all             all             127.0.0.1/32            trust"
        echo "host    all             all             ::1/128                 trust"
        _pg_as_root cat "$hba"
    } >"$tmp" || { rm -f "$tmp"; return 1; }
    # cp onto the existing file keeps its owner and mode.
    if ! _pg_as_root cp "$tmp" "$hba"; then
        rm -f "$tmp"
        return 1
    fi
    rm -f "$tmp"
    if _pg_answers && command -v pg_ctlcluster >/dev/null 2>&1; then
        _pg_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
}

_pg_start() {
    local versions version pg_ctl
    versions=$(_pg_versions_with_cluster)
    if [[ -z $versions ]]; then
        if [[ -n ${PGDATA:-} ]] && command -v pg_ctl >/dev/null 2>&1; then
            _pg_say "starting the server in PGDATA=$PGDATA with pg_ctl."
            pg_ctl -D "$PGDATA" -l "$PGDATA/server.log" start || return 1
            return 0
        fi
        _pg_say "no PostgreSQL cluster found in /etc/postgresql (and PGDATA is not set)."
        return 1
    fi
    for version in $versions; do
        if command -v pg_ctlcluster >/dev/null 2>&1; then
            _pg_say "starting cluster $version/main with pg_ctlcluster."
            _pg_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
                _pg_say "pg_ctlcluster could not start $version/main (see /var/log/postgresql/postgresql-$version-main.log)."
        else
            pg_ctl=/usr/lib/postgresql/$version/bin/pg_ctl
            [[ -x $pg_ctl ]] || pg_ctl=$(command -v pg_ctl) || {
                _pg_say "neither pg_ctlcluster nor pg_ctl found for PostgreSQL $version."
                continue
            }
            _pg_say "starting cluster $version/main with pg_ctl."
            _pg_as_root install -d -o postgres -g postgres -m 2775 /var/run/postgresql || true
            # -D names the configuration directory; its postgresql.conf sets data_directory.
            _pg_as_postgres "$pg_ctl" -D "/etc/postgresql/$version/main" \
                -l "/var/log/postgresql/postgresql-$version-main.log" start ||
                _pg_say "pg_ctl could not start $version/main."
        fi
    done
}

_pg_wait() {
    local deadline=$((SECONDS + PG_WAIT_SECONDS))
    until _pg_answers; do
        if ((SECONDS >= deadline)); then
            _pg_say "PostgreSQL does not answer on $PG_HOST:$PG_PORT after ${PG_WAIT_SECONDS} s."
            return 1
        fi
        sleep 1
    done
}

_pg_check_login() {
    command -v psql >/dev/null 2>&1 || return 0
    local url output
    url=$(_pg_maintenance_url)
    if output=$(PGCONNECT_TIMEOUT=5 psql "$url" -X -w -A -t -q -c 'SELECT 1' 2>&1); then
        return 0
    fi
    _pg_say "PostgreSQL answers on $PG_HOST:$PG_PORT but DATABASE_URL's user cannot log in:"
    echo "  $output" >&2
    _pg_say "either set DATABASE_URL with a user and password that work, or allow passwordless"
    _pg_say "local login: add 'host all all 127.0.0.1/32 trust' at the top of pg_hba.conf and reload."
    return 1
}

ensure_postgres() {
    if ! _pg_url_is_ours; then
        _pg_say "DATABASE_URL names another server; leaving it alone."
        return 0
    fi
    if _pg_answers; then
        _pg_check_login
        return
    fi
    local created=""
    if ! _pg_server_installed; then
        _pg_install || return 1
        created=$(_pg_versions_with_cluster)
    fi
    if [[ -z $(_pg_versions_with_cluster) && -z ${PGDATA:-} ]]; then
        _pg_create_cluster || return 1
        created=$(_pg_versions_with_cluster)
    fi
    local version
    for version in $created; do
        _pg_trust_loopback "$version" || return 1
    done
    if ! _pg_answers; then
        _pg_start || return 1
    fi
    _pg_wait || return 1
    _pg_say "PostgreSQL answers on $PG_HOST:$PG_PORT."
    _pg_check_login
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    ensure_postgres "$@"
fi
