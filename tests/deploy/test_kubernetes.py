"""deploy/kubernetes/: what `kubectl apply -k` would get, checked offline. Every manifest parses
and validates against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields are
errors); the Prometheus operator's objects (CRDs, not in those schemas) are checked for the shape
the operator reads; the ConfigMap's config passes `gateway check-config`; and the pieces agree:
ports, labels, probes, the grace period against the config's shutdown_timeout_s, the alert
rules against deploy/prometheus/alerts.yml."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway import config as config_mod
from tests.fixtures.prometheus import require_binary

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
# The oldest and the newest Kubernetes the package has schemas of (1.25 and 1.37 in its 1.37
# release): both must accept the manifests.
VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version())
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _resources(directory: Path) -> list[dict]:
    """Every object the kustomization lists, following bases (no patches applied)."""
    out = []
    for entry in _kustomization(directory)["resources"]:
        path = (directory / entry).resolve()
        if path.is_dir():
            out += _resources(path)
        else:
            out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


BASE_OBJECTS = _resources(BASE)


def _one(kind: str) -> dict:
    [obj] = [o for o in BASE_OBJECTS if o["kind"] == kind]
    return obj


def _container() -> dict:
    [container] = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(_one("ConfigMap")["data"]["gateway.yaml"])
    return path


def _secret_env() -> dict[str, str]:
    """The Deployment's variables from Secrets, with stand-in values."""
    return {e["name"]: "redis://redis.example:6379/0" if "STORE" in e["name"] else "stand-in"
            for e in _container()["env"] if "secretKeyRef" in e.get("valueFrom", {})}


def _loaded_config(tmp_path: Path, monkeypatch) -> config_mod.Config:
    for name, value in _secret_env().items():
        monkeypatch.setenv(name, value)
    return config_mod.load(str(_config_file(tmp_path)))


def test_every_manifest_file_is_listed_and_parses():
    for directory in (BASE, *sorted((K8S / "overlays").iterdir())):
        listed = {(directory / r).resolve() for r in _kustomization(directory)["resources"]}
        files = {p.resolve() for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert files <= listed, f"{directory}: manifests no kustomization lists: {files - listed}"
        assert all(p.exists() for p in listed), f"{directory}: listed but missing: {[p for p in listed if not p.exists()]}"
        for obj in _resources(directory):
            assert {"apiVersion", "kind", "metadata"} <= obj.keys(), obj
    assert {o["kind"] for o in BASE_OBJECTS} == {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "NetworkPolicy", *OPERATOR_KINDS}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("obj", [o for o in BASE_OBJECTS if o["kind"] not in OPERATOR_KINDS],
                         ids=lambda o: o["kind"])
def test_manifest_validates_against_the_kubernetes_schema(obj, version):
    kubernetes_validate.validate(obj, version, strict=True)  # raises with the field at fault


def test_schema_validation_catches_a_wrong_field():
    """The check above is real: a misspelt field or a wrong type is refused."""
    deployment = yaml.safe_load(yaml.safe_dump(_one("Deployment")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 330
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = yaml.safe_load(yaml.safe_dump(_one("Deployment")))
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_configmaps_config_passes_check_config(tmp_path):
    path = _config_file(tmp_path)
    text = path.read_text()
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))  # no :-default: must be set
    assert needed <= _secret_env().keys(), f"the config needs {needed - _secret_env().keys()} from the Deployment"
    env = {k: v for k, v in os.environ.items() if k not in needed} | _secret_env()
    done = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                          check=False, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # no secret written in the file


def test_the_config_reloads_on_update_and_shares_redis(tmp_path, monkeypatch):
    config = _loaded_config(tmp_path, monkeypatch)
    assert config.server.watch_config is True
    assert config.store.url.startswith(("redis://", "rediss://", "redis+cluster://"))
    container = _container()
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    [config_mount] = [m for m in mounts.values() if "configMap" in volumes[m["name"]]]
    assert volumes[config_mount["name"]]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert "subPath" not in config_mount  # a subPath mount never sees a ConfigMap update
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert config_arg == f"{config_mount['mountPath']}/gateway.yaml"


def test_the_grace_period_covers_prestop_and_shutdown_timeout(tmp_path, monkeypatch):
    config = _loaded_config(tmp_path, monkeypatch)
    pod = _one("Deployment")["spec"]["template"]["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = float(pre_stop[1])
    assert 0 < sleep_s and config.server.drain_delay_s > 0
    assert config.server.shutdown_timeout_s >= config.upstream.timeout_s  # an image in flight can finish
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + config.server.shutdown_timeout_s


def test_probes_ports_and_the_service_agree(tmp_path, monkeypatch):
    config = _loaded_config(tmp_path, monkeypatch)
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port, "metrics": config.server.metrics_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = _one("Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "Deployment"):
        spec = _one(kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= pod_labels.items(), kind
    assert _one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", _one("Deployment")["metadata"]["name"])
    assert _one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2  # a rollout never leaves one replica


def test_the_pod_runs_unprivileged_on_a_read_only_root():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable == ["/tmp"] and all("emptyDir" in volumes[m["name"]]
                                         for m in container["volumeMounts"] if not m.get("readOnly"))
    for key in ("cpu", "memory"):
        assert container["resources"]["requests"][key] and container["resources"]["limits"][key]
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)[-1]
    assert user.split(":")[0] == str(pod["securityContext"]["runAsUser"])  # numeric: kubelet can check non-root


def test_secrets_come_from_a_secret():
    env = {e["name"]: e for e in _container()["env"]}
    for name in ("UPSTREAM_API_KEY", "GATEWAY_STORE_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gateway-secrets" and ref["key"]
    assert not any(o["kind"] == "Secret" for o in BASE_OBJECTS)  # never a value in the repository


def test_metrics_are_scraped_only_from_the_monitoring_namespace(tmp_path, monkeypatch):
    """NetworkPolicy filters by port, not path: the metrics have a port of their own
    (server.metrics_port), which only the monitoring namespace may reach and the ServiceMonitor
    scrapes; the API's clients reach the API's port alone, where /metrics answers 404."""
    config = _loaded_config(tmp_path, monkeypatch)
    assert config.server.metrics_port is not None and config.server.metrics_port != config.server.port
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    [scraped] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert container_ports[scraped["targetPort"]] == config.server.metrics_port
    assert endpoint["path"] == config.server.metrics_path
    # Prometheus' job label: alerts.yml's GatewayDown watches up{job="gateway"}
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "gateway"
    policy = _one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert all(rule.get("from") and rule.get("ports") for rule in policy["ingress"])  # no rule open to all
    admitted: dict[int, list] = {}  # container port -> the peers admitted to it
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            admitted.setdefault(container_ports.get(port["port"], port["port"]), []).extend(rule["from"])
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    clients = {"namespaceSelector": {"matchLabels": {"image-gateway.io/client": "true"}}}
    assert admitted == {config.server.metrics_port: [monitoring], config.server.port: [clients]}


def test_the_prometheusrule_holds_the_alerts_of_deploy_prometheus(tmp_path):
    rule = _one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], \
        "run python deploy/kubernetes/render_prometheusrule.py after editing alerts.yml"
    path = tmp_path / "rules.yml"  # the operator hands spec to Prometheus as a rule file
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run([require_binary("promtool"), "check", "rules", str(path)], check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
