"""Proves that .ci/k8s-lint's checks can fail: breaks a copy of the manifests (or
of the code they depend on) in one way at a time, and requires each breakage to
be reported with the expected message. A check that stops firing, say because
a refactor made its condition always true, fails CI here.

Usage: selftest.py REPO_ROOT KUBERNETES_VERSION YAMLLINT_CONFIG [--show]
(--show prints, for each breakage, the message that reported it).
"""

import os
import shutil
import sys
import tempfile

from yamllint import config as ylconfig
from yamllint import linter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check  # noqa: E402

ROOT, VERSION, YL = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3]
SHOW = "--show" in sys.argv[4:]

# (what the breakage is, file, text to replace (first occurrence), replacement,
#  a piece of the message that must be reported)
K = "api/deploy/k8s/"
BREAKAGES = [
    ("a misspelt core field", K + "api.yaml", "livenessProbe:", "livenesProbe:", "'livenesProbe' was unexpected"),
    (
        "a misspelt apiVersion",
        K + "api.yaml",
        "apiVersion: apps/v1",
        "apiVersion: app/v1",
        "no schema for app/v1 Deployment",
    ),
    (
        "a duplicated key",
        K + "api.yaml",
        "imagePullPolicy: IfNotPresent",
        "imagePullPolicy: IfNotPresent\n          imagePullPolicy: Always",
        "duplication of key",
    ),
    (
        "a misspelt KEDA trigger field",
        K + "enrich.yaml",
        'lagCount: "1000"',
        'lagCont: "1000"',
        "'lagCont' is not one of",
    ),
    (
        "a KEDA trigger value that is not a string",
        K + "enrich.yaml",
        'lagCount: "1000"',
        "lagCount: 1000",
        "1000 is not of type 'string'",
    ),
    (
        "lag and pending entries together",
        K + "enrich.yaml",
        'lagCount: "1000"',
        'lagCount: "1000"\n        pendingEntriesCount: "10"',
        "should not be valid under",
    ),
    (
        "the wrong consumer group",
        K + "enrich.yaml",
        "consumerGroup: enrich",
        "consumerGroup: enrichers",
        "consumerGroup must be 'enrich'",
    ),
    (
        "a single-Redis trigger while TG_REDIS_CLUSTER is on",
        K + "enrich.yaml",
        "type: redis-cluster-streams",
        "type: redis-streams",
        "type must be redis-cluster-streams",
    ),
    (
        "more shards than triggers",
        K + "config.yaml",
        'TG_SHARDS: "4"',
        'TG_SHARDS: "8"',
        "needs one trigger per shard stream of TG_SHARDS=8",
    ),
    (
        "KEDA's Redis nodes differing from tickgraph's",
        K + "config.yaml",
        "redis-cluster-2.redis-cluster:6379\n",
        "redis-cluster-9.redis-cluster:6379\n",
        "is not TG_REDIS_URL's nodes",
    ),
    (
        "replicas on a KEDA-scaled Deployment",
        K + "enrich.yaml",
        "spec:\n  strategy:",
        "spec:\n  replicas: 2\n  strategy:",
        "sets spec.replicas",
    ),
    (
        "a misspelt TG_ variable",
        K + "api.yaml",
        "name: TG_API_LISTEN",
        "name: TG_API_LISTN",
        "TG_API_LISTN is not an environment variable of `tickgraph api`",
    ),
    (
        "another component's variable",
        K + "ingest.yaml",
        "name: TG_SPOOL_FSYNC",
        "name: TG_RAW_TRIM",
        "TG_RAW_TRIM is not an environment variable of `tickgraph ingest` (only all, enrich take it)",
    ),
    (
        "a flag renamed in the code",
        "api/src/main.rs",
        'env = "TG_INGEST_LISTEN"',
        'env = "TG_INGEST_ADDR"',
        "TG_INGEST_LISTEN is not an environment variable of `tickgraph ingest`",
    ),
    (
        "a pending name that has landed",
        ".ci/k8s/pending-env.txt",
        "# against the real name and scope.\n",
        "# against the real name and scope.\nTG_SHARDS global\n",
        "TG_SHARDS is now accepted by tickgraph",
    ),
    (
        "a misspelt flag",
        K + "enrich.yaml",
        'args: ["enrich"]',
        'args: ["enrich", "--enrich-bach", "50"]',
        "--enrich-bach is not a flag of `tickgraph enrich`",
    ),
    ("a listener on loopback", K + "api.yaml", '"0.0.0.0:8080"', '"127.0.0.1:8080"', "listens on loopback only"),
    (
        "a listener left at its default",
        K + "load.yaml",
        '            - name: TG_LOAD_METRICS_LISTEN\n              value: "0.0.0.0:8083"\n',
        "",
        "TG_LOAD_METRICS_LISTEN is not set",
    ),
    (
        "a probe on a port the container does not have",
        K + "api.yaml",
        "path: /readyz\n              port: http",
        "path: /readyz\n              port: 9090",
        "readinessProbe port 9090",
    ),
    (
        "liveness on /readyz",
        K + "enrich.yaml",
        "path: /healthz\n              port: metrics\n            periodSeconds: 10",
        "path: /readyz\n              port: metrics\n            periodSeconds: 10",
        "livenessProbe path must be /healthz",
    ),
    (
        "a missing limit",
        K + "api.yaml",
        'limits:\n              cpu: "2"\n',
        "limits:\n",
        "resources.limits.cpu missing",
    ),
    (
        "a root-capable container",
        K + "api.yaml",
        "allowPrivilegeEscalation: false",
        "allowPrivilegeEscalation: true",
        "allowPrivilegeEscalation must be false",
    ),
    (
        "a writable root filesystem",
        K + "enrich.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
        "readOnlyRootFilesystem must be true",
    ),
    (
        "a grace period shorter than the COPY",
        K + "load.yaml",
        "terminationGracePeriodSeconds: 75",
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds 30 is below the drain",
    ),
    (
        "the api's drain lengthened in the code",
        "api/src/http.rs",
        "Duration::from_secs(10);",
        "Duration::from_secs(60);",
        "terminationGracePeriodSeconds 30 is below the drain on SIGTERM: preStop 5 s + DRAIN_GRACE 60 s",
    ),
    (
        "the spool on an emptyDir",
        K + "ingest.yaml",
        "      volumes:\n        - name: producers",
        "      volumes:\n        - name: scratch\n          emptyDir: {}\n        - name: producers",
        None,
    ),
    (
        "the spool off every volume",
        K + "ingest.yaml",
        "value: /var/lib/tickgraph/spool",
        "value: /tmp/spool",
        "the spool (/tmp/spool) must be on a mounted volume",
    ),
    (
        "a spool larger than its claim",
        K + "ingest.yaml",
        'value: "1073741824"',
        'value: "4294967296"',
        "must be below the claim's 2Gi",
    ),
    (
        "a Service port the pods lack",
        K + "api.yaml",
        "port: 8080\n      targetPort: http",
        "port: 8080\n      targetPort: graphql",
        "targetPort graphql is no containerPort",
    ),
    (
        "a budget selecting nothing",
        K + "api.yaml",
        "  maxUnavailable: 1\n  unhealthyPodEvictionPolicy: AlwaysAllow\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: tickgraph\n      app.kubernetes.io/component: api",
        "  maxUnavailable: 1\n  unhealthyPodEvictionPolicy: AlwaysAllow\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: tickgraph\n      app.kubernetes.io/component: apii",
        "needs exactly one PodDisruptionBudget",
    ),
    (
        "a manifest left out of the kustomization",
        K + "kustomization.yaml",
        "  - load.yaml\n",
        "",
        "load.yaml is not in resources",
    ),
]
# The emptyDir case needs the spool mounted from it too: a second edit.
EXTRA = {
    "the spool on an emptyDir": [
        (
            K + "ingest.yaml",
            "            - name: spool\n              mountPath: /var/lib/tickgraph",
            "            - name: scratch\n              mountPath: /var/lib/tickgraph",
        ),
    ],
}
EXPECT_EXTRA = {"the spool on an emptyDir": "the spool is on volume scratch, which is not a PersistentVolumeClaim"}

COPY = ["api/src", "api/deploy/k8s", "ingest/src/stream.rs", "enrich/src", ".ci/k8s"]


def lint(tree, yaml_files):
    """check.py's findings, and yamllint's on `yaml_files` (those edited)."""
    found, _ = check.check(tree, VERSION)
    conf = ylconfig.YamlLintConfig(file=YL)
    for path in yaml_files:
        with open(path) as f:
            for p in linter.run(f, conf):
                found.append(f"{os.path.basename(path)}:{p.line}: yamllint {p.message}")
    return found


def main():
    tmp = tempfile.mkdtemp(prefix="tg-k8s-selftest-")
    try:
        for part in COPY:
            src, dst = os.path.join(ROOT, part), os.path.join(tmp, part)
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
        k8s = os.path.join(tmp, "api/deploy/k8s")
        clean = lint(tmp, [os.path.join(k8s, n) for n in sorted(os.listdir(k8s))])
        if clean:
            print("selftest: the unbroken copy does not pass:", *clean, sep="\n  ")
            return 1
        failures = 0
        for what, path, old, new, expect in BREAKAGES:
            expect = expect or EXPECT_EXTRA[what]
            edits = [(path, old, new)] + EXTRA.get(what, [])
            saved = {}
            for p, o, n in edits:
                full = os.path.join(tmp, p)
                saved.setdefault(full, open(full).read())
                text = open(full).read()
                if o not in text:
                    print(f"selftest: {what}: {p} no longer contains {o!r}; update .ci/k8s/selftest.py")
                    failures += 1
                    break
                with open(full, "w") as f:
                    f.write(text.replace(o, n, 1))
            else:
                found = lint(tmp, [f for f in saved if f.endswith(".yaml")])
                hits = [e for e in found if expect in e]
                if not hits:
                    failures += 1
                    print(f"selftest: {what}: not reported (wanted {expect!r}); got:", *found, sep="\n  ")
                elif SHOW:
                    print(f"{what}:\n  {hits[0]}")
            for full, text in saved.items():
                with open(full, "w") as f:
                    f.write(text)
        print(f"k8s-lint selftest: {len(BREAKAGES) - failures} of {len(BREAKAGES)} deliberate breakages caught")
        return 1 if failures else 0
    finally:
        shutil.rmtree(tmp)


sys.exit(main())
