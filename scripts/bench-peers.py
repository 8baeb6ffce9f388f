#!/usr/bin/env python3
"""kommit side by side with Flux and kapp on the sandbox; the operator at fleet scale and scale.

Run through `scripts/bench --peers [N...]`, which builds kommit (release) and the peers
(scripts/peers) and starts the sandbox first. Standard library only.

Scenarios (see BENCHMARKS.md):
  single app, per N: diff, noop, commit-to-healthy, memory; kommit (CLI) vs kapp (CLI) vs Flux
    (source-controller + kustomize-controller, at its defaults and as `flux-tuned` with
    --kube-api-qps=1000 --kube-api-burst=2000); each tool in its own namespace, only one
    product's controllers running at a time, medians of BENCH_RUNS.
  fleet: BENCH_FLEET GitSyncs (default 1000) on one repository, each of a Deployment, a
    ServiceAccount, a Service and a ConfigMap in its own namespace: created to all Ready, a
    no-op round, one commit changing all; then the same fleet of GitRepository + Kustomization
    pairs on Flux.
  scale: one GitSync of BENCH_SCALE ConfigMaps (default 10000): first sync, no-op, one change.

Every repository is served over http by `git http-backend`, and kommit and Flux fetch the same
URL. API requests per scenario come from the API server's /metrics (apiserver_request_total),
less the requests this script makes itself. Writes target/bench/peers.json,
target/bench/peers-requests.json and target/bench/peers.md.

Environment: BENCH_RUNS (3), BENCH_FLEET (1000), BENCH_SCALE (10000), BENCH_PHASES (comma list
of single,fleet,scale,flux-fleet; default all), BENCH_TIMEOUT (seconds a phase may take, 900).
"""

import base64
import datetime
import http.client
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
KUBECONFIG = os.path.join(ROOT, "target", "sandbox", "kubeconfig")
KUBECTL = os.path.join(ROOT, "target", "sandbox", "bin", "kubectl")
KOMMIT = os.environ.get("BENCH_KOMMIT", os.path.join(ROOT, "target", "release", "kommit"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
FLEET = int(os.environ.get("BENCH_FLEET", "1000"))
SCALE = int(os.environ.get("BENCH_SCALE", "10000"))
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "900"))
PHASES = set(
    os.environ.get("BENCH_PHASES", "single,fleet,scale,flux-fleet").split(",")
)
TUNED = ["--kube-api-qps=1000", "--kube-api-burst=2000"]
INTERVAL = "10m"  # rounds are requested by the bench, not started by the interval


def say(*parts):
    print("bench:", *parts, file=sys.stderr, flush=True)


def peer(name, what="path"):
    return subprocess.check_output([os.path.join(ROOT, "scripts", "peers"), what, name], text=True).strip()


def versions():
    lines = subprocess.check_output([os.path.join(ROOT, "scripts", "peers"), "versions"], text=True)
    return dict(line.split() for line in lines.splitlines())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_tag():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# The API server: a small client with the kubeconfig's client certificate, counting its requests


class Kube:
    def __init__(self, kubeconfig):
        import re

        text = open(kubeconfig).read()

        def field(name):
            m = re.search(r"^\s*" + name + r":\s*(\S+)\s*$", text, re.M)
            if not m:
                raise SystemExit(f"bench: {kubeconfig} has no {name}")
            return m.group(1)

        url = urllib.parse.urlparse(field("server"))
        self.host, self.port = url.hostname, url.port
        self.dir = tempfile.mkdtemp(prefix="kommit-bench-")
        paths = {}
        for name in ["certificate-authority-data", "client-certificate-data", "client-key-data"]:
            paths[name] = os.path.join(self.dir, name)
            with open(paths[name], "wb") as f:
                f.write(base64.b64decode(field(name)))
            os.chmod(paths[name], 0o600)
        self.ctx = ssl.create_default_context(cafile=paths["certificate-authority-data"])
        self.ctx.load_cert_chain(paths["client-certificate-data"], paths["client-key-data"])
        self.local = threading.local()
        self.sent = 0
        self.lock = threading.Lock()

    def _conn(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
            self.local.conn = conn
        return conn

    def request(self, method, path, body=None, content_type="application/json", ok=(200, 201)):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(5):
            with self.lock:
                self.sent += 1
            try:
                conn = self._conn()
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError):
                self.local.conn = None
                time.sleep(0.2 * (attempt + 1))
                continue
            if resp.status == 429 or resp.status >= 500:
                time.sleep(0.2 * (attempt + 1))
                continue
            if ok and resp.status not in ok:
                raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")
            if resp.headers.get("Content-Type", "").startswith("application/json"):
                return resp.status, json.loads(raw)
            return resp.status, raw.decode(errors="replace")
        raise RuntimeError(f"{method} {path}: no answer after 5 tries")

    def get(self, path):
        return self.request("GET", path)[1]

    def items(self, path):
        return self.get(path).get("items", [])

    def create(self, path, obj):
        status, body = self.request("POST", path, obj, ok=(200, 201, 409))
        return body

    def merge_patch(self, path, patch):
        return self.request("PATCH", path, patch, "application/merge-patch+json")[1]

    def delete(self, path):
        return self.request("DELETE", path, ok=(200, 202, 404))[1]

    def requests_total(self):
        """apiserver_request_total summed over every label, less this client's own requests."""
        text = self.request("GET", "/metrics", ok=(200,))[1]
        total = 0.0
        by_label = {}
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                labels, value = line.rsplit(" ", 1)
                total += float(value)
                keep = dict(kv.split("=", 1) for kv in labels[len("apiserver_request_total{"):-1].split(",") if "=" in kv)
                key = " ".join(keep.get(k, "").strip('"') for k in ("verb", "resource", "subresource"))
                by_label[key] = by_label.get(key, 0.0) + float(value)
        self.snapshots = (getattr(self, "snapshots", []) + [by_label])[-2:]
        with self.lock:
            return total - self.sent

    def last_detail(self):
        """The requests between the last two snapshots by verb and resource, most first."""
        if len(getattr(self, "snapshots", [])) < 2:
            return []
        before, after = self.snapshots
        delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
        return sorted(delta.items(), key=lambda kv: -kv[1])


def parallel(fn, items, workers=8):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def kubectl(*args, input=None, check=True):
    env = dict(os.environ, KUBECONFIG=KUBECONFIG)
    return subprocess.run([KUBECTL, *args], input=input, text=True, env=env, check=check, capture_output=True)


# ---------------------------------------------------------------------------------------------
# Git over http: `git http-backend` behind a threading HTTP/1.1 server


def serve_git(root):
    exec_path = subprocess.check_output(["git", "--exec-path"], text=True).strip()
    backend = os.path.join(exec_path, "git-http-backend")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def cgi(self):
            path, _, query = self.path.partition("?")
            data = self.body() if self.command == "POST" else b""
            env = {
                "GIT_PROJECT_ROOT": root,
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": urllib.parse.unquote(path),
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(data)),
                "REMOTE_ADDR": self.client_address[0],
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            }
            if self.headers.get("Content-Encoding"):
                env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            if self.headers.get("Git-Protocol"):
                env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            out = subprocess.run([backend], input=data, env=env, capture_output=True).stdout
            sep = out.find(b"\r\n\r\n")
            head, rest = (out[:sep], out[sep + 4 :]) if sep >= 0 else out.split(b"\n\n", 1)
            status, headers = 200, []
            for line in head.decode(errors="replace").splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.strip().split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            self.wfile.write(rest)

        do_GET = cgi
        do_POST = cgi

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


class Repo:
    """A working clone whose commits are pushed to a bare repository served over http."""

    def __init__(self, base, port):
        self.bare = os.path.join(base, "git", "bench.git")
        self.work = os.path.join(base, "work")
        for d in (self.bare, self.work):
            shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", self.bare], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", self.work], check=True)
        self.url = f"http://127.0.0.1:{port}/bench.git"

    def write(self, rel, text):
        path = os.path.join(self.work, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def path(self, rel):
        return os.path.join(self.work, rel)

    def commit(self, message):
        git = ["git", "-C", self.work, "-c", "user.name=bench", "-c", "user.email=bench@kommit.dev"]
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], check=True)
        subprocess.run([*git, "push", "-q", self.bare, "main"], check=True, capture_output=True)
        return subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip()


def deployment(name, namespace, image, labels_extra=""):
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}{ns}
  labels: {{app: {name}, tier: bench}}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}, tier: bench}}
    spec:
      containers:
      - name: app
        image: {image}
        ports: [{{containerPort: 8080}}]
        resources:
          requests: {{cpu: 10m, memory: 16Mi}}
        readinessProbe:
          httpGet: {{path: /healthz, port: 8080}}
"""


# ---------------------------------------------------------------------------------------------
# Processes: timing a CLI, and the controllers' memory


def timed(cmd, env=None, ok=(0,)):
    """Runs cmd under /usr/bin/time; returns (seconds, max RSS MiB)."""
    tfile = os.path.join(OUT, "time.txt")
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tfile, *cmd], env=env, capture_output=True, text=True)
    if p.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}{p.stdout[-1000:]}")
    t, m = open(tfile).read().split()[-2:]
    return float(t), int(m) / 1024


def proc_mib(pid, field):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return 0.0
    return 0.0


class Controllers:
    """Processes run on this machine against the sandbox; memory is their VmHWM/VmRSS summed."""

    def __init__(self, name):
        self.name = name
        self.procs = []

    def start(self, cmd, env, log):
        f = open(os.path.join(OUT, log), "w")
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def peak_mib(self):
        return sum(proc_mib(p.pid, "VmHWM") for p in self.procs)

    def rss_mib(self):
        return sum(proc_mib(p.pid, "VmRSS") for p in self.procs)

    def check(self):
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: a process exited ({p.args[0]}: {p.returncode}); see its log in {OUT}")

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


FLUX_STORAGE_PORT = free_port()


def start_flux(tuned, kube):
    sc, kc = peer("source-controller"), peer("kustomize-controller")
    # The same storage and address across restarts: the artifact URLs in the GitRepositories'
    # status stay valid, so a restarted kustomize-controller does not fetch from a dead port.
    storage = os.path.join(OUT, "flux-storage")
    os.makedirs(storage, exist_ok=True)
    env = dict(os.environ, KUBECONFIG=KUBECONFIG, RUNTIME_NAMESPACE="flux-system")
    extra = TUNED if tuned else []
    port = FLUX_STORAGE_PORT
    c = Controllers("flux-tuned" if tuned else "flux")
    c.start(
        [sc, "--enable-leader-election=false", f"--metrics-addr=127.0.0.1:{free_port()}",
         f"--health-addr=127.0.0.1:{free_port()}", f"--storage-addr=127.0.0.1:{port}",
         f"--storage-adv-addr=127.0.0.1:{port}", f"--storage-path={storage}", *extra],
        env, "source-controller.log")
    c.start(
        [kc, "--enable-leader-election=false", f"--metrics-addr=127.0.0.1:{free_port()}",
         f"--health-addr=127.0.0.1:{free_port()}", *extra],
        env, "kustomize-controller.log")
    time.sleep(2)
    c.check()
    return c


def start_operator(cache, port):
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, KUBECONFIG=KUBECONFIG, KOMMIT_CACHE_DIR=cache, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    c = Controllers("kommit operator")
    extra = os.environ.get("BENCH_OPERATOR_ARGS", "").split()
    c.start([KOMMIT, "operator", "--no-leader-election", f"--listen=127.0.0.1:{port}", *extra], env, "operator.log")
    time.sleep(1)
    c.check()
    return c


# ---------------------------------------------------------------------------------------------
# Waiting on many objects


def condition(obj, kind="Ready"):
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c.get("status")
    return None


def wait_all(kube, path, done, count, what, controllers=None, timeout=TIMEOUT, poll=0.5):
    """Polls the list at path until `done` holds for `count` items; returns the seconds taken."""
    start = time.monotonic()
    last = 0.0
    while True:
        items = kube.items(path)
        n = sum(1 for o in items if done(o))
        if n >= count:
            return time.monotonic() - start
        elapsed = time.monotonic() - start
        if elapsed - last >= 10:
            last = elapsed
            say(f"{what}: {n} of {count} after {elapsed:.0f}s")
        if elapsed > timeout:
            stuck = [o for o in items if not done(o)][:3]
            detail = "; ".join(
                f"{o['metadata'].get('namespace')}/{o['metadata']['name']}: "
                + json.dumps([c for c in (o.get("status") or {}).get("conditions", []) if c.get("type") == "Ready"])[:300]
                for o in stuck)
            raise TimeoutError(f"{what}: {n} of {count} after {timeout:.0f}s ({detail})")
        if controllers:
            controllers.check()
        time.sleep(poll)


def annotate(kube, paths, key, value):
    parallel(lambda p: kube.merge_patch(p, {"metadata": {"annotations": {key: value}}}), paths)


# ---------------------------------------------------------------------------------------------
# Results

results = {"ratios": [], "kommit": []}
requests = []  # {"tool", "scenario", "n", "requests", "seconds"}
table = []  # markdown rows
memo = {}  # (tool, scenario, n) -> seconds (median) / MiB


def record(tool, scenario, n, seconds, peak=None, reqs=None, kube=None):
    memo[(tool, scenario, n)] = (seconds, peak)
    if reqs is not None and kube is not None:
        # Which requests (verb, resource, subresource), including the control plane's own and
        # this script's polling: for finding where a product's requests go.
        with open(os.path.join(OUT, "requests-detail.txt"), "a") as f:
            f.write(f"== {tool} {scenario} n={n}\n")
            for key, value in kube.last_detail()[:25]:
                f.write(f"{value:10.0f}  {key}\n")
    if reqs is not None:
        requests.append({"tool": tool, "scenario": scenario, "n": n, "requests": round(reqs),
                         "seconds": round(seconds, 3) if seconds is not None else None})
    if tool == "kommit":
        results["kommit"].append({"scenario": scenario, "n": n,
                                  "seconds": None if seconds is None else round(seconds, 3),
                                  "peak_mib": None if peak is None else round(peak, 1)})
    say(f"{tool} {scenario} n={n}: {seconds if seconds is None else round(seconds, 2)}s"
        + (f", peak {peak:.0f} MiB" if peak is not None else "")
        + (f", {reqs:.0f} API requests" if reqs is not None else ""))


def write_results():
    with open(os.path.join(OUT, "peers-memo.json"), "w") as f:
        json.dump([[list(k), list(v)] for k, v in memo.items()], f)
    results["ratios"] = []
    for (tool, scenario, n), (seconds, peak) in sorted(memo.items()):
        if tool == "kommit":
            continue
        mine = memo.get(("kommit", scenario, n))
        if not mine:
            continue
        if scenario in ("memory", "fleet-memory"):
            peer_v, kommit_v = peak, mine[1]
        else:
            peer_v, kommit_v = seconds, mine[0]
        if peer_v is None or not kommit_v:
            continue
        results["ratios"].append({"peer": tool, "scenario": scenario, "n": n,
                                  "peer_s": round(peer_v, 3), "kommit_s": round(kommit_v, 3),
                                  "ratio": round(peer_v / kommit_v, 2)})
    with open(os.path.join(OUT, "peers.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(OUT, "peers-requests.json"), "w") as f:
        json.dump(requests, f, indent=2)


def median(values):
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------
# Single app: N Deployments per tool


def single(kube, repo, sizes):
    flux_bin, kapp_bin = peer("flux"), peer("kapp")
    env = dict(os.environ, KUBECONFIG=KUBECONFIG, KOMMIT_CACHE_DIR=os.path.join(OUT, "cli-cache"))
    images = {}
    for n in sizes:
        for tool in ("kommit", "flux", "kapp"):
            ns = f"peers-{tool}-{n}"
            for i in range(n):
                repo.write(f"single-{n}/{tool}/app-{i}.yaml", deployment(f"app-{i}", ns, "nginx:1.25"))
            images[(tool, n)] = 0
    repo.commit("single-app deployments")

    for n in sizes:
        for tool in ("kommit", "flux", "kapp"):
            kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"peers-{tool}-{n}"}})

    def bump(tool, n):
        images[(tool, n)] += 1
        ns = f"peers-{tool}-{n}"
        repo.write(f"single-{n}/{tool}/app-0.yaml", deployment("app-0", ns, f"nginx:1.25-r{images[(tool, n)]}"))
        return repo.commit(f"{tool} {n}: app-0 image r{images[(tool, n)]}")

    def kapp_args(n):
        return [kapp_bin, "deploy", "-a", f"bench-{n}", "-n", f"peers-kapp-{n}", "-f", repo.path(f"single-{n}/kapp"), "-y"]

    # Seeding, untimed: every tool's Deployments exist and are available before any timing.
    for n in sizes:
        say(f"N={n}: seeding kommit and kapp (not measured)")
        subprocess.run([KOMMIT, "sync", "--no-wait", "--repo", repo.url, "--path", f"single-{n}/kommit"], env=env, check=True, capture_output=True)
        subprocess.run(kapp_args(n), env=env, check=True, capture_output=True)
    flux_ctl = start_flux(False, kube)
    try:
        for n in sizes:
            ns = f"peers-flux-{n}"
            kube.create(f"/apis/source.toolkit.fluxcd.io/v1/namespaces/{ns}/gitrepositories", {
                "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                "metadata": {"name": "bench", "namespace": ns},
                "spec": {"interval": INTERVAL, "url": repo.url, "ref": {"branch": "main"}}})
            kube.create(f"/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/{ns}/kustomizations", {
                "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                "metadata": {"name": f"bench-{n}", "namespace": ns},
                "spec": {"interval": INTERVAL, "path": f"./single-{n}/flux", "prune": True, "wait": True,
                         "timeout": "10m", "sourceRef": {"kind": "GitRepository", "name": "bench"}}})
        for n in sizes:
            say(f"N={n}: seeding Flux (not measured)")
            wait_all(kube, f"/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/peers-flux-{n}/kustomizations",
                     lambda o: condition(o) == "True", 1, "flux seed", flux_ctl)
    finally:
        flux_ctl.stop()
    for n in sizes:
        for tool in ("kommit", "kapp"):
            kubectl("wait", "-n", f"peers-{tool}-{n}", "deployment", "--all", "--for=condition=Available", "--timeout=900s")

    for n in sizes:
        path = f"single-{n}/kommit"
        # kommit: the CLI, fetching the same URL as Flux.
        peaks = []
        for scenario, cmd in (("diff", [KOMMIT, "diff", "--repo", repo.url, "--path", path]),
                              ("noop", [KOMMIT, "sync", "--repo", repo.url, "--path", path])):
            timed(cmd, env)
            before = kube.requests_total()
            runs = [timed(cmd, env) for _ in range(RUNS)]
            reqs = (kube.requests_total() - before) / RUNS
            peaks += [m for _, m in runs]
            record("kommit", scenario, n, median([t for t, _ in runs]), max(m for _, m in runs), reqs, kube=kube)
        runs = []
        before = kube.requests_total()
        for _ in range(RUNS):
            bump("kommit", n)
            runs.append(timed([KOMMIT, "sync", "--repo", repo.url, "--path", path], env))
        reqs = (kube.requests_total() - before) / RUNS
        peaks += [m for _, m in runs]
        record("kommit", "commit-to-healthy", n, median([t for t, _ in runs]), max(m for _, m in runs), reqs, kube=kube)
        record("kommit", "memory", n, None, max(peaks))

        # kapp: the CLI on the checked-out files.
        peaks = []
        kdir = repo.path(f"single-{n}/kapp")
        for scenario, cmd in (("diff", [*kapp_args(n)[:-1], "--diff-run"]), ("noop", kapp_args(n))):
            timed(cmd, env)
            before = kube.requests_total()
            runs = [timed(cmd, env) for _ in range(RUNS)]
            reqs = (kube.requests_total() - before) / RUNS
            peaks += [m for _, m in runs]
            record("kapp", scenario, n, median([t for t, _ in runs]), max(m for _, m in runs), reqs, kube=kube)
        runs = []
        before = kube.requests_total()
        for _ in range(RUNS):
            bump("kapp", n)
            runs.append(timed(kapp_args(n), env))
        reqs = (kube.requests_total() - before) / RUNS
        peaks += [m for _, m in runs]
        record("kapp", "commit-to-healthy", n, median([t for t, _ in runs]), max(m for _, m in runs), reqs, kube=kube)
        record("kapp", "memory", n, None, max(peaks))
        del kdir
        write_results()

    # Flux: its controllers alone, at its defaults and then with the rate limit raised.
    for tuned in (False, True):
        name = "flux-tuned" if tuned else "flux"
        ctl = start_flux(tuned, kube)
        try:
            for n in sizes:
                ns = f"peers-flux-{n}"
                ks = f"/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/{ns}/kustomizations/bench-{n}"
                gr = f"/apis/source.toolkit.fluxcd.io/v1/namespaces/{ns}/gitrepositories/bench"

                def handled(tag):
                    def check(o):
                        st = o.get("status") or {}
                        return st.get("lastHandledReconcileAt") == tag and condition(o) == "True"
                    return check

                def noop_once():
                    tag = now_tag()
                    start = time.monotonic()
                    annotate(kube, [ks], "reconcile.fluxcd.io/requestedAt", tag)
                    while not handled(tag)(kube.get(ks)):
                        if time.monotonic() - start > TIMEOUT:
                            raise TimeoutError(f"{name} noop N={n}")
                        ctl.check()
                        time.sleep(0.05)
                    return time.monotonic() - start

                # Settle: the artifact of the latest commit, applied and healthy.
                sha = subprocess.check_output(["git", "-C", repo.work, "rev-parse", "HEAD"], text=True).strip()
                annotate(kube, [gr], "reconcile.fluxcd.io/requestedAt", now_tag())
                settle = time.monotonic()
                while not (sha in ((kube.get(ks).get("status") or {}).get("lastAppliedRevision") or "")
                           and condition(kube.get(ks)) == "True"):
                    if time.monotonic() - settle > TIMEOUT:
                        raise TimeoutError(f"{name} settle N={n}")
                    ctl.check()
                    time.sleep(0.2)
                noop_once()

                diff = [flux_bin, "diff", "kustomization", f"bench-{n}", "-n", ns, "--path", repo.path(f"single-{n}/flux"),
                        "--progress-bar=false", *(TUNED if tuned else [])]
                timed(diff, env, ok=(0, 1))
                before = kube.requests_total()
                runs = [timed(diff, env, ok=(0, 1)) for _ in range(RUNS)]
                reqs = (kube.requests_total() - before) / RUNS
                record(name, "diff", n, median([t for t, _ in runs]), max(m for _, m in runs), reqs, kube=kube)

                before = kube.requests_total()
                times = [noop_once() for _ in range(RUNS)]
                reqs = (kube.requests_total() - before) / RUNS
                record(name, "noop", n, median(times), None, reqs, kube=kube)

                times = []
                before = kube.requests_total()
                for _ in range(RUNS):
                    sha = bump("flux", n)
                    start = time.monotonic()
                    # What a push webhook (Flux's Receiver) does: ask the source to fetch now.
                    annotate(kube, [gr], "reconcile.fluxcd.io/requestedAt", now_tag())
                    while True:
                        o = kube.get(ks)
                        if sha in ((o.get("status") or {}).get("lastAppliedRevision") or "") and condition(o) == "True":
                            break
                        if time.monotonic() - start > TIMEOUT:
                            raise TimeoutError(f"{name} commit-to-healthy N={n}")
                        ctl.check()
                        time.sleep(0.05)
                    times.append(time.monotonic() - start)
                reqs = (kube.requests_total() - before) / RUNS
                record(name, "commit-to-healthy", n, median(times), None, reqs, kube=kube)
                record(name, "memory", n, None, ctl.peak_mib())
                write_results()
        finally:
            ctl.stop()


# ---------------------------------------------------------------------------------------------
# Fleet: many small apps on one repository


def fleet_files(repo, version):
    # Headless: the sandbox's service IP range holds a few hundred, not two thousand.
    repo.write("fleet/deployment.yaml", deployment("web", None, f"nginx:1.{25 + version}"))
    repo.write("fleet/serviceaccount.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web\n")
    repo.write("fleet/service.yaml", """apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
""")
    repo.write("fleet/configmap.yaml", f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  version: \"{version}\"\n")


def namespaces(kube, prefix, count):
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    parallel(lambda ns: kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}), names)
    # Pods cannot be created before their namespace's default ServiceAccount exists, which the
    # controller-manager makes a while later under load: part of setting up, not of the sync.
    wanted = set(names)
    wait_all(kube, "/api/v1/serviceaccounts?fieldSelector=metadata.name%3Ddefault",
             lambda o: o["metadata"]["namespace"] in wanted, len(names), "default ServiceAccounts", poll=2)
    return names


def delete_namespaces(kube, names):
    # Flux's objects carry finalizers that only its controllers remove; they are not running.
    wanted = set(names)
    for path in ("/apis/kustomize.toolkit.fluxcd.io/v1/kustomizations", "/apis/source.toolkit.fluxcd.io/v1/gitrepositories"):
        for o in kube.items(path):
            meta = o["metadata"]
            if meta["namespace"] in wanted and meta.get("finalizers"):
                plural = path.rsplit("/", 1)[1]
                group = path.split("/")[2]
                kube.merge_patch(f"/apis/{group}/v1/namespaces/{meta['namespace']}/{plural}/{meta['name']}",
                                 {"metadata": {"finalizers": None}})
    parallel(lambda ns: kube.delete(f"/api/v1/namespaces/{ns}"), names)
    start = time.monotonic()
    left = set(names)
    while left and time.monotonic() - start < TIMEOUT:
        existing = {o["metadata"]["name"] for o in kube.items("/api/v1/namespaces")}
        left &= existing
        time.sleep(2)
    say(f"deleted {len(names)} namespaces in {time.monotonic() - start:.0f}s")


def fleet_kommit(kube, repo):
    fleet_files(repo, 0)
    sha = repo.commit("fleet v0")
    names = namespaces(kube, "kf", FLEET)
    op = start_operator(os.path.join(OUT, "operator-cache"), free_port())
    gs = "/apis/kommit.dev/v1alpha1/gitsyncs"
    try:
        def applied(sha):
            return lambda o: ((o.get("status") or {}).get("lastAppliedCommit") == sha and condition(o) == "True")

        before = kube.requests_total()
        start = time.monotonic()
        parallel(lambda ns: kube.create(f"/apis/kommit.dev/v1alpha1/namespaces/{ns}/gitsyncs", {
            "apiVersion": "kommit.dev/v1alpha1", "kind": "GitSync", "metadata": {"name": "web", "namespace": ns},
            "spec": {"repo": repo.url, "path": "fleet", "interval": INTERVAL, "prune": True}}), names)
        wait_all(kube, gs, applied(sha), FLEET, "kommit fleet Ready", op)
        t = time.monotonic() - start
        record("kommit", "fleet", FLEET, t, op.peak_mib(), kube.requests_total() - before, kube=kube)

        tag = now_tag()
        before = kube.requests_total()
        start = time.monotonic()
        annotate(kube, [f"/apis/kommit.dev/v1alpha1/namespaces/{ns}/gitsyncs/web" for ns in names], "kommit.dev/reconcile-requested-at", tag)
        wait_all(kube, gs, lambda o: (o.get("status") or {}).get("lastHandledReconcileAt") == tag and condition(o) == "True", FLEET, "kommit fleet no-op", op)
        t = time.monotonic() - start
        record("kommit", "fleet-noop", FLEET, t, op.peak_mib(), kube.requests_total() - before, kube=kube)
        steady = op.rss_mib()

        fleet_files(repo, 1)
        sha = repo.commit("fleet v1")
        tag = now_tag()
        before = kube.requests_total()
        start = time.monotonic()
        annotate(kube, [f"/apis/kommit.dev/v1alpha1/namespaces/{ns}/gitsyncs/web" for ns in names], "kommit.dev/reconcile-requested-at", tag)
        wait_all(kube, gs, applied(sha), FLEET, "kommit fleet commit", op)
        t = time.monotonic() - start
        record("kommit", "fleet-commit", FLEET, t, op.peak_mib(), kube.requests_total() - before, kube=kube)
        time.sleep(5)
        steady = max(steady, op.rss_mib())
        record("kommit", "fleet-memory", FLEET, None, op.peak_mib())
        memo[("kommit", "fleet-steady", FLEET)] = (None, steady)
        say(f"kommit operator: peak {op.peak_mib():.0f} MiB, steady {steady:.0f} MiB")
    finally:
        op.stop()
        write_results()
    delete_namespaces(kube, names)


def fleet_flux(kube, repo, tuned):
    try:
        run_fleet_flux(kube, repo, tuned)
    except TimeoutError as e:
        # A fleet Flux does not finish within BENCH_TIMEOUT is a finding, not a failed bench.
        say(f"Flux fleet: {e}")


def run_fleet_flux(kube, repo, tuned):
    name = "flux-tuned" if tuned else "flux"
    fleet_files(repo, 0)
    sha = repo.commit("fleet v0 (flux)")
    names = namespaces(kube, "ff", FLEET)
    ctl = start_flux(tuned, kube)
    ks_all = "/apis/kustomize.toolkit.fluxcd.io/v1/kustomizations"
    try:
        def applied(sha):
            return lambda o: sha in ((o.get("status") or {}).get("lastAppliedRevision") or "") and condition(o) == "True"

        def create(ns):
            kube.create(f"/apis/source.toolkit.fluxcd.io/v1/namespaces/{ns}/gitrepositories", {
                "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"interval": INTERVAL, "url": repo.url, "ref": {"branch": "main"}}})
            kube.create(f"/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/{ns}/kustomizations", {
                "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"interval": INTERVAL, "path": "./fleet", "prune": True, "wait": True, "timeout": "10m",
                         "targetNamespace": ns, "sourceRef": {"kind": "GitRepository", "name": "web"}}})

        before = kube.requests_total()
        start = time.monotonic()
        parallel(create, names)
        wait_all(kube, ks_all, applied(sha), FLEET, f"{name} fleet Ready", ctl, poll=2)
        record(name, "fleet", FLEET, time.monotonic() - start, ctl.peak_mib(), kube.requests_total() - before, kube=kube)

        tag = now_tag()
        before = kube.requests_total()
        start = time.monotonic()
        annotate(kube, [f"/apis/source.toolkit.fluxcd.io/v1/namespaces/{ns}/gitrepositories/web" for ns in names], "reconcile.fluxcd.io/requestedAt", tag)
        annotate(kube, [f"/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/{ns}/kustomizations/web" for ns in names], "reconcile.fluxcd.io/requestedAt", tag)
        wait_all(kube, ks_all, lambda o: (o.get("status") or {}).get("lastHandledReconcileAt") == tag and condition(o) == "True", FLEET, f"{name} fleet no-op", ctl, poll=2)
        record(name, "fleet-noop", FLEET, time.monotonic() - start, ctl.peak_mib(), kube.requests_total() - before, kube=kube)
        steady = ctl.rss_mib()

        fleet_files(repo, 1)
        sha = repo.commit("fleet v1 (flux)")
        before = kube.requests_total()
        start = time.monotonic()
        annotate(kube, [f"/apis/source.toolkit.fluxcd.io/v1/namespaces/{ns}/gitrepositories/web" for ns in names], "reconcile.fluxcd.io/requestedAt", now_tag())
        wait_all(kube, ks_all, applied(sha), FLEET, f"{name} fleet commit", ctl, poll=2)
        record(name, "fleet-commit", FLEET, time.monotonic() - start, ctl.peak_mib(), kube.requests_total() - before, kube=kube)
        time.sleep(5)
        steady = max(steady, ctl.rss_mib())
        record(name, "fleet-memory", FLEET, None, ctl.peak_mib())
        memo[(name, "fleet-steady", FLEET)] = (None, steady)
        say(f"{name} controllers: peak {ctl.peak_mib():.0f} MiB, steady {steady:.0f} MiB")
    finally:
        ctl.stop()
        write_results()
    delete_namespaces(kube, names)


# ---------------------------------------------------------------------------------------------
# Scale: one GitSync of many objects


def scale(kube, repo):
    per_file = 100
    for f in range(SCALE // per_file):
        docs = [f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{f * per_file + i}\ndata:\n  value: \"{f * per_file + i}\"\n"
                for i in range(per_file)]
        repo.write(f"scale/cm-{f:03d}.yaml", "---\n".join(docs))
    sha = repo.commit(f"scale: {SCALE} ConfigMaps")
    ns = "ks-scale"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    op = start_operator(os.path.join(OUT, "operator-cache-scale"), free_port())
    path = f"/apis/kommit.dev/v1alpha1/namespaces/{ns}/gitsyncs"
    one = f"{path}/scale"
    try:
        def wait_one(done, what):
            start = time.monotonic()
            while not done(kube.get(one)):
                if time.monotonic() - start > TIMEOUT:
                    raise TimeoutError(what)
                op.check()
                time.sleep(0.05)

        def applied(sha):
            return lambda o: (o.get("status") or {}).get("lastAppliedCommit") == sha and condition(o) == "True"

        before = kube.requests_total()
        start = time.monotonic()
        kube.create(path, {"apiVersion": "kommit.dev/v1alpha1", "kind": "GitSync", "metadata": {"name": "scale", "namespace": ns},
                           "spec": {"repo": repo.url, "path": "scale", "interval": INTERVAL, "prune": True}})
        wait_one(applied(sha), "scale first sync")
        record("kommit", "scale", SCALE, time.monotonic() - start, op.peak_mib(), kube.requests_total() - before, kube=kube)

        times = []
        before = kube.requests_total()
        for _ in range(RUNS):
            tag = now_tag()
            start = time.monotonic()
            annotate(kube, [one], "kommit.dev/reconcile-requested-at", tag)
            wait_one(lambda o: (o.get("status") or {}).get("lastHandledReconcileAt") == tag and condition(o) == "True", "scale no-op")
            times.append(time.monotonic() - start)
        record("kommit", "scale-noop", SCALE, median(times), op.peak_mib(), (kube.requests_total() - before) / RUNS, kube=kube)

        times = []
        before = kube.requests_total()
        for r in range(RUNS):
            repo.write("scale/cm-000.yaml", open(repo.path("scale/cm-000.yaml")).read().replace('value: "0"\n', f'value: "0-r{r}"\n', 1)
                       if r == 0 else open(repo.path("scale/cm-000.yaml")).read().replace(f'value: "0-r{r - 1}"', f'value: "0-r{r}"', 1))
            sha = repo.commit(f"scale: change cm-0 (r{r})")
            start = time.monotonic()
            annotate(kube, [one], "kommit.dev/reconcile-requested-at", now_tag())
            wait_one(applied(sha), "scale change")
            times.append(time.monotonic() - start)
        record("kommit", "scale-change", SCALE, median(times), op.peak_mib(), (kube.requests_total() - before) / RUNS, kube=kube)
        say(f"kommit operator (scale): peak {op.peak_mib():.0f} MiB, now {op.rss_mib():.0f} MiB")
    finally:
        op.stop()
        write_results()


# ---------------------------------------------------------------------------------------------


def markdown(sizes, vers):
    rows = ["| N | scenario | kommit | kapp | Flux | Flux tuned | kapp ÷ kommit | Flux ÷ kommit | Flux tuned ÷ kommit |",
            "|---|---|---|---|---|---|---|---|---|"]

    def cell(tool, scenario, n):
        v = memo.get((tool, scenario, n))
        if not v:
            return "–"
        return f"{v[1]:.0f} MiB" if scenario.endswith("memory") else f"{v[0]:.2f} s"

    def ratio(tool, scenario, n):
        for r in results["ratios"]:
            if (r["peer"], r["scenario"], r["n"]) == (tool, scenario, n):
                return f"{r['ratio']:.1f}×"
        return "–"

    for n in sizes:
        for scenario in ("diff", "noop", "commit-to-healthy", "memory"):
            rows.append(f"| {n} | {scenario} | {cell('kommit', scenario, n)} | {cell('kapp', scenario, n)} | {cell('flux', scenario, n)} | "
                        f"{cell('flux-tuned', scenario, n)} | {ratio('kapp', scenario, n)} | {ratio('flux', scenario, n)} | {ratio('flux-tuned', scenario, n)} |")
    rows.append("")
    rows.append("| fleet / scale | kommit | Flux | Flux ÷ kommit |")
    rows.append("|---|---|---|---|")
    flux_name = "flux-tuned" if any(k[0] == "flux-tuned" and k[1].startswith("fleet") for k in memo) else "flux"
    for scenario, n in (("fleet", FLEET), ("fleet-noop", FLEET), ("fleet-commit", FLEET), ("fleet-memory", FLEET),
                        ("fleet-steady", FLEET), ("scale", SCALE), ("scale-noop", SCALE), ("scale-change", SCALE)):
        def c(tool):
            v = memo.get((tool, scenario, n))
            if not v:
                return "–"
            if scenario in ("fleet-memory", "fleet-steady"):
                return f"{v[1]:.0f} MiB"
            return f"{v[0]:.2f} s" + (f" (peak {v[1]:.0f} MiB)" if v[1] is not None else "")
        k, f = memo.get(("kommit", scenario, n)), memo.get((flux_name, scenario, n))
        r = "–"
        if k and f:
            idx = 1 if scenario in ("fleet-memory", "fleet-steady") else 0
            if k[idx] and f[idx] is not None:
                r = f"{f[idx] / k[idx]:.1f}×"
        rows.append(f"| {scenario} (n={n}) | {c('kommit')} | {c(flux_name)} | {r} |")
    rows.append("")
    rows.append("| tool | scenario | n | API requests (per run) | per second |")
    rows.append("|---|---|---|---|---|")
    for r in requests:
        rate = f"{r['requests'] / r['seconds']:.0f}" if r["seconds"] else "–"
        rows.append(f"| {r['tool']} | {r['scenario']} | {r['n']} | {r['requests']} | {rate} |")
    rows.append("")
    rows.append(f"Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}; kommit {subprocess.check_output(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], text=True).strip()} (release). "
                f"Machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB; "
                f"medians of {RUNS} runs; Flux fleet on {flux_name}.")
    text = "\n".join(rows) + "\n"
    with open(os.path.join(OUT, "peers.md"), "w") as f:
        f.write(text)
    return text


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [1000]
    os.makedirs(OUT, exist_ok=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),) * 2)
    kube = Kube(KUBECONFIG)
    vers = versions()
    # BENCH_MERGE=1: keep the figures of an earlier invocation (other phases) in the results.
    memo_file = os.path.join(OUT, "peers-memo.json")
    if os.environ.get("BENCH_MERGE") and os.path.exists(memo_file):
        for k, v in json.load(open(memo_file)):
            memo[tuple(k)] = tuple(v)
        old = os.path.join(OUT, "peers.json")
        if os.path.exists(old):
            results["kommit"] = json.load(open(old)).get("kommit", [])
        if os.path.exists(os.path.join(OUT, "peers-requests.json")):
            requests.extend(json.load(open(os.path.join(OUT, "peers-requests.json"))))
    for name in ("source-controller", "kustomize-controller"):
        kubectl("apply", "--server-side", "-f", peer(name, "crds"))
    kubectl("apply", "--server-side", "-f", "-", input=subprocess.check_output([KOMMIT, "crd"], text=True))
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "flux-system"}})
    # One run's objects do not carry over: the bench namespaces start empty.
    stale = [o["metadata"]["name"] for o in kube.items("/api/v1/namespaces")
             if o["metadata"]["name"].startswith(("peers-", "kf-", "ff-", "ks-"))]
    if stale:
        say(f"deleting {len(stale)} namespaces of an earlier run")
        delete_namespaces(kube, stale)
    shutil.rmtree(os.path.join(OUT, "flux-storage"), ignore_errors=True)
    if os.path.exists(os.path.join(OUT, "requests-detail.txt")):
        os.remove(os.path.join(OUT, "requests-detail.txt"))
    port = serve_git(os.path.join(OUT, "git"))
    repo = Repo(OUT, port)
    repo.write("README.md", "kommit bench\n")
    repo.commit("start")
    if "single" in PHASES:
        single(kube, repo, sizes)
    if "fleet" in PHASES:
        fleet_kommit(kube, repo)
    if "flux-fleet" in PHASES:
        fleet_flux(kube, repo, os.environ.get("BENCH_FLEET_FLUX", "tuned") == "tuned")
    if "scale" in PHASES:
        scale(kube, repo)
    write_results()
    print(markdown(sizes, vers))


if __name__ == "__main__":
    main()
