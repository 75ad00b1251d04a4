# Sourced by scripts/test.sh: installs (when missing) and starts the servers the
# tests need — a private PostgreSQL cluster and an S3-compatible server
# (s3s-fs), both on loopback — and stops them when the shell exits.
#
# Exports for the tests:
#   COHORT_TEST_POSTGRES_URL   admin URL of the cluster (tests create their own databases)
#   COHORT_TEST_S3_ENDPOINT    the S3 endpoint, with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
#   COHORT_PG_BIN              PostgreSQL's bin directory (tests that stop/start their own cluster)
#   COHORT_S3S_FS              the s3s-fs binary (tests that run their own S3 server)
#   COHORT_TEST_PYTHON         a Python with numpy, safetensors and python/cohort_client
#                              (training.runtime: command's tests)
#   COHORT_TEST_SCHEMATHESIS   the schemathesis command (the REST API's OpenAPI conformance test)

COHORT_TOOLS="${COHORT_TOOLS:-$HOME/.cache/cohort-tools}"
S3S_FS_VERSION=0.14.1

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a PostgreSQL command as a user PostgreSQL agrees to run as.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin_dir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_postgres() {
    local packages=()
    if [ -z "$(pg_bin_dir)" ] || [ ! -x "$(pg_bin_dir)/initdb" ]; then packages+=(postgresql); fi
    # tcpdump: the capture test checks that no plaintext gRPC crosses loopback.
    if ! command -v tcpdump >/dev/null && [ ! -x /usr/bin/tcpdump ] && [ ! -x /usr/sbin/tcpdump ]; then packages+=(tcpdump); fi
    # Debian's prometheus package: promtool checks every service's output, and a test runs
    # its own Prometheus server against a federation.
    if ! { command -v promtool >/dev/null || [ -x /usr/bin/promtool ]; } || [ ! -x /usr/bin/prometheus ]; then packages+=(prometheus); fi
    # Headless Chromium and its WebDriver: the dashboard's browser test.
    if ! command -v chromium >/dev/null; then packages+=(chromium); fi
    if ! command -v chromedriver >/dev/null; then packages+=(chromium-driver); fi
    if [ "${#packages[@]}" -gt 0 ]; then
        echo "installing ${packages[*]} from Debian's packages"
        as_root timeout 300 apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${packages[@]}" >/dev/null
        # The packaged cluster is not used: tests run a private one.
        as_root pg_ctlcluster --force "$(basename "$(dirname "$(pg_bin_dir)")")" main stop 2>/dev/null || true
        # Nor is the packaged Prometheus service: the test starts its own server.
        as_root service prometheus stop >/dev/null 2>&1 || true
        as_root pkill -x prometheus 2>/dev/null || true
    fi
    COHORT_PG_BIN="$(pg_bin_dir)"
    export COHORT_PG_BIN
}

ensure_s3s_fs() {
    COHORT_S3S_FS="$COHORT_TOOLS/bin/s3s-fs"
    if [ ! -x "$COHORT_S3S_FS" ]; then
        echo "installing s3s-fs $S3S_FS_VERSION (an S3-compatible server) into $COHORT_TOOLS"
        cargo install --locked --quiet "s3s-fs@$S3S_FS_VERSION" --features binary --root "$COHORT_TOOLS"
    fi
    export COHORT_S3S_FS
}

# A virtual environment with numpy, safetensors and the repository's python/cohort_client
# (installed again every run: the package may have changed).
ensure_python_env() {
    local venv="$COHORT_TOOLS/pyenv" client
    client="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/python/cohort_client"
    if [ ! -x "$venv/bin/python" ]; then
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            echo "installing python3-venv from Debian's packages"
            as_root apt-get update -qq
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$venv"
            python3 -m venv "$venv"
        fi
    fi
    if ! "$venv/bin/python" -c 'import numpy, safetensors' 2>/dev/null; then
        echo "installing numpy and safetensors into $venv"
        "$venv/bin/pip" install --quiet numpy safetensors
    fi
    # schemathesis: the REST API's property-based OpenAPI conformance test.
    if [ ! -x "$venv/bin/schemathesis" ]; then
        echo "installing schemathesis into $venv"
        timeout 600 "$venv/bin/pip" install --quiet --timeout 60 schemathesis \
            || echo "schemathesis could not be installed: the REST conformance test cannot run"
    fi
    if [ -x "$venv/bin/schemathesis" ]; then
        COHORT_TEST_SCHEMATHESIS="$venv/bin/schemathesis"
        export COHORT_TEST_SCHEMATHESIS
    fi
    # A copy, so that no build directory is left in the repository.
    local copy
    copy="$(mktemp -d)"
    cp -r "$client" "$copy/"
    "$venv/bin/pip" install --quiet --no-deps --force-reinstall "$copy/cohort_client" >/dev/null
    rm -rf "$copy"
    COHORT_TEST_PYTHON="$venv/bin/python"
    export COHORT_TEST_PYTHON
}

# A free TCP port on loopback (bound and released by the kernel's choice).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}

wait_port() { # port seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

TEST_SERVICES_DIR=""
S3_PID=""

stop_test_services() {
    if [ -n "$TEST_SERVICES_DIR" ] && [ -d "$TEST_SERVICES_DIR/pg" ]; then
        as_pg "$COHORT_PG_BIN/pg_ctl" -D "$TEST_SERVICES_DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [ -n "$S3_PID" ]; then
        kill "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
    fi
    [ -n "$TEST_SERVICES_DIR" ] && rm -rf "$TEST_SERVICES_DIR"
}

start_test_services() {
    ensure_postgres
    ensure_s3s_fs
    ensure_python_env
    TEST_SERVICES_DIR="$(mktemp -d /tmp/cohort-test-services.XXXXXX)"
    chmod 755 "$TEST_SERVICES_DIR"
    trap stop_test_services EXIT

    local pg="$TEST_SERVICES_DIR/pg" port password
    mkdir -p "$pg"
    [ "$(id -u)" = 0 ] && chown postgres "$pg"
    password="cohort-$RANDOM$RANDOM"
    printf '%s\n' "$password" > "$pg/pwfile"
    [ "$(id -u)" = 0 ] && chown postgres "$pg/pwfile"
    as_pg "$COHORT_PG_BIN/initdb" -D "$pg/data" -U cohort --auth=scram-sha-256 --pwfile="$pg/pwfile" >"$pg/initdb.log" 2>&1 \
        || { cat "$pg/initdb.log"; return 1; }
    for _ in 1 2 3; do
        port="$(free_port)"
        if as_pg "$COHORT_PG_BIN/pg_ctl" -D "$pg/data" -l "$pg/log" -w -t 30 \
            -o "-p $port -k $pg -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null; then
            break
        fi
        port=""
    done
    [ -n "$port" ] || { echo "PostgreSQL did not start:"; cat "$pg/log"; return 1; }
    export COHORT_TEST_POSTGRES_URL="postgres://cohort:$password@127.0.0.1:$port/postgres"
    echo "PostgreSQL $(basename "$(dirname "$COHORT_PG_BIN")") on 127.0.0.1:$port"

    local s3="$TEST_SERVICES_DIR/s3" s3port
    mkdir -p "$s3/root"
    s3port="$(free_port)"
    export AWS_ACCESS_KEY_ID="cohort-test" AWS_SECRET_ACCESS_KEY="cohort-test-secret-$RANDOM" AWS_REGION="us-east-1"
    "$COHORT_S3S_FS" --host 127.0.0.1 --port "$s3port" \
        --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$s3/root" >"$s3/log" 2>&1 &
    S3_PID=$!
    wait_port "$s3port" 30 || { echo "s3s-fs did not start:"; cat "$s3/log"; return 1; }
    export COHORT_TEST_S3_ENDPOINT="http://127.0.0.1:$s3port"
    echo "s3s-fs $S3S_FS_VERSION on 127.0.0.1:$s3port"
}
