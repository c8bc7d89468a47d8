#!/usr/bin/env bash
# Shared set-up for the demo and the tests, safe to run again and again:
# installs Redis and Postgres with apt-get only when they are missing, starts them
# only when they are not answering, and makes sure role `root` can log in over
# 127.0.0.1 without a password (the default DATABASE_URL relies on it).
# Sourced by .ci/demo and .ci/run.
set -euo pipefail

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
# redis-cli: the ping below, and `redis-cli --cluster create` in the cluster test.
command -v redis-cli >/dev/null 2>&1 || need_pkgs+=(redis-tools)
command -v pg_ctlcluster >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v psql >/dev/null 2>&1 || need_pkgs+=(postgresql-client)
# The fault suite signals processes with kill(1) and runs Postgres as `postgres`.
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need_pkgs+=(procps)
command -v runuser >/dev/null 2>&1 || need_pkgs+=(util-linux)
# Some crates build C (rustup does not bring a C toolchain).
command -v cc >/dev/null 2>&1 || need_pkgs+=(gcc libc6-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]} with apt-get"
    as_root apt-get update -qq
    # env, not a prefix assignment: sudo's env_reset would drop it.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { log "cargo not found: install Rust (rustup) first"; exit 1; }

# Redis. redis-cli exits 0 on error replies too, so look for PONG itself.
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
if ! redis_up; then
    log "starting redis-server on 127.0.0.1:6379 (.ci/redis.conf: append-only file, fsync always)"
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server "$(pwd)/.ci/redis.conf" --daemonize yes --bind 127.0.0.1 --port 6379 \
        --dir /var/lib/redis --logfile /var/log/redis/tickgraph.log --save ""
    for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up || { log "redis is not answering PONG on 127.0.0.1:6379"; exit 1; }

# Postgres
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$ver" ]; then
        ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
        log "creating Postgres $ver cluster"
        as_root pg_createcluster "$ver" main >/dev/null
    fi
    log "starting Postgres $ver"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 100); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1 -p 5432 -q || { log "postgres did not start"; exit 1; }

if ! psql -h 127.0.0.1 -U root -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
    log "granting role root trust access on 127.0.0.1"
    as_root runuser -u postgres -- psql -Atqc \
        "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END \$\$;"
    hba=$(as_root runuser -u postgres -- psql -Atqc 'show hba_file')
    if ! as_root grep -q '^host all root 127.0.0.1/32 trust' "$hba"; then
        as_root sed -i '1i host all root 127.0.0.1/32 trust\nhost all root ::1/128 trust' "$hba"
    fi
    as_root runuser -u postgres -- psql -Atqc 'select pg_reload_conf()' >/dev/null
    sleep 0.5
fi
psql -h 127.0.0.1 -U root -d postgres -Atqc 'select 1' >/dev/null || { log "cannot log in to Postgres as root"; exit 1; }
log "redis and postgres are up"

# The live page's browser test (tests/browser): Debian's chromium driven by
# playwright-core from npm. Playwright must not download a browser of its own.
browser_pkgs=()
[ -x /usr/bin/chromium ] || browser_pkgs+=(chromium)
command -v node >/dev/null 2>&1 || browser_pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || browser_pkgs+=(npm)
if [ ${#browser_pkgs[@]} -gt 0 ]; then
    log "installing ${browser_pkgs[*]} with apt-get (browser test)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${browser_pkgs[@]}" >/dev/null
fi
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
    || log "warning: playwright-core needs Node.js 20 or later, this is $(node --version)"
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    log "installing playwright-core for tests/browser (npm ci)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
fi
