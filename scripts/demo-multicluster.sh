#!/usr/bin/env bash
# The Trellis multi-cluster demo (scripts/demo.sh --multicluster runs this):
#   builds the workspace, installs Envoy 1.40, starts the mesh control plane (MCPC) on a copy
#   of examples-multicluster/ (mesh settings, services), makes a one-time join token per
#   member cluster, starts relay a and relay b (each watching its cluster's registry folder
#   of WorkloadEntries), and an echo app and an Envoy sidecar per workload, each proving its
#   identity to its relay with a bootstrap token and getting config and certificate from it.
#   Then: the member clusters, each relay's upstream streams vs its sidecars, a call from
#   cluster a to a service only in cluster b (mTLS: who answered, who the callee saw),
#   local preference, failover when a's endpoint leaves a's registry, and the MCPC killed
#   under traffic: failed requests counted, a new sidecar served by its relay, relays reconnecting;
#   and a root rotation of the MCPC's CA under traffic, followed by both relays and their sidecars.
# Everything it starts is stopped on exit or Ctrl-C.
#   scripts/demo.sh --multicluster           run the demo and exit
#   scripts/demo.sh --multicluster --stay    keep the mesh running afterwards until Ctrl-C
# Addresses (127.0.0.0/8 only, apart from the single-cluster demo's): the MCPC on
# 127.0.0.1:16010 (xDS), :16012 (secure), :16014 (admin); relay a on 127.0.20.1 and relay b
# on 127.0.30.1 (same three ports); cluster a's workloads on 127.0.21-23.x, b's on 127.0.31-33.x.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"
STAY=0
for arg in "$@"; do
    case "${arg}" in
        --multicluster) ;;
        --stay) STAY=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "demo: unknown argument ${arg}" >&2; exit 2 ;;
    esac
done

MCPC_IP=127.0.0.1
MCPC_XDS="${MCPC_IP}:16010"
MCPC_SECURE="${MCPC_IP}:16012"
MCPC_ADMIN="${MCPC_IP}:16014"
declare -A RELAY_IP=([a]=127.0.20.1 [b]=127.0.30.1)
# Each member cluster's locality, carried by its join token.
declare -A REGION=([a]=eu-west [b]=eu-central)
declare -A ZONE=([a]=eu-west-1a [b]=eu-central-1a)
# Started later, while the MCPC is down (its WorkloadEntry is registered from the start).
DEFERRED=productpage-a2
# Run with two sidecars (replicas of one workload: one proxy class at its relay).
REPLICATED=ratings-b
# These speak Delta xDS to their relay, the others state of the world.
DELTA=" reviews-a ratings-b "

RUN_DIR="$(mktemp -d -t trellis-mc-demo.XXXXXX)"
PIDS=()
# Processes the Python part starts (the restarted MCPC, the deferred sidecar) add their ids here.
PID_FILE="${RUN_DIR}/pids"
: >"${PID_FILE}"

# shellcheck source=scripts/demo-lib.sh
source "${REPO_ROOT}/scripts/demo-lib.sh"
now_ms() { date +%s%3N; }
fail() { echo "demo: $*" >&2; exit 1; }
# wait_for WHAT PID LOG CMD...: polls CMD every 0.1 s for at most 30 s; fails if PID exits.
wait_for() {
    local what="$1" pid="$2" log="$3"; shift 3
    for _ in $(seq 300); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "${pid}" 2>/dev/null; then
            echo "demo: ${what}: the process exited; log tail:" >&2; tail -5 "${log}" >&2; exit 1
        fi
        sleep 0.1
    done
    fail "timed out waiting for ${what}; log tail: $(tail -3 "${log}")"
}
ready() { curl -fsS "http://$1/healthz/ready"; }

step "build"
cargo build --workspace --bins --quiet
BIN="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}/debug"

step "install Envoy"
ENVOY="$(scripts/install-envoy.sh)"
"${ENVOY}" --version | head -1 || true

CONFIG="${RUN_DIR}/config"
CA_DIR="${RUN_DIR}/ca"
step "start the MCPC on a copy of examples-multicluster/ (mesh.yaml, services.yaml)"
mkdir -p "${CONFIG}" "${RUN_DIR}/tokens"
cp examples-multicluster/mesh.yaml examples-multicluster/services.yaml "${CONFIG}/"
MCPC_CMD=("${BIN}/xds-server" serve --config-dir "${CONFIG}" --xds-addr "${MCPC_XDS}"
    --secure-addr "${MCPC_SECURE}" --admin-addr "${MCPC_ADMIN}" --ca-dir "${CA_DIR}")
T0="$(now_ms)"
"${MCPC_CMD[@]}" >"${RUN_DIR}/mcpc-1.log" 2>&1 &
MCPC_PID=$!
disown "${MCPC_PID}"  # the demo SIGKILLs it: no job notice for that
PIDS+=("${MCPC_PID}")
wait_for "the MCPC" "${MCPC_PID}" "${RUN_DIR}/mcpc-1.log" \
    bash -c "curl -fsS http://${MCPC_ADMIN}/healthz/ready && test -f ${CA_DIR}/trust-bundle.pem"
echo "  ready in $(( $(now_ms) - T0 )) ms: xDS ${MCPC_XDS}, secure ${MCPC_SECURE}, admin http://${MCPC_ADMIN}"
echo "  (no workloads of its own: only the relays connect to it)"

step "join tokens and relays: relay a on ${RELAY_IP[a]}, relay b on ${RELAY_IP[b]}"
for c in a b; do
    mkdir -p "${RUN_DIR}/registry-${c}"
    cp examples-multicluster/cluster-"${c}"/*.yaml "${RUN_DIR}/registry-${c}/"
    # One-time token: the relay trades it for its certificate (identity relay-${c}).
    "${BIN}/xds-server" cluster join-token --cluster "${c}" --region "${REGION[$c]}" --zone "${ZONE[$c]}" \
        --ttl 1h --config-dir "${CONFIG}" --ca-dir "${CA_DIR}" \
        >"${RUN_DIR}/tokens/join-${c}" 2>"${RUN_DIR}/tokens/join-${c}.note"
    T0="$(now_ms)"
    "${BIN}/relay" run --cluster "${c}" --upstream "${MCPC_SECURE}" \
        --trust-bundle "${CA_DIR}/trust-bundle.pem" --join-token "${RUN_DIR}/tokens/join-${c}" \
        --listen "${RELAY_IP[$c]}:16010" --secure-listen "${RELAY_IP[$c]}:16012" \
        --admin-addr "${RELAY_IP[$c]}:16014" --registry-dir "${RUN_DIR}/registry-${c}" \
        --state-dir "${RUN_DIR}/relay-${c}" >"${RUN_DIR}/relay-${c}.log" 2>&1 &
    PIDS+=($!)
    wait_for "relay ${c}" "$!" "${RUN_DIR}/relay-${c}.log" ready "${RELAY_IP[$c]}:16014"
    echo "  relay ${c}: joined with its one-time token and ready in $(( $(now_ms) - T0 )) ms" \
        "(xDS :16010, secure :16012, admin http://${RELAY_IP[$c]}:16014/debug/relay;" \
        "registry ${RUN_DIR}/registry-${c}, $(find "${RUN_DIR}/registry-${c}" -name '*.yaml' | wc -l) WorkloadEntries)"
done

# The member clusters' WorkloadEntries: cluster, name, inbound, app and outbound address, service account.
mapfile -t WORKLOADS < <(python3 - "${RUN_DIR}" <<'PY'
import re, sys, pathlib
for c in ("a", "b"):
    for f in sorted(pathlib.Path(sys.argv[1], f"registry-{c}").glob("*.yaml")):
        t = f.read_text()
        g = lambda p: re.search(p, t, re.M).group(1)
        print(c, g(r"^  name: (\S+)"), g(r"^  address: (\S+)"), g(r"app-address: (\S+)"),
              g(r"outbound-address: (\S+)"), g(r"serviceAccount: (\S+)"))
PY
)

step "bootstrap tokens and Envoy sidecars (each against its cluster's relay's secure port)"
T_SIDECARS="$(now_ms)"
STARTED=()
for line in "${WORKLOADS[@]}"; do
    read -r c name inbound app outbound sa <<<"${line}"
    # The sidecar proves its identity (its service account) to the relay with a bootstrap
    # token, made with the MCPC's CA; the relay checks it with the MCPC's token key.
    "${BIN}/xds-server" token create --identity "default/${sa}" --ttl 24h --config-dir "${CONFIG}" \
        --ca-dir "${CA_DIR}" >"${RUN_DIR}/tokens/${name}.token"
    mode=()
    if [[ "${DELTA}" == *" ${name} "* ]]; then mode=(--delta); fi
    replicas=1
    if [[ "${name}" == "${REPLICATED}" ]]; then replicas=2; fi
    for r in $(seq "${replicas}"); do
        suffix=""
        if (( r > 1 )); then suffix="-${r}"; fi
        "${BIN}/xds-server" bootstrap --workload "${name}.default" --config-dir "${RUN_DIR}/registry-${c}" \
            --cluster "${c}" --token-file "${RUN_DIR}/tokens/${name}.token" \
            --secure-addr "${RELAY_IP[$c]}:16012" --ca-dir "${RUN_DIR}/relay-${c}" --via-relay "${c}" \
            --trust-domain cluster.local --admin-port "$(( 14999 + r ))" "${mode[@]}" \
            >"${RUN_DIR}/${name}${suffix}.bootstrap.yaml"
    done
    if [[ "${name}" == "${DEFERRED}" ]]; then
        echo "  ${name} (cluster ${c}): registered, token and bootstrap made; started later, while the MCPC is down"
        continue
    fi
    "${BIN}/echo" --listen "${app}:9080" --name "${name}" --version v1 >"${RUN_DIR}/echo-${name}.log" 2>&1 &
    PIDS+=($!)
    echo "echo-${name} $!" >>"${RUN_DIR}/procs"
    for r in $(seq "${replicas}"); do
        suffix=""
        if (( r > 1 )); then suffix="-${r}"; fi
        "${ENVOY}" -c "${RUN_DIR}/${name}${suffix}.bootstrap.yaml" --disable-hot-restart --concurrency 1 \
            --drain-strategy immediate --drain-time-s 45 --log-level warning \
            >"${RUN_DIR}/envoy-${name}${suffix}.log" 2>&1 &
        PIDS+=($!)
        echo "envoy-${name}${suffix} $!" >>"${RUN_DIR}/procs"
        STARTED+=("${c}:${name}")
    done
    how="${mode[*]:-sotw}"
    if (( replicas > 1 )); then how="${how}, two sidecars (replicas of one workload)"; fi
    echo "  ${name} (cluster ${c}): identity default/${sa}, inbound ${inbound}:9080, app ${app}:9080," \
        "outbound ${outbound}:9080, ${how#--}"
done

python3 -u - <<'PY' "${RUN_DIR}" "${BIN}" "${ENVOY}" "${MCPC_ADMIN}" "${MCPC_PID}" "${T_SIDECARS}" \
    "${DEFERRED}" "${STARTED[*]}" "${MCPC_CMD[@]}"
import collections, http.client, json, os, signal, subprocess, sys, threading, time

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C: no traceback; the shell cleans up

run_dir, bin_dir, envoy, mcpc_admin, mcpc_pid, t_sidecars, deferred, started = sys.argv[1:9]
mcpc_cmd = sys.argv[9:]
mcpc_pid, t_sidecars = int(mcpc_pid), int(t_sidecars) / 1000
RELAY_ADMIN = {"a": "127.0.20.1:16014", "b": "127.0.30.1:16014"}
PORT = 9080
CONVERGE, RECONNECT = 90, 120  # seconds; relays retry with backoff capped at 30 s

# The workloads, from the registry folders: cluster, inbound, app, outbound, service account.
W = {}
for c in ("a", "b"):
    for f in sorted(os.listdir(f"{run_dir}/registry-{c}")):
        text = open(f"{run_dir}/registry-{c}/{f}").read()
        field = lambda k: next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.strip().startswith(k + ":"))
        W[field("name")] = dict(cluster=c, file=f, inbound=field("address"), outbound=field("sidecar.trellis.dev/outbound-address"),
                                app=field("sidecar.trellis.dev/app-address"), sa=field("serviceAccount"))
# Processes the shell started, by name (envoy-W, echo-W).
PROCS = dict(l.split() for l in open(f"{run_dir}/procs"))
# Sidecars running, per cluster (a replicated workload counts twice).
SIDECARS = collections.Counter(s.split(":")[0] for s in started.split())

def spawn(cmd, log):
    p = subprocess.Popen(cmd, stdout=open(f"{run_dir}/{log}", "w"), stderr=subprocess.STDOUT)
    with open(f"{run_dir}/pids", "a") as f:
        f.write(f"{p.pid}\n")
    return p

def get_json(addr, path, timeout=2):
    c = http.client.HTTPConnection(addr, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"{addr}{path}: {r.status}")
        return json.loads(body)
    finally:
        c.close()

def ready(addr):
    c = http.client.HTTPConnection(addr, timeout=1)
    try:
        c.request("GET", "/healthz/ready")
        return c.getresponse().status == 200
    finally:
        c.close()

def call(client, host, timeout=3):
    """One request from workload `client`'s app through its sidecar: (status, body or error)."""
    c = http.client.HTTPConnection(W[client]["outbound"], PORT, timeout=timeout)
    try:
        c.request("GET", "/", headers={"Host": host})
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            return r.status, body.decode(errors="replace")[:200]
        return 200, json.loads(body)
    except Exception as e:
        return type(e).__name__, str(e)
    finally:
        c.close()

def who(client, host):
    status, body = call(client, host)
    if status != 200:
        raise RuntimeError(f"{client} -> {host}: {status} {body}")
    return body["workload"]

def wait(cond, what, timeout=CONVERGE, interval=0.1):
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:
            last = e
        time.sleep(interval)
    sys.exit(f"demo: timed out after {timeout} s waiting for {what} (last: {last})")

def relay(c, path="/debug/relay"):
    return get_json(RELAY_ADMIN[c], path)

def relay_proxies(c):
    return relay(c, "/debug/syncz")["proxies"]

def relay_converged(c, n, registry_acked=True):
    """n sidecars connected to relay c, all synced and holding a certificate; and (unless the
    MCPC is down) the relay's latest registry report accepted."""
    ps = relay_proxies(c)
    ok = len(ps) == n and all(p["synced"] and (p.get("secrets") or {}).get("cert_serial") for p in ps)
    reg = relay(c)["registry"]
    return ok and (not registry_acked or reg.get("acked_revision") == reg.get("revision") and not reg.get("errors"))

def xfcc_uri(body):
    xfcc = body["headers"].get("x-forwarded-client-cert", "")
    return next((f[4:].strip('"') for f in xfcc.replace(",", ";").split(";") if f.startswith("URI=")), "(none)")

def tally(client, host, n):
    c = collections.Counter(who(client, host) for _ in range(n))
    return ", ".join(f"{w}: {k}" for w, k in sorted(c.items()))

def hosts(client, service):
    """The endpoints of `service` in `client`'s Envoy: inbound address -> (priority, locality, health)."""
    addr = f"{W[client]['outbound']}:15000"
    name = f"outbound|{PORT}||{service}.default.svc.cluster.local"
    cl = next((c for c in get_json(addr, "/clusters?format=json")["cluster_statuses"] if c["name"] == name), {})
    out = {}
    for h in cl.get("host_statuses", []):
        loc = h.get("locality", {})
        out[h["address"]["socket_address"]["address"]] = (h.get("priority", 0),
            "/".join(loc.get(k, "") for k in ("region", "zone", "sub_zone")), h.get("health_status", {}))
    return out

def by_ip(ip):
    return next((n for n, w in W.items() if w["inbound"] == ip), ip)

print("\n==> waiting for every sidecar to be synced through its relay, with its certificate")
for c in ("a", "b"):
    wait(lambda: relay_converged(c, SIDECARS[c]), f"relay {c}'s sidecars synced")
wait(lambda: who("productpage-a", "ratings") and who("productpage-a", "reviews"), "traffic through the sidecars")
print(f"  {sum(SIDECARS.values())} sidecars synced and serving {time.time() - t_sidecars:.1f} s after the first was started")

print(f"\n==> member clusters: the MCPC's http://{mcpc_admin}/debug/clusters")
def members():
    return get_json(mcpc_admin, "/debug/clusters")
def reported(m):
    """The sidecars a member cluster's relay reported to the MCPC."""
    ps = m.get("proxies") or []
    return f"{len(ps)} sidecars reported by its relay" + (": " + ", ".join(
        f"{(p.get('workload') or p.get('id', '?')).split('.')[0]} ({p.get('mode')}{', synced' if p.get('synced') else ''})"
        for p in sorted(ps, key=lambda p: p.get("workload") or "")) if ps else "")
wait(lambda: all(len(m.get("proxies") or []) == SIDECARS[m["name"]] for m in members()), "relays to report their sidecars", 30)
for m in members():
    print(f"  {m['name']}: network {m['network']}, locality {m.get('region')}/{m.get('zone')}, joined {m['joined_at']}")
    print(f"     relay {m['relay_identity']} ({'connected' if m.get('relay_connected') else 'NOT connected'}),"
          f" {reported(m)}")

print("\n==> relays: one upstream stream per proxy class (a workload's sidecars), not per sidecar")
mcpc_proxies = get_json(mcpc_admin, "/debug/syncz")["proxies"]
for c in ("a", "b"):
    st, ps = relay(c), relay_proxies(c)
    per_class = collections.Counter(p["workload"] for p in ps)
    reg = st["registry"]
    print(f"  relay {c} ({st['identity']}, http://{RELAY_ADMIN[c]}/debug/relay):")
    print(f"    {len(ps)} sidecars connected, {st['upstream_streams']} upstream streams to the MCPC, one per class:")
    for k in st["classes"]:
        n = per_class.get(k["workload"], 0)
        why = "no sidecar yet: prefetched from the registry" if n == 0 else f"{n} sidecar{'s' if n > 1 else ''}"
        print(f"      {k['workload'] or '(outbound-only, ' + k['namespace'] + ')':<24} {k['resources']:>2} resources cached, {why}")
    print(f"    registry folder: {reg.get('files')} WorkloadEntry files reported, revision {reg.get('revision')}"
          f" accepted by the MCPC ({len(reg.get('errors') or [])} errors)")
    print(f"    sidecars (its /debug/syncz), each with the certificate relay {c} got signed for its identity:")
    for p in sorted(ps, key=lambda p: p["workload"]):
        sec = p.get("secrets") or {}
        print(f"      {p['workload']:<24} {p['mode']:<5} {'synced' if p['synced'] else 'NOT SYNCED'}  {p.get('identity')}"
              f"  cert {(sec.get('cert_serial') or '-')[:14]}")
relay_streams = [p for p in mcpc_proxies if p["id"].startswith("relay~")]
others = len(mcpc_proxies) - len(relay_streams)
print(f"  the MCPC's /debug/syncz lists {len(mcpc_proxies)} proxies: {len(relay_streams)} relay class streams"
      f" ({', '.join(sorted(p['id'].split('~')[1] + ':' + p['id'].split('~')[2].split('.')[0] for p in relay_streams))})"
      f" and {others} others{': no sidecar talks to the MCPC' if others == 0 else ''}")

print("\n==> cluster a calls a service that runs only in cluster b (productpage-a -> ratings)")
hs = hosts("productpage-a", "ratings")
for ip, (prio, loc, _) in sorted(hs.items()):
    print(f"  productpage-a's Envoy: ratings endpoint {ip} ({by_ip(ip)}), locality {loc}, priority {prio}")
print(f"  20 x ratings -> {tally('productpage-a', 'ratings', 20)}")
status, body = call("productpage-a", "ratings")
print(f"  ratings-b's sidecar terminated mutual TLS and told its app the caller was {xfcc_uri(body)}")

print("\n==> reviews runs in both clusters: cluster a's sidecars prefer their own cluster")
for ip, (prio, loc, _) in sorted(hosts("productpage-a", "reviews").items()):
    print(f"  productpage-a's Envoy: reviews endpoint {ip} ({by_ip(ip)}), locality {loc}, priority {prio}")
n = 100
t = tally("productpage-a", "reviews", n)
print(f"  {n} x reviews -> {t}  ({'100% local' if t == f'reviews-a: {n}' else 'NOT all local'})")

class Traffic:
    """Threads sending from `client` to each host, paced; every answer counted under the current phase."""
    def __init__(self, client, hosts_):
        self.client, self.phase, self.stop = client, "MCPC up", threading.Event()
        self.counts = collections.defaultdict(collections.Counter)   # phase -> outcome
        self.answers = collections.defaultdict(collections.Counter)  # host -> workload
        self.failures, self.lock = [], threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(h,), daemon=True) for h in hosts_]
        for t in self.threads:
            t.start()
    def run(self, host):
        while not self.stop.is_set():
            status, body = call(self.client, host)
            with self.lock:
                if status == 200:
                    self.counts[self.phase]["ok"] += 1
                    self.answers[host][body["workload"]] += 1
                else:
                    self.counts[self.phase]["failed"] += 1
                    if len(self.failures) < 10:
                        self.failures.append(f"{self.phase}: {host}: {status} {body}")
            time.sleep(0.01)
    def set_phase(self, phase):
        with self.lock:
            self.phase = phase
    def total(self):
        with self.lock:
            return sum(sum(c.values()) for c in self.counts.values())
    def more(self, n):
        target = self.total() + n
        wait(lambda: self.total() >= target, f"{n} more requests", 120)
    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()

print("\n==> failover: reviews-a's WorkloadEntry leaves cluster a's registry folder, under traffic")
answers, fails, lock, stop = [], [], threading.Lock(), threading.Event()
def sender():
    while not stop.is_set():
        status, body = call("productpage-a", "reviews")
        with lock:
            answers.append((time.time(), body["workload"] if status == 200 else None))
            if status != 200:
                fails.append(f"{status} {body}")
        time.sleep(0.01)
th = threading.Thread(target=sender, daemon=True)
th.start()
wait(lambda: len(answers) >= 50, "traffic before the removal")
os.remove(f"{run_dir}/registry-a/{W['reviews-a']['file']}")
t_removed = time.time()
def switched():
    with lock:
        tail = [w for _, w in answers[-20:]]
        return len(tail) == 20 and all(w == "reviews-b" for w in tail) and answers[-20][0] > t_removed
wait(switched, "traffic to move to reviews-b", 60, 0.05)
stop.set()
th.join()
after = [(t, w) for t, w in answers if t > t_removed]
first_b = next(t for t, w in after if w == "reviews-b")
last_a = max((t for t, w in after if w == "reviews-a"), default=t_removed)
before_n = len(answers) - len(after)
c = collections.Counter(w or "failed" for _, w in after)
print(f"  removed {W['reviews-a']['file']} from relay a's registry folder: relay a reported the folder, the MCPC")
print(f"  recomputed EDS, relay a passed it on. First answer from reviews-b {(first_b - t_removed) * 1000:.0f} ms after the removal,")
print(f"  last from reviews-a {(last_a - t_removed) * 1000:.0f} ms after it.")
print(f"  {before_n} requests before the removal ({'all' if all(w == 'reviews-a' for _, w in answers[:before_n]) else 'NOT all'} reviews-a),"
      f" {len(after)} after: {', '.join(f'{w}: {k}' for w, k in sorted(c.items()))}; {len(fails)} failed")
for f in fails[:5]:
    print(f"    failed: {f}")
wait(lambda: W["reviews-a"]["inbound"] not in hosts("productpage-a", "reviews"), "reviews-a to leave productpage-a's EDS")
for ip, (prio, loc, _) in sorted(hosts("productpage-a", "reviews").items()):
    print(f"  productpage-a's Envoy now: reviews endpoint {ip} ({by_ip(ip)}), locality {loc}, priority {prio}")
print(f"  50 x reviews -> {tally('productpage-a', 'reviews', 50)}")
# As a scale-down would: the workload is gone, so are its app and sidecar.
for proc in ("envoy-reviews-a", "echo-reviews-a"):
    os.kill(int(PROCS[proc]), signal.SIGTERM)
SIDECARS["a"] -= 1
wait(lambda: relay_converged("a", SIDECARS["a"]), "reviews-a's sidecar to leave relay a")
print("  reviews-a's app and sidecar stopped (scaled down)")

print("\n==> the MCPC is SIGKILLed under traffic (productpage-a -> reviews and -> ratings, both in cluster b)")
traffic = Traffic("productpage-a", ["reviews", "ratings"])
traffic.more(100)
def pushes(c):
    return {(p["workload"], p["id"], k): (v.get("sent_version"), v.get("pushes")) for p in relay_proxies(c) for k, v in p["types"].items()}
traffic.set_phase("MCPC down")
t_kill = time.time()
os.kill(mcpc_pid, signal.SIGKILL)
def mcpc_gone():
    try:
        ready(mcpc_admin)
        return False
    except Exception:
        return True
wait(mcpc_gone, "the MCPC to go", 30, 0.05)
wait(lambda: all(relay(c)["upstream_streams"] == 0 for c in ("a", "b")), "relays to notice the MCPC is gone", 60, 0.05)
print(f"  killed after {traffic.total()} requests; both relays saw their upstream streams end"
      f" {(time.time() - t_kill) * 1000:.0f} ms later, and serve their sidecars from their caches")
traffic.more(200)

print(f"\n==> while the MCPC is down: {deferred} starts in cluster a (registered from the start)")
d = W[deferred]
t_start = time.time()
spawn([f"{bin_dir}/echo", "--listen", f"{d['app']}:{PORT}", "--name", deferred, "--version", "v1"], f"echo-{deferred}.log")
spawn([envoy, "-c", f"{run_dir}/{deferred}.bootstrap.yaml", "--disable-hot-restart", "--concurrency", "1",
       "--drain-strategy", "immediate", "--drain-time-s", "45", "--log-level", "warning"], f"envoy-{deferred}.log")
SIDECARS["a"] += 1
def deferred_synced():
    p = next((p for p in relay_proxies("a") if p["workload"] == f"{deferred}.default"), None)
    return p and p["synced"] and (p.get("secrets") or {}).get("epoch_acked") and p
wait(deferred_synced, f"{deferred} synced through relay a", 60, 0.05)
t_synced = time.time()
wait(lambda: who(deferred, "ratings"), f"{deferred} -> ratings")
t_works = time.time()
p = next(p for p in relay_proxies("a") if p["workload"] == f"{deferred}.default")
sec = p.get("secrets") or {}
certs = get_json(f"{d['outbound']}:15000", "/certs")["certificates"]
held = {(c["serial_number"], u["uri"]) for x in certs for c in x.get("cert_chain", []) for u in c.get("subject_alt_names", []) if "uri" in u}
print(f"  {deferred}'s Envoy started; synced through relay a (config and SDS ACKed) after {(t_synced - t_start):.1f} s,"
      f" first request through it answered after {(t_works - t_start):.1f} s")
print(f"  relay a's /debug/syncz: {p['workload']} {p['mode']}, identity {p.get('identity')}, cert {(sec.get('cert_serial') or '-')[:14]}"
      f" (relay a keeps one certificate per identity: productpage-a's)")
for serial, uri in sorted(held):
    print(f"  its Envoy's /certs: serial {serial[:12]}, {uri}")
print(f"  relay a's upstream streams meanwhile: {relay('a')['upstream_streams']} (the MCPC is down: {time.time() - t_kill:.1f} s so far)")
print(f"  20 x {deferred} -> ratings: {tally(deferred, 'ratings', 20)}   20 x {deferred} -> reviews: {tally(deferred, 'reviews', 20)}")
status, body = call(deferred, "ratings")
print(f"  ratings-b saw the caller as {xfcc_uri(body)} (mutual TLS, STRICT mesh-wide)")
traffic.more(100)
wait(lambda: time.time() - t_kill >= 5, "5 s of outage", 30, 0.1)

print("\n==> the MCPC restarts (same config and CA dirs); the relays reconnect")
before = {c: pushes(c) for c in ("a", "b")}
traffic.set_phase("MCPC restarted, relays reconnecting")
down_s = time.time() - t_kill
t_restart = time.time()
spawn(mcpc_cmd, "mcpc-2.log")
wait(lambda: ready(mcpc_admin), "the restarted MCPC", 60, 0.05)
t_ready = time.time()
def reconnected():
    streams = [p for p in get_json(mcpc_admin, "/debug/syncz")["proxies"] if p["id"].startswith("relay~")]
    for c in ("a", "b"):
        st = relay(c)
        mine = [p for p in streams if p["id"].startswith(f"relay~{c}~")]
        reg = st["registry"]
        if not (st["upstream_streams"] == len(st["classes"]) == len(mine) > 0 and all(p["synced"] for p in mine)
                and reg.get("acked_revision") == reg.get("revision")):
            return False
    return streams
streams = wait(reconnected, "relays to reconnect", RECONNECT, 0.1)
t_back = time.time()
traffic.set_phase("relays reconnected")
print(f"  the MCPC was down {down_s:.1f} s; restarted, ready in {(t_ready - t_restart) * 1000:.0f} ms;"
      f" both relays reconnected {t_back - t_restart:.1f} s after the restart (their streams retry with backoff)")
for c in ("a", "b"):
    st = relay(c)
    print(f"  relay {c}: {st['upstream_streams']} upstream streams ({', '.join(k['workload'] for k in st['classes'])}),"
          f" registry revision {st['registry'].get('revision')} acked")
print(f"  the MCPC's /debug/syncz: {len(streams)} relay streams, all synced")
wait(lambda: all(m.get("relay_connected") and len(m.get("proxies") or []) == SIDECARS[m["name"]] for m in members()),
     "relays to report their sidecars again", 30)
for m in members():
    print(f"  /debug/clusters: {m['name']} (joined {m['joined_at']}, kept across the restart), relay connected, {reported(m)}")
changed = sum(1 for c in ("a", "b") for k, v in pushes(c).items() if before[c].get(k) != v)
print(f"  pushes to sidecars caused by the reconnect: {changed} (same content, same versions)")
traffic.more(100)
traffic.finish()

print("\n==> requests from productpage-a while all this happened")
for phase in ("MCPC up", "MCPC down", "MCPC restarted, relays reconnecting", "relays reconnected"):
    k = traffic.counts.get(phase, {})
    print(f"  {phase + ':':<36} {k.get('ok', 0):>5} ok, {k.get('failed', 0)} failed")
total_failed = sum(k.get("failed", 0) for k in traffic.counts.values())
print(f"  answered by: " + "; ".join(f"{h}: {dict(a)}" for h, a in sorted(traffic.answers.items())))
print(f"  {total_failed} failed requests in all")
for f in traffic.failures:
    print(f"    failed: {f}")

print("\n==> root rotation of the MCPC's CA under traffic (xds-server ca rotate-root): the relays follow it")
ca_before = get_json(mcpc_admin, "/debug/ca")
old_root = ca_before["roots"][0]["fingerprint"]
serials_before = {p["workload"]: (p.get("secrets") or {}).get("cert_serial") for c in ("a", "b") for p in relay_proxies(c)}
traffic = Traffic("productpage-a", ["reviews", "ratings"])
traffic.set_phase("rotation")
traffic.more(50)
t_rot = time.time()
rot = subprocess.run([f"{bin_dir}/xds-server", "ca", "rotate-root", "--admin-addr", mcpc_admin, "--timeout", "120s"],
                     capture_output=True, text=True, timeout=180)
took = time.time() - t_rot
for line in (rot.stdout + rot.stderr).strip().splitlines():
    print(f"  | {line}")
if rot.returncode != 0:
    sys.exit(f"rotate-root failed ({rot.returncode})")
traffic.more(50)
traffic.finish()
ca = get_json(mcpc_admin, "/debug/ca")
new_root = ca["roots"][0]["fingerprint"]
k = traffic.counts["rotation"]
print(f"  {took:.1f} s: root {old_root[:12]} replaced by {new_root[:12]}, trust epoch {ca_before['epoch']} -> {ca['epoch']};"
      f" each phase waited for both relays and the sidecars behind them")
for c in ("a", "b"):
    st = relay(c)
    ps = relay_proxies(c)
    new = sum(1 for p in ps if (p.get("secrets") or {}).get("cert_root") == new_root)
    reissued = sum(1 for p in ps if (p.get("secrets") or {}).get("cert_serial") != serials_before.get(p["workload"]))
    print(f"  relay {c}: at trust epoch {st['trust_epoch']}; {new}/{len(ps)} sidecars on a certificate from the new root"
          f" ({reissued} re-issued)")
print(f"  productpage-a -> reviews, ratings during the rotation: {k.get('ok', 0)} ok, {k.get('failed', 0)} failed")
for f in traffic.failures:
    print(f"    failed: {f}")

PY

if [[ "${STAY}" == 1 ]]; then
    step "the mesh keeps running: MCPC http://${MCPC_ADMIN}/debug/clusters, relays http://${RELAY_IP[a]}:16014/debug/relay and http://${RELAY_IP[b]}:16014/debug/relay; Ctrl-C stops it"
    wait
fi
