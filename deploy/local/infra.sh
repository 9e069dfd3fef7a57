#!/usr/bin/env bash
# Makes PostgreSQL, RabbitMQ and Redis answer at the configured URLs.
#
# Each one that already answers is used as it is. One that does not, on this
# machine (127.0.0.1 or localhost), is started; on Debian/Ubuntu it is first
# installed from the distribution's packages when missing. Then we wait until
# all three are ready. Nothing here touches a server on another host.
set -euo pipefail

POSTGRES_URL=${MONETA_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
AMQP_URL=${MONETA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}
REDIS_URL=${MONETA_REDIS_URL:-redis://127.0.0.1:6379/0}

say() { printf 'infra: %s\n' "$*" >&2; }
sudo_cmd() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# host and port of a URL like scheme://user:pass@host:port/path
url_host() { local h=${1#*://}; h=${h#*@}; h=${h%%/*}; h=${h%%\?*}; echo "${h%%:*}"; }
url_port() {
  local h=${1#*://}; h=${h#*@}; h=${h%%/*}; h=${h%%\?*}
  if [[ $h == *:* ]]; then echo "${h##*:}"; else echo "$2"; fi
}
is_local() { [[ $1 == 127.0.0.1 || $1 == localhost || $1 == ::1 ]]; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # description, seconds, command...
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then say "$what did not become ready in ${seconds}s"; return 1; fi
    sleep 0.5
  done
}

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || { say "cannot install $* here: no apt-get; start it yourself"; exit 1; }
  if [ -z "$apt_updated" ]; then sudo_cmd apt-get update -qq; apt_updated=1; fi
  say "installing $*"
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

postgres_ready() {
  if command -v pg_isready >/dev/null; then pg_isready -q -d "$POSTGRES_URL"; else port_open "$1" "$2"; fi
}

ensure_postgres() {
  local host port; host=$(url_host "$POSTGRES_URL"); port=$(url_port "$POSTGRES_URL" 5432)
  if postgres_ready "$host" "$port"; then say "postgresql answers at $host:$port"; return; fi
  is_local "$host" || { say "postgresql at $host:$port does not answer"; exit 1; }
  local fresh=""
  if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql; fresh=1; fi
  local version; version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ -n "$fresh" ]; then
    # A cluster installed here is a development database: trust local
    # connections, as the default URL (no password) expects.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sudo_cmd sed -i -E 's/^(local|host)(\s+all\s+all\s+.*)\s(peer|md5|scram-sha-256)$/\1\2 trust/' "$hba"
    sudo_cmd sed -i -E 's/^(local\s+all\s+postgres\s+)peer$/\1trust/' "$hba"
  fi
  say "starting postgresql $version"
  sudo_cmd pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for postgresql 60 postgres_ready "$host" "$port"
}

redis_ready() {
  if command -v redis-cli >/dev/null; then [ "$(redis-cli -u "$REDIS_URL" ping 2>/dev/null)" = PONG ]; else port_open "$1" "$2"; fi
}

ensure_redis() {
  local host port; host=$(url_host "$REDIS_URL"); port=$(url_port "$REDIS_URL" 6379)
  if redis_ready "$host" "$port"; then say "redis answers at $host:$port"; return; fi
  is_local "$host" || { say "redis at $host:$port does not answer"; exit 1; }
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting redis on port $port"
  mkdir -p /tmp/moneta-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir /tmp/moneta-redis --logfile /tmp/moneta-redis/redis.log
  wait_for redis 30 redis_ready "$host" "$port"
}

ensure_rabbitmq() {
  local host port; host=$(url_host "$AMQP_URL"); port=$(url_port "$AMQP_URL" 5672)
  if port_open "$host" "$port"; then say "rabbitmq answers at $host:$port"; return; fi
  is_local "$host" || { say "rabbitmq at $host:$port does not answer"; exit 1; }
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting rabbitmq"
  sudo_cmd rabbitmq-server -detached || true
  wait_for rabbitmq 180 port_open "$host" "$port"
  command -v rabbitmqctl >/dev/null && sudo_cmd rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
}

ensure_postgres
ensure_redis
ensure_rabbitmq
