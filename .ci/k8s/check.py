"""Offline checks of the Kubernetes manifests in api/deploy/k8s (run by .ci/k8s-lint).

1. Schemas. Core kinds against the Kubernetes OpenAPI schemas that
   kubernetes-validate bundles, strict (an unknown field is an error) and pinned
   to one Kubernetes version; a kind with no schema is an error, not the
   warning kubernetes-validate gives. KEDA ScaledObjects against
   keda-scaledobject.schema.json beside this file; the kustomization must list
   every manifest.
2. tickgraph's own contract, read from the code so that the manifests fail when
   the code changes under them: every TG_ variable a container gets (env and
   envFrom) must be one that the container's subcommand accepts (parsed from the
   clap structs in api/src), or be listed in pending-env.txt; every `--flag`
   likewise; listeners bound off loopback on a declared port; probes on that
   port; the spool on a persistent volume; grace periods at least the drain the
   shutdown code does; one KEDA trigger per shard stream, for the right group.
3. Policy: requests and limits, liveness and readiness probes, the "restricted"
   security context, spread and a PodDisruptionBudget per workload, Services
   and budgets that select something.

Usage: check.py REPO_ROOT KUBERNETES_VERSION (selftest.py imports check()).
"""

import ast
import functools
import glob
import json
import os
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

# Set by check(): the tree being checked.
ROOT = MANIFESTS = K8S_VERSION = None

# kubernetes-validate reads its schema files again for every object; they never
# change, and the self-test checks the manifests many times over.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)

# libyaml's parser when PyYAML has it: the pure-Python one is most of the run time.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

errors = []


def error(where, msg):
    errors.append(f"{where}: {msg}")


def rel(path):
    return os.path.relpath(path, ROOT)


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


# ---------------------------------------------------------------------------
# What the code accepts: clap's derive structs in api/src.
# ---------------------------------------------------------------------------


def scan_block(src, start):
    """Index just past the `}` closing the `{` at `start`, skipping strings."""
    depth, i, n = 0, start, len(src)
    while i < n:
        c = src[i]
        if c == '"':
            i += 1
            while i < n and src[i] != '"':
                i += 2 if src[i] == "\\" else 1
        elif c == "'" and i + 2 < n and (src[i + 2] == "'" or src[i + 1] == "\\"):
            i = src.index("'", i + 2 + (src[i + 1] == "\\"))
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced braces")


def split_items(body):
    """Splits a struct or enum body at top-level commas (attributes included)."""
    items, depth, angle, cur, i, n = [], 0, 0, [], 0, len(body)
    while i < n:
        c = body[i]
        if c == '"':
            j = i + 1
            while j < n and body[j] != '"':
                j += 2 if body[j] == "\\" else 1
            cur.append(body[i : j + 1])
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c == "<":
            angle += 1
        elif depth == 0 and c == ">":
            angle -= 1
        if c == "," and depth == 0 and angle == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [it.strip() for it in items if it.strip()]


def attributes(item):
    """(attribute texts, the declaration after them)."""
    attrs, i = [], 0
    while True:
        while i < len(item) and item[i].isspace():
            i += 1
        if not item.startswith("#[", i):
            return attrs, item[i:].strip()
        depth, j = 0, i + 1
        while True:
            if item[j] == "[":
                depth += 1
            elif item[j] == "]":
                depth -= 1
                if depth == 0:
                    break
            elif item[j] == '"':
                j += 1
                while item[j] != '"':
                    j += 2 if item[j] == "\\" else 1
            j += 1
        attrs.append(item[i + 2 : j].strip())
        i = j + 1


def base_type(t):
    t = t.strip()
    m = re.fullmatch(r"(?:Box|Option)<(.+)>", t)
    if m:
        t = m.group(1)
    return t.split("::")[-1].strip()


def kebab(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def parse_rust(src):
    """Structs (name -> items) and enums (name -> items) of one source file."""
    src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith("//"))
    structs, enums = {}, {}
    for m in re.finditer(r"\b(struct|enum)\s+(\w+)\s*(?:<[^>{]*>)?\s*\{", src):
        open_at = m.end() - 1
        body = src[open_at + 1 : scan_block(src, open_at) - 1]
        (structs if m.group(1) == "struct" else enums)[m.group(2)] = split_items(body)
    return structs, enums


class Cli:
    def __init__(self):
        self.structs, self.enums = {}, {}
        # main.rs first: its names win over a same-named struct elsewhere.
        files = [os.path.join(ROOT, "api/src/main.rs")] + sorted(
            glob.glob(os.path.join(ROOT, "api/src/**/*.rs"), recursive=True)
        )
        for path in files:
            with open(path) as f:
                structs, enums = parse_rust(f.read())
            for k, v in structs.items():
                self.structs.setdefault(k, v)
            for k, v in enums.items():
                self.enums.setdefault(k, v)
        self.subcommands = {}
        for item in self.enums.get("Command", []):
            attrs, decl = attributes(item)
            m = re.fullmatch(r"(\w+)\s*(?:\((.*)\))?", decl, re.S)
            if not m:
                continue
            name = kebab(m.group(1))
            for a in attrs:
                n = re.search(r'\bname\s*=\s*"([^"]+)"', a)
                if a.startswith("command") and n:
                    name = n.group(1)
            self.subcommands[name] = base_type(m.group(2)) if m.group(2) else None
        self.top = self.collect("Cli")

    def collect(self, struct, seen=()):
        """{env: {"default": str|None}} and the set of long flags of a struct."""
        if struct in seen:
            return {}, set()
        if struct not in self.structs:
            raise KeyError(struct)
        envs, flags = {}, set()
        for item in self.structs[struct]:
            attrs, decl = attributes(item)
            m = re.fullmatch(r"(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*(.+)", decl, re.S)
            if not m:
                continue
            field, ftype = m.group(1), m.group(2)
            for a in attrs:
                if a.startswith("command") and re.search(r"\bflatten\b", a):
                    e, f = self.collect(base_type(ftype), seen + (struct,))
                    envs.update(e)
                    flags |= f
                elif a.startswith("arg"):
                    long = re.search(r'\blong\s*=\s*"([^"]+)"', a)
                    if long:
                        flags.add("--" + long.group(1))
                    elif re.search(r"\blong\b", a):
                        flags.add("--" + field.replace("_", "-"))
                    env = re.search(r'\benv\s*=\s*"([^"]+)"', a)
                    if env:
                        d = re.search(r"\bdefault_value_t\s*=\s*([^,]+?)\s*(?:,|\)$)", a) or re.search(
                            r'\bdefault_value\s*=\s*"([^"]*)"', a
                        )
                        envs[env.group(1)] = {"default": d.group(1).strip() if d else None}
        return envs, flags

    def accepts(self, sub):
        """Env vars and flags `tickgraph <sub>` takes, or None for no such subcommand."""
        if sub not in self.subcommands:
            return None
        envs, flags = dict(self.top[0]), set(self.top[1])
        t = self.subcommands[sub]
        if t:
            e, f = self.collect(t)
            envs.update(e)
            flags |= f
        return envs, flags


def rust_int(expr):
    """Value of a default like `30_000`, `1 << 30` or `16 * 1024 * 1024`."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp):
            ops = {ast.LShift: lambda a, b: a << b, ast.Mult: lambda a, b: a * b, ast.Add: lambda a, b: a + b}
            if type(node.op) in ops:
                return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(expr)

    return ev(ast.parse(expr.replace("_", ""), mode="eval").body)


def code_const(path, pattern, what):
    m = re.search(pattern, read(path))
    if not m:
        error(path, f"cannot find {what}; the shutdown code changed: update .ci/k8s/check.py and the grace periods")
        return None
    return m.group(1)


@functools.lru_cache(maxsize=None)
def _core_schema_problems(doc_json, version):
    d = json.loads(doc_json)
    try:
        kv.validate(d, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top)"
        return (f"Kubernetes {version} schema: {path}: {e.message}",)
    except kv.SchemaNotFoundError:
        return (
            f"no schema for {d.get('apiVersion')} {d.get('kind')} in Kubernetes {version}: "
            "a typo, a removed API, or a custom resource without a schema in .ci/k8s",
        )
    return ()


def core_schema_problems(d, version):
    """What kubernetes-validate (strict) finds wrong with an object; remembered
    per object, since the self-test checks mostly unchanged objects again."""
    return _core_schema_problems(json.dumps(d, sort_keys=True), version)


def secs(v):
    return int(v) if v is not None else None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity(q):
    """CPU cores or bytes of a Kubernetes quantity."""
    q = str(q)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", q)
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(q)
    return float(m.group(1)) * units.get(m.group(2), 1)


def host_port(value):
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", value or "")
    return (m.group(1), int(m.group(2))) if m else (None, None)


def redis_seeds(url_list):
    """host:port of each redis:// URL in a comma-separated list."""
    out = []
    for u in url_list.split(","):
        m = re.fullmatch(r"\s*rediss?://(?:[^@/]*@)?([^/:]+)(?::(\d+))?(?:/.*)?\s*", u)
        out.append(f"{m.group(1)}:{m.group(2) or 6379}" if m else f"<unparsed {u.strip()}>")
    return out


def subcommand(c):
    args = list(c.get("command", [])[1:]) + list(c.get("args", []))
    return (args[0] if args else None), args[1:]


def check(root, version):
    """Every problem found in the tree at `root`, as `where: what` lines, and a
    one-line summary."""
    global ROOT, MANIFESTS, K8S_VERSION
    ROOT = os.path.abspath(root)
    MANIFESTS, K8S_VERSION = os.path.join(ROOT, "api", "deploy", "k8s"), version
    errors.clear()
    try:
        CLI = Cli()
        sane = (
            CLI.accepts("ingest")
            and "TG_INGEST_LISTEN" in CLI.accepts("ingest")[0]
            and "TG_REDIS_URL" in CLI.top[0]
            and "--metrics-listen" in CLI.accepts("enrich")[1]
        )
        if not sane:
            error("api/src/main.rs", "the clap parser in .ci/k8s/check.py no longer finds the known flags; update it")
    except (KeyError, ValueError, IndexError) as e:
        error("api/src/main.rs", f"cannot read the clap structs ({e!r}); update .ci/k8s/check.py")
        CLI = None

    ALL_ENVS = set()
    for sub in CLI.subcommands if CLI else ():
        try:
            ALL_ENVS |= set(CLI.accepts(sub)[0])
        except KeyError:
            pass  # a subcommand whose Args are not in api/src; no manifest runs one

    PENDING = {}
    with open(os.path.join(ROOT, ".ci/k8s/pending-env.txt")) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if len(line.split()) < 2:
                error(f".ci/k8s/pending-env.txt:{n}", "expected NAME SCOPE")
                continue
            name, scope = line.split()[:2]
            PENDING[name] = "global" if scope == "global" else set(scope.split(","))
            if name in ALL_ENVS:
                error(
                    f".ci/k8s/pending-env.txt:{n}",
                    f"{name} is now accepted by tickgraph: delete this line, so the manifests are checked against the real flag",
                )

    GROUPS = {
        "enrich": code_const("ingest/src/stream.rs", r'ENRICH_GROUP: &str = "([^"]+)"', "ENRICH_GROUP"),
        "load": code_const("ingest/src/stream.rs", r'LOAD_GROUP: &str = "([^"]+)"', "LOAD_GROUP"),
    }
    for kind in ("raw", "enriched"):
        if f'format!("{{}}:{kind}:{{{{{{shard}}}}}}", self.prefix)' not in read("ingest/src/stream.rs"):
            error(
                "ingest/src/stream.rs",
                f"the {kind} stream key is no longer <prefix>:{kind}:{{<shard>}}; update the ScaledObjects and check.py",
            )

    SHUTDOWN = {
        "drain_grace": secs(
            code_const("api/src/http.rs", r"DRAIN_GRACE: Duration = Duration::from_secs\((\d+)\)", "DRAIN_GRACE")
        ),
        "write_timeout": secs(
            code_const(
                "enrich/src/consumer.rs", r"WRITE_TIMEOUT: Duration = Duration::from_secs\((\d+)\)", "WRITE_TIMEOUT"
            )
        ),
        "enrich_block": secs(
            code_const("enrich/src/worker.rs", r"block: Duration::from_secs\((\d+)\)", "enrich's block")
        ),
        "load_block": secs(
            code_const("enrich/src/loader.rs", r"block: Duration::from_secs\((\d+)\)", "the loader's block")
        ),
    }

    # ---------------------------------------------------------------------------
    # The manifests.
    # ---------------------------------------------------------------------------

    docs = []  # (where, doc)
    files = sorted(glob.glob(os.path.join(MANIFESTS, "*.yaml")))
    kustomization = None
    for path in files:
        with open(path) as f:
            try:
                loaded = [d for d in yaml.load_all(f, Loader=LOADER) if d is not None]
            except yaml.YAMLError as e:
                error(rel(path), f"not YAML: {e}")
                continue
        for i, d in enumerate(loaded):
            if not isinstance(d, dict):
                error(f"{rel(path)}#{i}", "not a mapping")
                continue
            where = f"{rel(path)} {d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
            if d.get("kind") == "Kustomization":
                kustomization = (rel(path), path, d)
            else:
                docs.append((where, d))

    # Schemas.
    with open(os.path.join(ROOT, ".ci/k8s/keda-scaledobject.schema.json")) as f:
        SO_SCHEMA = json.load(f)
    jsonschema.Draft202012Validator.check_schema(SO_SCHEMA)
    so_validator = jsonschema.Draft202012Validator(SO_SCHEMA)
    for where, d in docs:
        if (d.get("apiVersion"), d.get("kind")) == ("keda.sh/v1alpha1", "ScaledObject"):
            for e in sorted(so_validator.iter_errors(d), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in e.absolute_path) or "(top)"
                error(where, f"ScaledObject schema: {path}: {e.message}")
            continue
        for problem in core_schema_problems(d, K8S_VERSION):
            error(where, problem)

    if kustomization is None:
        error(rel(MANIFESTS), "no kustomization.yaml")
    else:
        where, path, k = kustomization
        if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
            error(where, "apiVersion must be kustomize.config.k8s.io/v1beta1")
        unknown = set(k) - {"apiVersion", "kind", "resources", "images", "labels", "namespace"}
        if unknown:
            error(where, f"fields this check does not know: {sorted(unknown)}")
        listed = k.get("resources") or []
        want = sorted(os.path.basename(p) for p in files if p != path)
        for r in listed:
            if r not in want:
                error(where, f"resources lists {r}, which is not a manifest here")
        for w in want:
            if w not in listed:
                error(where, f"{w} is not in resources: `kubectl apply -k` would skip it")

    by_kind = {}
    for where, d in docs:
        by_kind.setdefault(d.get("kind"), []).append((where, d))

    namespaces = [d["metadata"]["name"] for _, d in by_kind.get("Namespace", [])]
    if len(namespaces) != 1:
        error(rel(MANIFESTS), f"expected one Namespace, found {namespaces}")
    for where, d in docs:
        if d.get("kind") != "Namespace" and namespaces and d.get("metadata", {}).get("namespace") != namespaces[0]:
            error(where, f"metadata.namespace must be {namespaces[0]}")

    configmaps = {d["metadata"]["name"]: d.get("data") or {} for _, d in by_kind.get("ConfigMap", [])}

    workloads = []  # (where, kind, doc, pod spec, pod labels)
    for kind in ("Deployment", "StatefulSet", "Job"):
        for where, d in by_kind.get(kind, []):
            tmpl = d.get("spec", {}).get("template", {})
            workloads.append((where, kind, d, tmpl.get("spec", {}), tmpl.get("metadata", {}).get("labels", {})))

    def container_env(where, c):
        """{name: value or None (from a Secret or the downward API)} as the container sees it."""
        env = {}
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef")
            if ref:
                if ref.get("name") not in configmaps:
                    error(where, f"envFrom ConfigMap {ref.get('name')} is not among the manifests")
                for k, v in configmaps.get(ref.get("name"), {}).items():
                    env[k] = v
        for e in c.get("env", []):
            env[e["name"]] = e.get("value")
        return env

    images = set()
    container_info = {}  # workload name -> (container, sub, env)
    for where, kind, d, pod, labels in workloads:
        long_running = kind in ("Deployment", "StatefulSet")
        name = d["metadata"]["name"]
        psc = pod.get("securityContext", {})
        mounts_volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in d.get("spec", {}).get("volumeClaimTemplates", [])}
        claim_sizes = {
            t["metadata"]["name"]: t.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
            for t in d.get("spec", {}).get("volumeClaimTemplates", [])
        }
        if pod.get("automountServiceAccountToken") is not False:
            error(where, "automountServiceAccountToken must be false: tickgraph never calls the Kubernetes API")
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            cw = f"{where} container {c.get('name')}"
            images.add(c.get("image"))
            if not c.get("image") or ":" not in c["image"] or c["image"].endswith(":latest"):
                error(cw, "image needs a fixed tag")

            # Resources.
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(part, {}):
                        error(cw, f"resources.{part}.{r} missing")
            for r in ("cpu", "memory"):
                try:
                    if r in res.get("requests", {}) and r in res.get("limits", {}):
                        if quantity(res["requests"][r]) > quantity(res["limits"][r]):
                            error(cw, f"{r} request above its limit")
                except ValueError as e:
                    error(cw, f"cannot read quantity {e}")

            # Security context ("restricted" plus a read-only root).
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False:
                error(cw, "securityContext.allowPrivilegeEscalation must be false")
            if csc.get("readOnlyRootFilesystem") is not True:
                error(cw, "securityContext.readOnlyRootFilesystem must be true (write to a mounted volume)")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                error(cw, "securityContext.capabilities.drop must include ALL")
            if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                error(cw, "runAsNonRoot must be true (pod or container)")
            if csc.get("runAsUser", psc.get("runAsUser")) in (None, 0):
                error(cw, "runAsUser must be set and not 0")
            seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
            if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
                error(cw, "seccompProfile.type must be RuntimeDefault (pod or container)")

            # The subcommand and what it accepts.
            sub, flags = subcommand(c)
            env = container_env(cw, c)
            accepted = CLI.accepts(sub) if CLI else None
            if CLI and accepted is None:
                error(cw, f"`tickgraph {sub}` is not a subcommand (api/src/main.rs: {sorted(CLI.subcommands)})")
            if not accepted:
                continue
            acc_envs, acc_flags = accepted
            container_info[name] = (c, sub, env)
            for n in sorted(env):
                if not n.startswith("TG_") or n in acc_envs:
                    continue
                p = PENDING.get(n)
                if p == "global" or (isinstance(p, set) and sub in p):
                    continue
                also = sorted(s for s in CLI.subcommands if CLI.accepts(s) and n in CLI.accepts(s)[0])
                hint = (
                    f" (only {', '.join(also)} take it)" if also else " (no subcommand takes it: renamed or removed?)"
                )
                error(cw, f"{n} is not an environment variable of `tickgraph {sub}`{hint}")
            for fl in flags:
                if fl.startswith("--") and fl.split("=", 1)[0] not in acc_flags:
                    error(cw, f"{fl.split('=', 1)[0]} is not a flag of `tickgraph {sub}`")

            def setting(var):
                """The value a variable has in this container, or the code's default."""
                if var in env:
                    return env[var]
                d = acc_envs.get(var, {}).get("default")
                return d.strip('"') if d else None

            # Files and directories must be on mounted volumes (the root is read-only).
            mounts = c.get("volumeMounts", [])

            def mount_of(path):
                best = None
                for m in mounts:
                    mp = m["mountPath"].rstrip("/")
                    if path == mp or path.startswith(mp + "/"):
                        if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                            best = m
                return best

            for var in sorted(env):
                if var.endswith("_FILE") or var in ("TG_PRODUCER_TOKENS", "TG_SPOOL_DIR"):
                    if env[var] is not None and mount_of(env[var]) is None:
                        error(cw, f"{var}={env[var]} is on no mounted volume")
            if sub in ("ingest", "all"):
                spool = setting("TG_SPOOL_DIR")
                m = mount_of(spool) if spool and spool.startswith("/") else None
                if m is None:
                    error(
                        cw,
                        f"the spool ({spool}) must be on a mounted volume: set TG_SPOOL_DIR to an absolute path there",
                    )
                else:
                    vol = mounts_volumes.get(m["name"], {})
                    if m.get("readOnly"):
                        error(cw, "the spool's volume is mounted read-only")
                    if m["name"] not in claim_templates and "persistentVolumeClaim" not in vol:
                        error(
                            cw,
                            f"the spool is on volume {m['name']}, which is not a PersistentVolumeClaim: "
                            "it holds events already acknowledged, which must outlive the pod (README: Deploying on Kubernetes)",
                        )
                    size = claim_sizes.get(m["name"])
                    try:
                        max_bytes = rust_int(str(setting("TG_SPOOL_MAX_BYTES")))
                        if size is not None and max_bytes >= quantity(size):
                            error(
                                cw,
                                f"TG_SPOOL_MAX_BYTES ({max_bytes}) must be below the claim's {size}, or the disk fills first",
                            )
                    except ValueError as e:
                        error(cw, f"cannot read TG_SPOOL_MAX_BYTES or the claim size ({e})")

            if not long_running:
                continue

            # Listeners, ports and probes.
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            listen_ports = set()
            for var in sorted(v for v in acc_envs if v.endswith("_LISTEN")):
                value = env.get(var)
                host, port = host_port(value)
                if value is None:
                    error(
                        cw,
                        f"{var} is not set: the default listens on 127.0.0.1, which the kubelet and Services cannot reach",
                    )
                    continue
                if port is None:
                    error(cw, f"{var}={value} is not host:port")
                    continue
                if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
                    error(cw, f"{var}={value} listens on loopback only")
                if port not in ports.values():
                    error(cw, f"{var} port {port} is not a containerPort ({sorted(ports.values())})")
                listen_ports.add(port)
            for probe, path in (
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
                ("startupProbe", "/healthz"),
            ):
                p = c.get(probe)
                if p is None:
                    if probe != "startupProbe":
                        error(cw, f"{probe} missing")
                    continue
                get = p.get("httpGet")
                if not get:
                    error(cw, f"{probe} must be an httpGet of {path}")
                    continue
                if get.get("path") != path:
                    error(cw, f"{probe} path must be {path}, not {get.get('path')}")
                port = get.get("port")
                number = ports.get(port) if isinstance(port, str) else port
                if number is None or number not in ports.values():
                    error(cw, f"{probe} port {port} is not a containerPort of the container")
                elif number not in listen_ports:
                    error(
                        cw, f"{probe} port {number} is not where tickgraph {sub} serves {path} ({sorted(listen_ports)})"
                    )
            ann = d["spec"]["template"].get("metadata", {}).get("annotations", {})
            if ann.get("prometheus.io/scrape") == "true":
                if ann.get("prometheus.io/path", "/metrics") != "/metrics":
                    error(cw, "prometheus.io/path must be /metrics")
                if (
                    not str(ann.get("prometheus.io/port", "")).isdigit()
                    or int(ann["prometheus.io/port"]) not in listen_ports
                ):
                    error(
                        cw,
                        f"prometheus.io/port {ann.get('prometheus.io/port')} is not a tickgraph listener ({sorted(listen_ports)})",
                    )
            else:
                error(cw, "no prometheus.io/scrape annotation: its /metrics would not be scraped")

            # Grace period: at least the drain the shutdown code does.
            pre_stop = 0
            cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if len(cmd) == 2 and cmd[0] == "sleep" and str(cmd[1]).isdigit():
                pre_stop = int(cmd[1])
            grace = pod.get("terminationGracePeriodSeconds", 30)
            s = SHUTDOWN
            try:
                if sub == "api":
                    need, why = (
                        pre_stop + s["drain_grace"] + 5,
                        f"preStop {pre_stop} s + DRAIN_GRACE {s['drain_grace']} s + 5",
                    )
                elif sub == "enrich":
                    need = s["enrich_block"] + 2 * s["write_timeout"] + 5
                    why = f"block {s['enrich_block']} s + read and commit timeouts 2 x {s['write_timeout']} s + 5"
                elif sub == "load":
                    stmt = rust_int(str(setting("TG_PG_STATEMENT_TIMEOUT_MS"))) // 1000
                    need = s["load_block"] + 2 * s["write_timeout"] + stmt + 5
                    why = f"block {s['load_block']} s + read and ack timeouts 2 x {s['write_timeout']} s + COPY {stmt} s + 5"
                elif sub == "ingest":
                    rt = rust_int(str(setting("TG_INGEST_REDIS_TIMEOUT_MS"))) / 1000
                    need = pre_stop + 2 * rt + 10
                    why = f"preStop {pre_stop} s + 2 rounds of --ingest-redis-timeout-ms {rt} s + 10 for the spool"
                else:
                    need, why = 0, ""
            except (TypeError, ValueError) as e:
                error(cw, f"cannot work out the drain time ({e})")
                need = 0
            if grace < need:
                error(cw, f"terminationGracePeriodSeconds {grace} is below the drain on SIGTERM: {why} = {need}")

    # One image for every component: they must agree on stream formats and shards.
    if len(images) > 1:
        error(rel(MANIFESTS), f"containers run different images: {sorted(images, key=str)}")

    # Spread, disruption budgets, Services.
    pdbs = by_kind.get("PodDisruptionBudget", [])
    for where, kind, d, pod, labels in workloads:
        if kind == "Job":
            continue
        tsc = pod.get("topologySpreadConstraints", [])
        anti = pod.get("affinity", {}).get("podAntiAffinity", {})
        terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
            t.get("podAffinityTerm", {}) for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ]
        spread = [t for t in tsc + terms if matches(t.get("labelSelector", {}).get("matchLabels", {}), labels)]
        if not spread:
            error(where, "no topologySpreadConstraints or podAntiAffinity selecting its own pods")
        selector = d["spec"].get("selector", {}).get("matchLabels", {})
        if not matches(selector, labels):
            error(where, "spec.selector does not match the pod template's labels")
        covering = [w for w, p in pdbs if matches(p["spec"].get("selector", {}).get("matchLabels", {}), labels)]
        if len(covering) != 1:
            error(where, f"needs exactly one PodDisruptionBudget selecting its pods, has {covering}")
    for where, p in pdbs:
        sel = p["spec"].get("selector", {}).get("matchLabels", {})
        if not any(matches(sel, l) for *_, l in workloads):
            error(where, "selects no workload's pods")
    services = {d["metadata"]["name"]: d for _, d in by_kind.get("Service", [])}
    for where, svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector", {})
        targets = [(w, pod) for w, k, d, pod, l in workloads if matches(sel, l)]
        if not targets:
            error(where, "selects no workload's pods")
        for w, pod in targets:
            cports = [p for c in pod.get("containers", []) for p in c.get("ports", [])]
            for sp in svc["spec"].get("ports", []):
                t = sp.get("targetPort", sp.get("port"))
                if not any(t in (p.get("name"), p["containerPort"]) for p in cports):
                    error(where, f"targetPort {t} is no containerPort of {w}")
    for where, kind, d, pod, labels in workloads:
        if kind == "StatefulSet":
            gov = services.get(d["spec"].get("serviceName"))
            if not gov or gov["spec"].get("clusterIP") != "None":
                error(
                    where, f"serviceName {d['spec'].get('serviceName')} must be a headless Service among the manifests"
                )

    # KEDA: one trigger per shard stream of the target's consumer group.
    for where, so in by_kind.get("ScaledObject", []):
        ref = so.get("spec", {}).get("scaleTargetRef", {})
        kind = ref.get("kind", "Deployment")
        target = next((d for w, k, d, *_ in workloads if k == kind and d["metadata"]["name"] == ref.get("name")), None)
        if target is None:
            error(where, f"scaleTargetRef {kind}/{ref.get('name')} is not among the manifests")
            continue
        if "replicas" in target["spec"]:
            error(where, f"{kind}/{ref.get('name')} sets spec.replicas: every apply would reset what KEDA scaled")
        if so["spec"].get("minReplicaCount", 0) < 1:
            error(
                where,
                "minReplicaCount must be at least 1: the running worker trims its streams and claims a dead one's entries",
            )
        info = container_info.get(target["metadata"]["name"])
        if not info:
            continue
        c, sub, env = info
        if ref.get("envSourceContainerName", target["spec"]["template"]["spec"]["containers"][0]["name"]) != c["name"]:
            error(where, "KEDA reads env from the first container unless envSourceContainerName says otherwise")
        if sub not in GROUPS:
            error(where, f"no rule for scaling `tickgraph {sub}` on a consumer group")
            continue
        acc_envs = CLI.accepts(sub)[0]

        def cfg(var, default):
            if var in env:
                return env[var]
            d = acc_envs.get(var, {}).get("default")
            return d.strip('"') if d else default

        shards = int(rust_int(str(cfg("TG_SHARDS", "1"))))
        prefix = cfg("TG_STREAM_PREFIX", "tg")
        kind_of_stream = "raw" if sub == "enrich" else "enriched"
        want = {f"{prefix}:{kind_of_stream}:{{{s}}}" for s in range(shards)}
        clustered = str(cfg("TG_REDIS_CLUSTER", "false")).lower() in ("true", "1", "yes", "on")
        want_type = "redis-cluster-streams" if clustered else "redis-streams"
        seeds = redis_seeds(cfg("TG_REDIS_URL", ""))
        got = []
        for i, t in enumerate(so["spec"].get("triggers", [])):
            tw = f"{where} trigger {i}"
            md = t.get("metadata", {})
            got.append(md.get("stream"))
            if t.get("type") != want_type:
                error(tw, f"type must be {want_type}: TG_REDIS_CLUSTER is {'on' if clustered else 'off'}")
            if md.get("consumerGroup") != GROUPS[sub]:
                error(tw, f"consumerGroup must be {GROUPS[sub]!r} (tickgraph {sub}'s group in ingest/src/stream.rs)")
            if "lagCount" not in md:
                error(
                    tw, "scale on lagCount: tickgraph acks as it commits, so pending entries do not grow with a backlog"
                )
            for key in ("addressesFromEnv", "addressFromEnv"):
                var = md.get(key)
                if var is None:
                    continue
                if var not in env or env[var] is None:
                    error(tw, f"{key} {var} is not an env var (with a value) of container {c['name']}")
                    continue
                addrs = [a.strip() for a in env[var].split(",")]
                if addrs != seeds[: len(addrs)] or (key == "addressesFromEnv" and addrs != seeds):
                    error(tw, f"{var} ({', '.join(addrs)}) is not TG_REDIS_URL's nodes ({', '.join(seeds)})")
            for key in ("addresses", "address", "hosts", "host"):
                if key in md:
                    error(
                        tw,
                        f"use addressesFromEnv/addressFromEnv, not {key}, so the Redis nodes are written once (tickgraph-config)",
                    )
        if sorted(got) != sorted(want) or len(got) != len(set(got)):
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            error(
                where,
                f"needs one trigger per shard stream of TG_SHARDS={shards}: missing {missing}, unexpected {extra}"
                + (", duplicates" if len(got) != len(set(got)) else ""),
            )

    objects = len(docs) + (kustomization is not None)
    if errors:
        return list(errors), f"k8s-lint: {len(errors)} error(s) in {objects} objects from {len(files)} files"
    names = ", ".join(sorted(os.path.basename(f) for f in files))
    return (
        [],
        f"k8s-lint: {objects} objects in {len(files)} files valid against Kubernetes {version} and tickgraph's flags ({names})",
    )


if __name__ == "__main__":
    found, summary = check(sys.argv[1], sys.argv[2])
    for e in found:
        print(f"ERROR {e}")
    print(summary)
    sys.exit(1 if found else 0)
