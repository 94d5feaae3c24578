#!/usr/bin/env bash
# Starts and stops Pulse's backing services — Kafka API (Tansu, sqlite storage),
# ClickHouse and S3 (s3s-fs), and the monitoring pair Prometheus and Alertmanager
# (Debian's packages) — as plain processes under one state folder:
#   $STATE/{kafka,clickhouse,s3,prometheus,alertmanager}/   data
#   $STATE/logs/*.log               logs
#   $STATE/pids/*.pid               what `stack_stop` stops, and nothing else
# Sourced by dev.sh and test.sh, never executed.

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

S3_BUCKET="${PULSE_S3_BUCKET:-pulse}"
S3_ACCESS_KEY="${PULSE_S3_ACCESS_KEY:-pulse-dev-access}"
S3_SECRET_KEY="${PULSE_S3_SECRET_KEY:-pulse-dev-secret}"

# start_proc STATE NAME CMD... — starts CMD in its own session, logs to $STATE/logs/NAME.log.
start_proc() {
  local state=$1 name=$2; shift 2
  mkdir -p "$state/logs" "$state/pids"
  if is_running "$state" "$name"; then
    log "$name already running (pid $(cat "$state/pids/$name.pid"))"
    return 0
  fi
  setsid nohup "$@" >>"$state/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/pids/$name.pid"
}

# is_running STATE NAME — the recorded pid is alive.
is_running() {
  local pidfile="$1/pids/$2.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# stop_proc STATE NAME — SIGTERM, wait up to 20 s, then SIGKILL; removes the pid file.
stop_proc() {
  local state=$1 name=$2 pidfile="$1/pids/$2.pid" pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop in 20 s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

# start_kafka STATE PORT
start_kafka() {
  local state=$1 port=$2
  mkdir -p "$state/kafka"
  # Tansu reads sqlite://PATH relative to its working directory (it drops a leading /),
  # so it runs inside its data folder.
  start_proc "$state" kafka env -C "$state/kafka" tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite://tansu.db"
  wait_port 127.0.0.1 "$port" "Kafka API (Tansu)" 60 || die "Tansu did not open port $port; see $state/logs/kafka.log"
  index_tansu_headers "$state/kafka/tansu.db"
}

# index_tansu_headers DB — Tansu 0.6's sqlite schema has no index on header(topition,
# offset_id), so fetching each record scans every header of every topic: a consumer
# catching up on ~10k records with headers stalls the broker for minutes (measured; see
# README, Local stack). The index makes it ~2 s for 30k. Idempotent; the table exists once
# Tansu listens.
index_tansu_headers() {
  python3 - "$1" <<'PY' || die "could not index Tansu's header table in $1"
import sqlite3, sys, time
for attempt in range(50):
    try:
        db = sqlite3.connect(sys.argv[1], timeout=30)
        db.execute("create index if not exists pulse_header_record on header (topition, offset_id)")
        db.commit()
        sys.exit(0)
    except sqlite3.OperationalError as e:
        if attempt == 49:
            raise
        time.sleep(0.2)
PY
}

# start_clickhouse STATE HTTP_PORT TCP_PORT — writes a config for ClickHouse 18.16+.
start_clickhouse() {
  local state=$1 http_port=$2 tcp_port=$3 dir="$1/clickhouse"
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$state/logs"
  cat > "$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger>
    <level>warning</level>
    <log>$state/logs/clickhouse-server.log</log>
    <errorlog>$state/logs/clickhouse-server.err.log</errorlog>
    <size>100M</size>
    <count>2</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$http_port</http_port>
  <tcp_port>$tcp_port</tcp_port>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <format_schema_path>$dir/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
XML
  cat > "$dir/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
  start_proc "$state" clickhouse clickhouse-server --config-file="$dir/config.xml"
  local i
  for i in $(seq 1 120); do
    if [ "$(curl -s "http://127.0.0.1:$http_port/ping" 2>/dev/null)" = "Ok." ]; then
      log "ClickHouse answers on 127.0.0.1:$http_port"
      return 0
    fi
    is_running "$state" clickhouse || die "ClickHouse exited; see $state/logs/clickhouse*.log"
    sleep 0.5
  done
  die "ClickHouse did not answer on $http_port within 60 s; see $state/logs/clickhouse*.log"
}

# start_s3 STATE PORT — s3s-fs serving $STATE/s3, with the bucket created.
start_s3() {
  local state=$1 port=$2
  mkdir -p "$state/s3/$S3_BUCKET"
  start_proc "$state" s3 s3s-fs --host 127.0.0.1 --port "$port" \
    --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$state/s3"
  wait_port 127.0.0.1 "$port" "S3 (s3s-fs)" 30 || die "s3s-fs did not open port $port; see $state/logs/s3.log"
}

# start_prometheus STATE PORT CONFIG_FILE — Debian's Prometheus (our own process, never the
# package's systemd unit) on 127.0.0.1:PORT with its TSDB in $STATE/prometheus; waits until
# /-/ready answers. --web.enable-lifecycle lets a caller reload rules (POST /-/reload).
start_prometheus() {
  local state=$1 port=$2 config=$3 i
  [ -f "$config" ] || die "Prometheus config $config not found"
  mkdir -p "$state/prometheus"
  start_proc "$state" prometheus prometheus \
    --config.file="$config" \
    --storage.tsdb.path="$state/prometheus" \
    --storage.tsdb.retention.time=7d \
    --web.listen-address="127.0.0.1:$port" \
    --web.enable-lifecycle
  for i in $(seq 1 120); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/-/ready")" = 200 ]; then
      log "Prometheus answers on http://127.0.0.1:$port"
      return 0
    fi
    is_running "$state" prometheus || die "Prometheus exited; see $state/logs/prometheus.log"
    sleep 0.5
  done
  die "Prometheus not ready on $port within 60 s; see $state/logs/prometheus.log"
}

# start_alertmanager STATE PORT CONFIG_FILE — Debian's Alertmanager (our own process) on
# 127.0.0.1:PORT, data in $STATE/alertmanager, clustering off (it would bind 9094).
start_alertmanager() {
  local state=$1 port=$2 config=$3 i
  [ -f "$config" ] || die "Alertmanager config $config not found"
  mkdir -p "$state/alertmanager"
  start_proc "$state" alertmanager prometheus-alertmanager \
    --config.file="$config" \
    --storage.path="$state/alertmanager" \
    --web.listen-address="127.0.0.1:$port" \
    --cluster.listen-address=
  for i in $(seq 1 60); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/-/ready")" = 200 ]; then
      log "Alertmanager answers on http://127.0.0.1:$port"
      return 0
    fi
    is_running "$state" alertmanager || die "Alertmanager exited; see $state/logs/alertmanager.log"
    sleep 0.5
  done
  die "Alertmanager not ready on $port within 30 s; see $state/logs/alertmanager.log"
}

stack_stop() {
  local state=$1 name
  for name in "${@:2}"; do stop_proc "$state" "$name"; done
}

# --- the local broker's supervisor (local-stack behaviour, not Pulse behaviour) ---------
# Tansu 0.6 (the local broker) can end up alive but useless: its storage task panics after
# a long stall and it then fails every request, or its group coordinator keeps a group
# waiting for a leader that is no longer a member (after a stall longer than the session
# timeout; every JoinGroup/SyncGroup then answers RebalanceInProgress). Tansu repairs the
# second when it reloads the group from its database, i.e. on a restart. In Kubernetes a
# liveness probe restarts such a broker; locally `start_kafka_supervisor` does the same:
# every PULSE_KAFKA_SUPERVISOR_INTERVAL seconds (default 3) it probes the broker the way
# `dev.sh status` does, and after PULSE_KAFKA_SUPERVISOR_FAILURES (default 3) failed probes
# in a row it restarts Tansu with its own command line, folder and environment, then waits
# PULSE_KAFKA_SUPERVISOR_GRACE seconds (default 6) before the next probe (logged to
# $STATE/logs/kafka-supervisor.log). A stopped broker (SIGSTOP) is not probed, a broker that
# is not running is left alone (`dev.sh up` starts it). PULSE_KAFKA_SUPERVISOR=0: none.

# The probe and the supervisor loop, in the cache's venv (PyPI's confluent-kafka).
#   probe PORT DB        prints "ok" or why the broker is unhealthy
#   supervise STATE PORT the loop; exits when its pid file is gone or names another process
KAFKA_SUPERVISOR_PY=$(cat <<'PY'
import json, os, signal, sqlite3, subprocess, sys, time

def produce_check(port):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    bootstrap = f"127.0.0.1:{port}"
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        if "_pulse_health" not in admin.list_topics(timeout=5).topics:
            for f in admin.create_topics([NewTopic("_pulse_health", 1, 1)]).values():
                try:
                    f.result(5)
                except Exception as e:  # created meanwhile by another probe
                    if "TOPIC_ALREADY_EXISTS" not in str(e):
                        raise
        outcome = []
        p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 5000,
                      "socket.timeout.ms": 5000, "log_level": 0})
        p.produce("_pulse_health", b"ping", on_delivery=lambda err, msg: outcome.append(err))
        p.flush(8)
    except Exception as e:
        return f"request failed: {e}"
    if not outcome:
        return "produce not acknowledged within 5 s"
    return "ok" if outcome[0] is None else f"produce failed: {outcome[0]}"

def wedged_groups(db):
    """Tansu 0.6's group coordinator (its sqlite database): {group: (e_tag, why)} of every
    forming group whose leader is no longer a member; such a group never completes, and
    only a reload of the group (a restart) clears that leader."""
    if not os.path.exists(db):
        return {}
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = c.execute("select cg.name, d.e_tag, d.detail from consumer_group_detail d "
                             "join consumer_group cg on cg.id = d.consumer_group").fetchall()
        finally:
            c.close()
    except sqlite3.Error:
        return {}  # locked or not created yet: no evidence either way
    wedged = {}
    for name, e_tag, detail in rows:
        try:
            d = json.loads(detail)
        except ValueError:
            continue
        forming = (d.get("state") or {}).get("Forming")
        members = d.get("members") or {}
        if forming and forming.get("leader") and members and forming["leader"] not in members:
            wedged[name] = (e_tag, f"{name} (leader {forming['leader']} is not a member)")
    return wedged

def groups_why(wedged):
    if not wedged:
        return "ok"
    return ("group coordinator stuck: " + ", ".join(why for _, why in wedged.values())
            + " (Tansu 0.6; a restart repairs it)")

def probe(port, db):
    why = produce_check(port)
    return why if why != "ok" else groups_why(wedged_groups(db))

def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None

def supervise(state, port):
    interval = float(os.environ.get("PULSE_KAFKA_SUPERVISOR_INTERVAL", "3"))
    threshold = int(os.environ.get("PULSE_KAFKA_SUPERVISOR_FAILURES", "3"))
    pids, me = os.path.join(state, "pids"), os.getpid()
    kafka_pid_file = os.path.join(pids, "kafka.pid")
    db = os.path.join(state, "kafka", "tansu.db")
    # After starting a broker: no probe for this long (a liveness probe's initial delay),
    # so the clients reconnect and the stored groups are reloaded first.
    grace = float(os.environ.get("PULSE_KAFKA_SUPERVISOR_GRACE", "6"))
    children, spec, failures, last_tags, quiet_until = [], None, 0, {}, 0.0
    marker = os.path.join(pids, "kafka.restarting")
    if os.path.exists(marker):
        os.unlink(marker)  # left by a supervisor stopped in the middle of a restart

    def say(msg):
        print(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), msg, flush=True)

    say(f"supervising the broker on port {port}: probe every {interval:g} s, restart after {threshold} failures in a row")
    while True:
        time.sleep(interval)
        for ch in children:
            ch.poll()  # reap a broker this loop started and that exited
        try:
            with open(os.path.join(pids, "kafka-supervisor.pid")) as f:
                if int(f.read().strip()) != me:
                    return
            with open(kafka_pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return  # stopped (`dev.sh down` removes the pid files)
        st = proc_state(pid)
        if st is None or st == "Z" or st == "T":
            failures = 0  # not running (dev.sh starts it) or paused on purpose: not probed
            continue
        if spec is None or spec[0] != pid:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = [a.decode() for a in f.read().split(b"\0") if a]
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                spec = (pid, argv, env, os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                continue
        if time.monotonic() < quiet_until:
            continue
        why = produce_check(port)
        if why == "ok":
            # A stuck group counts once its stored state changed while it stayed stuck (its
            # members keep joining and expiring, and the leader stays one that left): a
            # restarted broker shows the stored state until a request of the group
            # reloads it, and a group nobody uses may keep a stale leader harmlessly.
            wedged = wedged_groups(db)
            last_tags = {g: last_tags.get(g, v[0]) for g, v in wedged.items()}
            active = {g: v for g, v in wedged.items() if last_tags[g] != v[0]}
            why = groups_why(active)
        if why == "ok":
            if failures:
                say(f"broker healthy again after {failures} failed probe(s)")
            failures = 0
            continue
        failures += 1
        say(f"probe {failures}/{threshold} failed: {why}")
        if failures < threshold:
            continue
        say(f"restarting the broker (pid {pid}) as a liveness probe would")
        # While this marker exists the broker's pid file names a process being replaced:
        # a harness that restarts exited processes (tests/python/chaos.py) leaves it alone.
        with open(marker, "w") as f:
            f.write(f"{me}\n")
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        for _ in range(40):
            if proc_state(pid) in (None, "Z"):
                break
            time.sleep(0.5)
        else:
            say("the broker did not stop in 20 s; killing it")
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            for _ in range(20):
                if proc_state(pid) in (None, "Z"):
                    break
                time.sleep(0.25)
        for ch in children:
            ch.poll()
        _, argv, env, cwd = spec
        with open(os.path.join(state, "logs", "kafka.log"), "ab") as log:
            ch = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        children.append(ch)
        with open(kafka_pid_file + ".new", "w") as f:
            f.write(f"{ch.pid}\n")
        os.replace(kafka_pid_file + ".new", kafka_pid_file)
        os.unlink(marker)
        say(f"broker restarted (pid {ch.pid})")
        failures, spec, last_tags = 0, None, {}
        quiet_until = time.monotonic() + grace

if sys.argv[1] == "probe":
    print(probe(sys.argv[2], sys.argv[3]))
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    supervise(sys.argv[2], sys.argv[3])
PY
)

# kafka_probe PORT DB: "ok", or why the broker fails (see KAFKA_SUPERVISOR_PY).
kafka_probe() {
  timeout 20 "$PULSE_CACHE/venv/bin/python" -c "$KAFKA_SUPERVISOR_PY" probe "$1" "$2" 2>/dev/null \
    || echo "no answer within 20 s"
}

# start_kafka_supervisor STATE PORT — the loop above, as process "kafka-supervisor".
start_kafka_supervisor() {
  local state=$1 port=$2
  [ "${PULSE_KAFKA_SUPERVISOR:-1}" = 1 ] || return 0
  start_proc "$state" kafka-supervisor "$PULSE_CACHE/venv/bin/python" -c "$KAFKA_SUPERVISOR_PY" supervise "$state" "$port"
  log "broker supervisor started (restarts a broker that fails ${PULSE_KAFKA_SUPERVISOR_FAILURES:-3} probes in a row; log: $state/logs/kafka-supervisor.log)"
}
