# Start a throw-away PostgreSQL server for the study-store test, loopback only.
#
# Source it from .ci/run (bash) before the tests:
#
#     . scripts/ci_postgres.sh      # exports STEPSEARCH_TEST_POSTGRES_URL, stops the server on exit
#
# It installs PostgreSQL with apt-get when it is missing, makes a cluster in a temporary directory
# (trust authentication, listening on 127.0.0.1 only, on a free port), creates the database
# `stepsearch_test`, and exports its URL. PostgreSQL refuses to run as root, so the server runs as
# the `postgres` user the Debian package creates. Without root or apt it warns and exports nothing:
# the PostgreSQL test is then skipped with that reason.

_stepsearch_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq postgresql >/dev/null || return 1
        else
            return 1
        fi
    fi
    local bin run_as data port
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    data=$(mktemp -d /tmp/stepsearch-pg.XXXXXX)
    run_as=()
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$data" || return 1
        run_as=(runuser -u postgres --)
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${run_as[@]}" "$bin/initdb" -D "$data/db" -U postgres --auth=trust -E UTF8 >/dev/null || return 1
    "${run_as[@]}" "$bin/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off" start >/dev/null || {
        cat "$data/server.log" >&2
        return 1
    }
    "${run_as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres stepsearch_test || return 1
    STEPSEARCH_PG_STOP=("${run_as[@]}" "$bin/pg_ctl" -D "$data/db" -m immediate stop)
    export STEPSEARCH_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/stepsearch_test"
    trap '"${STEPSEARCH_PG_STOP[@]}" >/dev/null 2>&1 || true' EXIT
    echo "PostgreSQL for the store test: $STEPSEARCH_TEST_POSTGRES_URL"
}

_stepsearch_postgres || echo "warning: no PostgreSQL server started; its store test will be skipped" >&2
