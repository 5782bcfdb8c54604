#!/usr/bin/env python3
"""Helpers of `make lint-deploy` (scripts/lint-deploy.sh) and of the KEDA manifests.

  deploytool.py scaledobjects [--namespace tickflow] [--partitions 16] [--redis-mode standalone]
      Prints k8s/base/keda.yaml: the TriggerAuthentication and the KEDA ScaledObjects of
      transform and analytics, one lag and one pending trigger per partition stream.
      With --redis-mode cluster, prints k8s/components/redis-cluster-mode/keda.yaml instead:
      the patch that swaps those triggers for `redis-cluster-streams` ones.
  deploytool.py strict-schema IN.json OUT.json
      Writes IN with `additionalProperties: false` on every object schema that lists its
      properties and allows nothing else (as kubernetes-validate's -strict schemas do), so
      that a misspelt field is an error rather than ignored.
  deploytool.py check-k8s RENDERED.yaml OUT_DIR [--name NAME]
      Checks one rendered overlay for what the schemas cannot see (below), and writes each
      ScaledObject to OUT_DIR/<name>.json for check-jsonschema.
  deploytool.py check-compose docker-compose.yml
      Checks the environment of the tickflow services in the compose file.

What the checks hold, each against the code or the generator:
  - every environment variable set for a tickflow process (compose `environment`,
    Kubernetes `env` and the ConfigMaps of `envFrom`) is one that the code reads: the
    names passed to `Env` (get, parse_or, ranged_or, millis_or, addr_or) or `std::env::var`
    in crates/*/src and services/*/src;
  - the ScaledObjects are exactly what `scaledobjects` prints for the TICKFLOW_NAMESPACE,
    TICKFLOW_PARTITIONS and TICKFLOW_REDIS_MODE of the ConfigMap `tickflow-config`: trigger
    type `redis-streams` for a standalone Redis, `redis-cluster-streams` for a cluster; their
    metadata uses only keys that scaler knows, and their targets and TriggerAuthentications
    exist, with the address parameter of the mode (`address`, or `addresses` for a cluster);
  - what the generator assumes of the code holds: each scaled stage consumes the stream with
    the group that SCALED_STAGES says (services/<stage>/src/lib.rs and the topology of
    crates/proto/src/lib.rs), and a partition stream's key is the one that
    crates/streams-core/src/keys.rs `KeySpace::stream` formats;
  - when the Secret `tickflow-redis` is part of the render, KEDA's addresses are the hosts
    and ports of the services' REDIS_URL (one URL, or in cluster mode a comma-separated list
    of seed URLs);
  - every tickflow workload has its probes on /livez and /readyz at the HTTP_ADDR port,
    CONSUMER_NAME from metadata.name, a preStop sleep, and a termination grace period
    longer than preStop + a read's block + the shutdown grace;
  - secret keys referenced by workloads and TriggerAuthentications exist when the Secret
    is part of the render.

Only the standard library is needed for `scaledobjects` and `strict-schema`; the checks
need PyYAML (installed with yamllint in the lint venv).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Owned stages that KEDA scales: deployment -> (input stream, consumer group).
SCALED_STAGES = {
    "transform": ("inbound", "transform"),
    "analytics": ("market", "analytics"),
}
# Backlog (lag + pending over all partitions) per replica that KEDA aims at.
TARGET_BACKLOG_PER_REPLICA = 2000
TRIGGER_AUTH = "tickflow-redis"
REDIS_SECRET = "tickflow-redis"

# TICKFLOW_REDIS_MODE -> the KEDA trigger type that reads a partition stream's lag and pending
# count on that kind of Redis (keda.sh/docs/latest/scalers/redis-streams and
# …/redis-cluster-streams).
TRIGGER_TYPES = {"standalone": "redis-streams", "cluster": "redis-cluster-streams"}
REDIS_MODES = tuple(TRIGGER_TYPES)
# Trigger metadata that each scaler reads. A cluster has one database, so no databaseIndex;
# its scaler takes a comma-separated list of nodes (`addresses`, or `hosts` and `ports`).
STREAMS_METADATA_COMMON = {
    "username", "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
    "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
    "enableTLS", "unsafeSsl",
}
TRIGGER_METADATA = {
    "redis-streams": STREAMS_METADATA_COMMON
    | {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "databaseIndex"},
    "redis-cluster-streams": STREAMS_METADATA_COMMON
    | {"addresses", "hosts", "ports", "addressesFromEnv", "hostsFromEnv", "portsFromEnv"},
}
# TriggerAuthentication parameters of each mode: the address ones (of which one must be
# there, since the triggers carry no address) and the credentials and TLS ones.
TRIGGER_AUTH_ADDRESS = {"standalone": {"address", "host", "port"}, "cluster": {"addresses", "hosts", "ports"}}
TRIGGER_AUTH_CREDENTIALS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}
# The Secret key that holds the TriggerAuthentication's address parameter, per mode.
ADDRESS_SECRET_KEY = {"standalone": "address", "cluster": "addresses"}
# Where the generated triggers of each mode live.
GENERATED_FILE = {"standalone": "k8s/base/keda.yaml", "cluster": "k8s/components/redis-cluster-mode/keda.yaml"}

# Variables set in manifests that no tickflow code reads, on purpose: none.
EXTRA_VARIABLES: set[str] = set()
# Issue 18 (Redis Cluster): the services learn these on another branch while the manifests
# (k8s/components/redis-cluster-mode) already set them. Tolerated only while the code does not
# read them yet; check-k8s says so once it does, and then this set should go.
SERVICE_BINARIES = {"ingest", "transform", "engine", "analytics", "tickflow"}


def key(namespace: str, partition: int, stream: str) -> str:
    """A partition stream's key, as crates/streams-core/src/keys.rs `KeySpace::stream` names it."""
    return f"{namespace}:{{{partition}}}:s:{stream}"


# --- generator -------------------------------------------------------------------------


def triggers(namespace: str, partitions: int, stream: str, group: str, mode: str) -> tuple[list[str], list[str]]:
    """One stage's triggers (YAML lines, indented for `spec.triggers`) and their names: a lag
    and a pending trigger per partition stream, of the trigger type of `mode`."""
    names: list[str] = []
    lines: list[str] = []
    for p in range(partitions):
        for kind, threshold in (("lag", "lagCount"), ("pending", "pendingEntriesCount")):
            name = f"{kind}_{p}"
            names.append(name)
            lines += [
                f"    - type: {TRIGGER_TYPES[mode]}",
                f"      name: {name}",
                "      authenticationRef:",
                f"        name: {TRIGGER_AUTH}",
                "      metadata:",
                f'        stream: "{key(namespace, p, stream)}"',
                f"        consumerGroup: {group}",
                f'        {threshold}: "{TARGET_BACKLOG_PER_REPLICA}"',
            ]
            if kind == "lag":
                lines.append('        activationLagCount: "0"')
    return lines, names


def scaledobjects(namespace: str, partitions: int) -> str:
    out = [
        "# Generated by `python3 scripts/deploytool.py scaledobjects"
        f" --namespace {namespace} --partitions {partitions}`;",
        "# `make lint-deploy` fails when this file and the ConfigMap `tickflow-config` disagree.",
        "#",
        "# transform and analytics consume owned partitions: each partition stream has its own",
        "# lag and pending count, so each ScaledObject has one lag trigger and one pending trigger",
        "# per partition (KEDA's redis-streams trigger reads one stream), summed by a",
        "# scalingModifiers formula into the stage's whole backlog; KEDA then runs",
        f"# ceil(backlog / {TARGET_BACKLOG_PER_REPLICA}) replicas, at least 1 and at most one per partition",
        "# (a replica beyond the partition count would own nothing). Lag alone would miss",
        "# entries delivered to a replica that died and not yet reclaimed; pending covers them.",
        "# The Redis address (host:port, not a URL) and credentials come from the",
        "# TriggerAuthentication, i.e. from the Secret `tickflow-redis`.",
        "apiVersion: keda.sh/v1alpha1",
        "kind: TriggerAuthentication",
        "metadata:",
        f"  name: {TRIGGER_AUTH}",
        "spec:",
        "  secretTargetRef:",
        "    - parameter: address",
        f"      name: {REDIS_SECRET}",
        "      key: address",
    ]
    for deployment, (stream, group) in SCALED_STAGES.items():
        lines, names = triggers(namespace, partitions, stream, group, "standalone")
        out += [
            "---",
            "apiVersion: keda.sh/v1alpha1",
            "kind: ScaledObject",
            "metadata:",
            f"  name: {deployment}",
            "spec:",
            "  scaleTargetRef:",
            "    apiVersion: apps/v1",
            "    kind: Deployment",
            f"    name: {deployment}",
            "  minReplicaCount: 1",
            f"  maxReplicaCount: {partitions}",
            "  pollingInterval: 15",
            "  advanced:",
            "    horizontalPodAutoscalerConfig:",
            "      behavior:",
            "        scaleDown:",
            "          # Every change of membership moves partitions: scale down slowly.",
            "          stabilizationWindowSeconds: 300",
            "          policies:",
            "            - type: Pods",
            "              value: 1",
            "              periodSeconds: 60",
            "    scalingModifiers:",
            "      metricType: AverageValue",
            f'      target: "{TARGET_BACKLOG_PER_REPLICA}"',
            "      formula: >-",
        ]
        line = "        "
        for i, name in enumerate(names):
            piece = name + ("" if i == len(names) - 1 else " +")
            if len(line) + len(piece) + 1 > 90:
                out.append(line.rstrip())
                line = "        "
            line += piece + " "
        out.append(line.rstrip())
        out.append("  triggers:")
        out += lines
    return "\n".join(out) + "\n"


def cluster_trigger_patches(namespace: str, partitions: int) -> str:
    """The strategic-merge patch of the component redis-cluster-mode: the same triggers, with
    the same names (so the base's scalingModifiers formula still sums them), of type
    redis-cluster-streams. A ScaledObject is a custom resource, whose lists kustomize replaces
    whole, so each patch's `triggers` replaces the base's."""
    out = [
        "# Generated by `python3 scripts/deploytool.py scaledobjects"
        f" --namespace {namespace} --partitions {partitions} --redis-mode cluster`;",
        "# `make lint-deploy` fails when this file and the ConfigMap `tickflow-config` disagree.",
        "#",
        "# Replaces the triggers of k8s/base/keda.yaml with redis-cluster-streams ones: the same",
        "# names, streams, groups and thresholds, so the base's scalingModifiers formula still",
        "# sums every partition's lag and pending count. Each partition stream is one key, hence",
        "# in one slot, which KEDA's cluster client finds from any node; the node list",
        "# (`addresses`, host:port,host:port,…) and credentials come from the",
        "# TriggerAuthentication that kustomization.yaml patches, i.e. from the Secret.",
    ]
    for i, (deployment, (stream, group)) in enumerate(SCALED_STAGES.items()):
        lines, _names = triggers(namespace, partitions, stream, group, "cluster")
        if i:
            out.append("---")
        out += [
            "apiVersion: keda.sh/v1alpha1",
            "kind: ScaledObject",
            "metadata:",
            f"  name: {deployment}",
            "spec:",
            "  triggers:",
        ]
        out += lines
    return "\n".join(out) + "\n"


def generated(namespace: str, partitions: int, mode: str) -> str:
    """What `scaledobjects` prints for `mode`: the file GENERATED_FILE[mode]."""
    if mode == "cluster":
        return cluster_trigger_patches(namespace, partitions)
    return scaledobjects(namespace, partitions)


def expected_scaling(namespace: str, partitions: int, mode: str) -> dict[str, tuple[list, str]]:
    """ScaledObject name -> (triggers, formula) that a render for `mode` must hold: the base's,
    with the triggers of the cluster patch in cluster mode."""
    import yaml

    expected = {}
    for doc in yaml.safe_load_all(scaledobjects(namespace, partitions)):
        if doc["kind"] == "ScaledObject":
            formula = doc["spec"]["advanced"]["scalingModifiers"]["formula"]
            expected[doc["metadata"]["name"]] = (doc["spec"]["triggers"], " ".join(formula.split()))
    if mode == "cluster":
        for doc in yaml.safe_load_all(cluster_trigger_patches(namespace, partitions)):
            name = doc["metadata"]["name"]
            expected[name] = (doc["spec"]["triggers"], expected[name][1])
    return expected


# --- strict schema -----------------------------------------------------------------------


def strict(schema):
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


# --- checks -------------------------------------------------------------------------------


class Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def report(self) -> int:
        for item in self.items:
            print(f"{self.source}: {item}", file=sys.stderr)
        return 1 if self.items else 0


def code_variables() -> set[str]:
    """The environment variables the tickflow code reads."""
    names: set[str] = set()
    pattern = re.compile(
        r"(?:\.(?:get|parse_or|ranged_or|millis_or|addr_or)|std::env::var(?:_os)?)\(\s*\"([A-Z][A-Z0-9_]*)\""
    )
    for src in list(ROOT.glob("crates/*/src/**/*.rs")) + list(ROOT.glob("services/*/src/**/*.rs")):
        # Unit tests (a trailing `#[cfg(test)] mod tests`) set made-up variables.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", src.read_text(encoding="utf-8"))[0]
        names.update(pattern.findall(text))
    return names


def check_variables(where: str, names, known: set[str], problems: Problems) -> None:
    for name in names:
        if name not in known and name not in EXTRA_VARIABLES:
            problems.add(f"{where}: variable {name} is read by no tickflow code (misspelt?)")


def check_code_assumptions(problems: Problems) -> None:
    """What the generator takes from the code, checked against it: the stream and group of
    each scaled stage, and the key of a partition stream."""
    proto = (ROOT / "crates/proto/src/lib.rs").read_text(encoding="utf-8")
    topology_module = re.search(r"pub mod topology \{(.*?)\n\}", proto, re.S)
    topology = dict(re.findall(r'pub const ([A-Z_]+): &str = "([^"]*)";', topology_module.group(1))) if topology_module else {}
    if not topology:
        problems.add("crates/proto/src/lib.rs: no `pub mod topology` with the streams and groups")
    for stage, (stream, group) in SCALED_STAGES.items():
        path = f"services/{stage}/src/lib.rs"
        source = (ROOT / path).read_text(encoding="utf-8")
        code_group = re.search(r"group:\s*topology::([A-Z_]+)", source)
        code_stream = re.search(r"Inputs::Partitioned\(\s*topology::([A-Z_]+)", source)
        found = (
            topology.get(code_stream.group(1)) if code_stream else None,
            topology.get(code_group.group(1)) if code_group else None,
        )
        if found != (stream, group):
            problems.add(
                f"{path}: the stage consumes stream {found[0]!r} with group {found[1]!r}, but"
                f" SCALED_STAGES in scripts/deploytool.py says {stream!r} with {group!r}"
            )
    keys = (ROOT / "crates/streams-core/src/keys.rs").read_text(encoding="utf-8")
    fmt = re.search(r'pub fn stream\(&self[^)]*\)[^{]*\{\s*format!\("([^"]*)",\s*self\.namespace\)', keys)
    if fmt is None:
        problems.add("crates/streams-core/src/keys.rs: KeySpace::stream is no longer one format!; update key() here")
        return
    # Rust's format string, read left to right as `format!` does, with the namespace `NS`,
    # partition 7 and stream `S`.
    values = {"{{": "{", "}}": "}", "{}": "NS", "{partition}": "7", "{stream}": "S"}
    rust = re.sub(r"\{\{|\}\}|\{[^{}]*\}", lambda m: values.get(m.group(0), m.group(0)), fmt.group(1))
    if rust != key("NS", 7, "S"):
        problems.add(f"crates/streams-core/src/keys.rs names partition streams {rust!r}, key() here {key('NS', 7, 'S')!r}")


def secret_addresses(url_list: str) -> list[str] | None:
    """host:port of each redis:// or rediss:// URL of a comma-separated list, or None when one
    is not such a URL."""
    from urllib.parse import urlsplit

    out = []
    for url in url_list.split(","):
        parts = urlsplit(url.strip())
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            return None
        out.append(f"{parts.hostname}:{parts.port or 6379}")
    return out


def tickflow_binary(container: dict) -> str | None:
    """Which tickflow image a container runs (ingest, …, tickflow), if any."""
    name = str(container.get("image", "")).split("/")[-1].split("@")[0].split(":")[0]
    return name if name in SERVICE_BINARIES else None


def load_yaml_documents(path: Path) -> list[dict]:
    import yaml

    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def check_k8s(rendered: Path, out_dir: Path, name: str | None = None) -> int:
    problems = Problems(name or str(rendered))
    docs = load_yaml_documents(rendered)
    known = code_variables()
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind", "?"), {})[doc.get("metadata", {}).get("name", "?")] = doc

    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})

    def secret_has(name: str, key_name: str) -> bool:
        secret = secrets.get(name)
        if secret is None:  # provided outside the render (prod)
            return True
        return key_name in (secret.get("data") or {}) or key_name in (secret.get("stringData") or {})

    def secret_value(name: str, key_name: str) -> str | None:
        """A key of a Secret of the render, decoded; None when it is not in the render."""
        import base64

        secret = secrets.get(name) or {}
        if key_name in (secret.get("stringData") or {}):
            return str(secret["stringData"][key_name])
        if key_name in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][key_name]).decode("utf-8")
        return None

    config = (configmaps.get("tickflow-config") or {}).get("data") or {}
    if not config:
        problems.add("no ConfigMap tickflow-config")
    mode = config.get("TICKFLOW_REDIS_MODE", "standalone")
    if mode not in REDIS_MODES:
        problems.add(f"ConfigMap tickflow-config: TICKFLOW_REDIS_MODE={mode!r}, expected one of {', '.join(REDIS_MODES)}")
        mode = "standalone"
    check_code_assumptions(problems)
    for name, cm in configmaps.items():
        if name.startswith("tickflow-"):
            check_variables(f"ConfigMap {name}", (cm.get("data") or {}).keys(), known, problems)

    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        for container in pod.get("containers", []):
            binary = tickflow_binary(container)
            if binary is None:
                continue
            where = f"{workload['kind']} {name}, container {container.get('name')}"
            env = container.get("env") or []
            check_variables(where, [e["name"] for e in env], known, problems)
            if binary == "tickflow":  # the CLI (demo load): no server, no consumer
                continue
            values = {e["name"]: e for e in env}
            for e in env:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not secret_has(ref["name"], ref["key"]):
                    problems.add(f"{where}: {e['name']} refers to key {ref['key']!r} missing from Secret {ref['name']}")
            for source in container.get("envFrom") or []:
                cm = (source.get("configMapRef") or {}).get("name")
                if cm and cm not in configmaps:
                    problems.add(f"{where}: envFrom ConfigMap {cm} is not in the render")
            consumer = (values.get("CONSUMER_NAME") or {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if consumer != "metadata.name":
                problems.add(f"{where}: CONSUMER_NAME must come from metadata.name (the pod name)")
            http_addr = (values.get("HTTP_ADDR") or {}).get("value")
            if not http_addr:
                problems.add(f"{where}: HTTP_ADDR must be set (the probes use its port)")
                continue
            http_port = int(http_addr.rsplit(":", 1)[1])
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
                get = (container.get(probe) or {}).get("httpGet")
                if not get:
                    problems.add(f"{where}: no {probe} with httpGet {path}")
                    continue
                port = ports.get(get["port"], get["port"])
                if get.get("path") != path or port != http_port:
                    problems.add(f"{where}: {probe} must GET {path} on {http_port}, not {get.get('path')} on {port}")
            sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds")
            if not sleep:
                problems.add(f"{where}: no lifecycle.preStop.sleep")
                sleep = 0
            grace_ms = int(config.get("TICKFLOW_SHUTDOWN_GRACE_MS", 10_000))
            block_ms = int(config.get("TICKFLOW_BLOCK_MS", 2_000))
            needed = sleep + (grace_ms + block_ms) / 1000
            period = pod.get("terminationGracePeriodSeconds", 30)
            if period <= needed:
                problems.add(
                    f"{where}: terminationGracePeriodSeconds {period} must exceed preStop {sleep} s"
                    f" + block {block_ms} ms + shutdown grace {grace_ms} ms"
                )

    # KEDA
    namespace = config.get("TICKFLOW_NAMESPACE", "tickflow")
    partitions = int(config.get("TICKFLOW_PARTITIONS", "16"))
    expected = expected_scaling(namespace, partitions, mode)
    trigger_type = TRIGGER_TYPES[mode]
    auths = by_kind.get("TriggerAuthentication", {})
    for name, auth in auths.items():
        refs = auth.get("spec", {}).get("secretTargetRef", [])
        parameters = {ref.get("parameter") for ref in refs}
        for ref in refs:
            if ref.get("parameter") not in TRIGGER_AUTH_ADDRESS[mode] | TRIGGER_AUTH_CREDENTIALS:
                problems.add(
                    f"TriggerAuthentication {name}: parameter {ref.get('parameter')!r} is not one that"
                    f" KEDA's {trigger_type} scaler reads (TICKFLOW_REDIS_MODE={mode})"
                )
            if not secret_has(ref["name"], ref["key"]):
                problems.add(f"TriggerAuthentication {name}: key {ref['key']!r} missing from Secret {ref['name']}")
        if not parameters & TRIGGER_AUTH_ADDRESS[mode]:
            problems.add(
                f"TriggerAuthentication {name}: no address parameter ({', '.join(sorted(TRIGGER_AUTH_ADDRESS[mode]))}),"
                " and the triggers carry none"
            )

    # The Redis that KEDA watches is the one the services use.
    url = secret_value(REDIS_SECRET, "url")
    addresses = secret_value(REDIS_SECRET, ADDRESS_SECRET_KEY[mode])
    if url is not None:
        from_url = secret_addresses(url)
        if from_url is None:
            problems.add(f"Secret {REDIS_SECRET}: url is not a comma-separated list of redis:// or rediss:// URLs")
        elif mode == "standalone" and len(from_url) != 1:
            problems.add(f"Secret {REDIS_SECRET}: url lists {len(from_url)} URLs; a list of seeds needs TICKFLOW_REDIS_MODE=cluster")
        elif addresses is not None and sorted(from_url) != sorted(a.strip() for a in addresses.split(",")):
            problems.add(
                f"Secret {REDIS_SECRET}: {ADDRESS_SECRET_KEY[mode]} {addresses!r} (KEDA) is not the hosts and ports"
                f" of url (REDIS_URL of the services): {','.join(from_url)!r}"
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    scaled = by_kind.get("ScaledObject", {})
    if set(scaled) != set(SCALED_STAGES):
        problems.add(f"ScaledObjects {sorted(scaled)}; expected {sorted(SCALED_STAGES)}")
    for name, so in scaled.items():
        (out_dir / f"scaledobject-{name}.json").write_text(json.dumps(so, indent=1), encoding="utf-8")
        spec = so.get("spec", {})
        target = spec.get("scaleTargetRef", {})
        if target.get("name") not in by_kind.get(target.get("kind", "Deployment"), {}):
            problems.add(f"ScaledObject {name}: target {target.get('kind')} {target.get('name')} is not in the render")
        for trigger in spec.get("triggers", []):
            where = f"ScaledObject {name}, trigger {trigger.get('name')}"
            if trigger.get("type") != trigger_type:
                problems.add(f"{where}: type {trigger.get('type')!r}; TICKFLOW_REDIS_MODE={mode} needs {trigger_type!r}")
            unknown = set(trigger.get("metadata", {})) - TRIGGER_METADATA.get(trigger.get("type"), set())
            if unknown:
                problems.add(f"{where}: metadata {sorted(unknown)} unknown to KEDA's {trigger.get('type')} scaler")
            auth = (trigger.get("authenticationRef") or {}).get("name")
            if auth and auth not in auths:
                problems.add(f"ScaledObject {name}, trigger {trigger.get('name')}: TriggerAuthentication {auth} is not in the render")
        if spec.get("maxReplicaCount", 100) > partitions:
            problems.add(
                f"ScaledObject {name}: maxReplicaCount {spec.get('maxReplicaCount', 100)} exceeds"
                f" TICKFLOW_PARTITIONS={partitions}; the extra replicas would own no partition"
            )
        want = expected.get(name)
        if want is not None:
            # What the partitions decide: the triggers and the formula that sums them.
            formula = spec.get("advanced", {}).get("scalingModifiers", {}).get("formula", "")
            if (spec.get("triggers"), " ".join(formula.split())) != want:
                regenerate = (
                    f"python3 scripts/deploytool.py scaledobjects --namespace {namespace} --partitions {partitions}"
                    + (" --redis-mode cluster" if mode == "cluster" else "")
                )
                problems.add(
                    f"ScaledObject {name} differs from what TICKFLOW_NAMESPACE={namespace},"
                    f" TICKFLOW_PARTITIONS={partitions} and TICKFLOW_REDIS_MODE={mode} give; regenerate"
                    f" {GENERATED_FILE[mode]} with `{regenerate} > {GENERATED_FILE[mode]}`"
                )
    return problems.report()


def check_compose(path: Path) -> int:
    problems = Problems(str(path))
    compose = load_yaml_documents(path)[0]
    known = code_variables()
    for name, service in (compose.get("services") or {}).items():
        build = service.get("build")
        target = build.get("target") if isinstance(build, dict) else None
        if target not in SERVICE_BINARIES:
            continue
        env = service.get("environment") or {}
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        check_variables(f"service {name}", names, known, problems)
        test = (service.get("healthcheck") or {}).get("test")
        if target != "tickflow" and test != ["CMD", f"/usr/local/bin/{target}", "healthcheck"]:
            problems.add(f"service {name}: healthcheck must be [CMD, /usr/local/bin/{target}, healthcheck]")
    return problems.report()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("scaledobjects")
    gen.add_argument("--namespace", default="tickflow")
    gen.add_argument("--partitions", type=int, default=16)
    gen.add_argument("--redis-mode", choices=REDIS_MODES, default="standalone", help="TICKFLOW_REDIS_MODE")
    schema = sub.add_parser("strict-schema")
    schema.add_argument("input", type=Path)
    schema.add_argument("output", type=Path)
    k8s = sub.add_parser("check-k8s")
    k8s.add_argument("rendered", type=Path)
    k8s.add_argument("out_dir", type=Path)
    k8s.add_argument("--name", help="what to call the render in messages")
    compose = sub.add_parser("check-compose")
    compose.add_argument("compose", type=Path)
    args = parser.parse_args()
    if args.command == "scaledobjects":
        if not 1 <= args.partitions <= 1024:
            parser.error("--partitions must be between 1 and 1024 (TICKFLOW_PARTITIONS)")
        sys.stdout.write(generated(args.namespace, args.partitions, args.redis_mode))
        return 0
    if args.command == "strict-schema":
        data = json.loads(args.input.read_text(encoding="utf-8"))
        args.output.write_text(json.dumps(strict(data), indent=1), encoding="utf-8")
        return 0
    if args.command == "check-k8s":
        return check_k8s(args.rendered, args.out_dir, args.name)
    return check_compose(args.compose)


if __name__ == "__main__":
    sys.exit(main())
