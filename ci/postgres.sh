# shellcheck shell=bash
# Start and stop a throw-away PostgreSQL for the tests. Source this file, then:
#   pg_start        # sets STRATUS_TEST_PG_URL; the server lives under $PG_DIR
#   pg_stop         # also run from an EXIT trap by the caller
# Needs the PostgreSQL server binaries (Debian: postgresql) and a `postgres` user when run as root.

pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
    return 1
}

pg_as() {
    # Run a command as the postgres user when we are root (initdb refuses root).
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_start() {
    local bin port
    if ! bin=$(pg_bin); then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "ci: installing PostgreSQL server" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
            bin=$(pg_bin) || { echo "ci: no PostgreSQL server after install" >&2; return 1; }
        else
            echo "ci: PostgreSQL server binaries not found" >&2
            return 1
        fi
    fi
    PG_DIR=$(mktemp -d /tmp/stratus-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
    port=$(( 20000 + RANDOM % 20000 ))
    pg_as "$bin/initdb" -D "$PG_DIR/data" --auth=trust --username=stratus --locale=C -E UTF8 >"$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; return 1; }
    pg_as "$bin/pg_ctl" -D "$PG_DIR/data" -w -l "$PG_DIR/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c fsync=off -c max_connections=200" start >/dev/null \
        || { cat "$PG_DIR/server.log" >&2; return 1; }
    PG_BIN=$bin
    export STRATUS_TEST_PG_URL="postgres://stratus@127.0.0.1:$port/postgres"
    echo "ci: PostgreSQL on port $port ($PG_DIR)" >&2
}

pg_stop() {
    if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ]; then
        pg_as "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
    PG_DIR=
}
