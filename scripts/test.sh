#!/usr/bin/env bash
# Runs the whole test suite against real servers, which it starts itself:
#   - Apache Kafka (one KRaft node, from Maven Central: scripts/kafka.sh, jars cached
#     under ~/.cache/dwh-helper), with PLAINTEXT, SASL_PLAINTEXT and SASL_SSL
#     listeners and ACLs, unless DWH_TEST_KAFKA_BOOTSTRAP points at a running broker
#     already (the security tests then need the other DWH_TEST_KAFKA_* variables);
#   - confluent-kafka (PyPI), a third-party producer for the compression test;
#   - Chromium (Debian's package), to render the /docs page in a test;
#   - schemathesis (PyPI), to fuzz the API from its OpenAPI document in a test;
#   - prometheus-client (PyPI), whose two parsers read /metrics in a test;
#   - a throwaway PostgreSQL cluster in a temporary directory (initdb + pg_ctl of the
#     installed PostgreSQL, on a free port), unless DWH_TEST_DATABASE_URL points at a
#     running server already;
# then `cargo test`. Extra arguments go to cargo test (e.g. scripts/test.sh writer).
# Everything it started is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=""
pg_ctl_cmd=()
s3_pid=""
s3_log=""
kafka_dir=""
cleanup() {
  if [ -n "$s3_pid" ]; then kill "$s3_pid" 2>/dev/null || true; fi
  if [ -n "$s3_log" ]; then rm -f "$s3_log"; fi
  if [ -n "$kafka_dir" ]; then
    if [ -f "$kafka_dir/env" ]; then
      kafka_pid=$(sed -n 's/^export DWH_TEST_KAFKA_PID=//p' "$kafka_dir/env")
      kill "$kafka_pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$kafka_pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$kafka_pid" 2>/dev/null || true
    fi
    rm -rf "$kafka_dir"
  fi
  if [ ${#pg_ctl_cmd[@]} -gt 0 ]; then
    "${pg_ctl_cmd[@]}" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "$tmp" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ -z "${DWH_TEST_DATABASE_URL:-}" ]; then
  bindir=$(pg_config --bindir 2>/dev/null || true)
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    echo "scripts/test.sh: PostgreSQL server binaries (initdb, pg_ctl) not found;" >&2
    echo "install PostgreSQL (e.g. apt-get install postgresql) or set DWH_TEST_DATABASE_URL" >&2
    exit 1
  fi
  tmp=$(mktemp -d /tmp/dwh-helper-test.XXXXXX)
  chmod 755 "$tmp"
  as_owner=()
  if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root: the cluster belongs to the postgres user.
    chown postgres "$tmp"
    as_owner=(runuser -u postgres --)
  fi
  port=$(free_port)
  "${as_owner[@]}" "$bindir/initdb" -D "$tmp/data" -U postgres -A trust -E UTF8 --no-sync >"$tmp/initdb.log" 2>&1 \
    || { cat "$tmp/initdb.log" >&2; exit 1; }
  pg_ctl_cmd=("${as_owner[@]}" "$bindir/pg_ctl")
  # fsync off: these tests do not measure durability across power loss.
  "${pg_ctl_cmd[@]}" -D "$tmp/data" -l "$tmp/server.log" -w -t 60 \
    -o "-p $port -k $tmp -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
    start >/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
  export DWH_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  # For tests that stop and start the server (database outage).
  export DWH_TEST_PG_CTL="${pg_ctl_cmd[*]}" DWH_TEST_PGDATA="$tmp/data"
  echo "scripts/test.sh: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
fi

# The S3-protocol server: moto's server mode (in memory), on a free port.
if [ -z "${DWH_TEST_S3_ENDPOINT:-}" ]; then
  if [ "$(python3 -c 'import moto; print(moto.__version__)' 2>/dev/null)" != 5.1.22 ]; then
    echo "scripts/test.sh: installing moto[server] (the S3-protocol test server) with pip"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.1.22' >/dev/null
  fi
  s3_port=$(free_port)
  s3_log=$(mktemp /tmp/dwh-helper-moto.XXXXXX)
  python3 -m moto.server -H 127.0.0.1 -p "$s3_port" >"$s3_log" 2>&1 &
  s3_pid=$!
  for _ in $(seq 1 100); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$s3_port/moto-api/')" 2>/dev/null; then break; fi
    sleep 0.1
  done
  export DWH_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
  echo "scripts/test.sh: S3 (moto $(python3 -c 'import moto; print(moto.__version__)')) on 127.0.0.1:$s3_port"
fi

# Chromium renders /docs in a test, with every other host blocked.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "scripts/test.sh: installing Debian's chromium for the docs page test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: chromium not found; install it (apt-get install chromium)" >&2
    exit 1
  fi
fi

# schemathesis fuzzes the API from its own OpenAPI document in a test.
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != 4.32.5 ]; then
  echo "scripts/test.sh: installing schemathesis (the API fuzzer) with pip"
  python3 -m pip install --quiet --disable-pip-version-check 'schemathesis==4.32.5' >/dev/null
fi

# confluent-kafka: a producer that is not ours, for the compression test.
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("confluent-kafka"))' 2>/dev/null)" != 2.16.1 ]; then
  echo "scripts/test.sh: installing confluent-kafka (a third-party Kafka producer) with pip"
  python3 -m pip install --quiet --disable-pip-version-check 'confluent-kafka==2.16.1' >/dev/null
fi

# prometheus-client: the Prometheus text and OpenMetrics parsers a test reads
# /metrics with.
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("prometheus-client"))' 2>/dev/null)" != 0.23.1 ]; then
  echo "scripts/test.sh: installing prometheus-client (the metrics parsers) with pip"
  python3 -m pip install --quiet --disable-pip-version-check 'prometheus-client==0.23.1' >/dev/null
fi

# Apache Kafka: the broker every Kafka test runs against.
if [ -z "${DWH_TEST_KAFKA_BOOTSTRAP:-}" ]; then
  kafka_dir=$(mktemp -d /tmp/dwh-helper-kafka.XXXXXX)
  scripts/kafka.sh "$kafka_dir" >/dev/null
  # shellcheck disable=SC1091
  . "$kafka_dir/env"
  echo "scripts/test.sh: Apache Kafka $DWH_TEST_KAFKA_VERSION on $DWH_TEST_KAFKA_BOOTSTRAP (SASL $DWH_TEST_KAFKA_SASL_BOOTSTRAP, SASL_SSL $DWH_TEST_KAFKA_SSL_BOOTSTRAP)"
fi

cargo test --locked "$@"
