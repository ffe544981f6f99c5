"""The Helm chart (deploy/helm/latentedit) and the image (deploy/Dockerfile), checked without a cluster.

`helm lint --strict` and `helm template` for the default values and each file in the chart's ci/
(GPU + TLS, PostgreSQL trainers); every rendered object validated strictly against the Kubernetes
1.30 schemas and the newest ones kubernetes-validate bundles (the ServiceMonitor is a CRD with no
bundled schema: it alone is checked by the assertions here, not by a schema); then what matters:
non-root read-only containers, gRPC probes, who may reach whom, the autoscalers' targets and
metrics, a config that `load_config` accepts and whose TLS paths are mounted, GPUs on the
generator only, one SQLite trainer. The TLS exec probe script runs against a real TLS server.

helm and kubernetes-validate come from scripts/setup_deploy_tools.sh (run here when missing);
the tests skip only when that set-up cannot download them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from latentedit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "latentedit"
HELM = ROOT / ".venv" / "bin" / "helm"
RELEASE, NAMESPACE = "le", "ml"
PREFIX = f"{RELEASE}-latentedit"
SERVICES = ("generator", "scorer", "trainer", "editor")
VARIANTS = {
    "default": [],
    "gpu-tls": [CHART / "ci" / "gpu-tls-values.yaml"],
    "postgres": [CHART / "ci" / "postgres-values.yaml"],
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "Pod")


# ---- tools and rendering ------------------------------------------------------------------------

def _tools_ready() -> bool:
    if not os.access(HELM, os.X_OK):
        return False
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tools() -> None:
    if not _tools_ready():
        done = subprocess.run(["bash", str(ROOT / "scripts" / "setup_deploy_tools.sh")], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0 or not _tools_ready():
            pytest.skip("helm / kubernetes-validate could not be installed by scripts/setup_deploy_tools.sh "
                        f"(no registry access?): {(done.stderr or done.stdout).strip()[-400:]}")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def values_args(files: list[Path], sets: tuple[str, ...] = ()) -> list[str]:
    return [a for f in files for a in ("-f", str(f))] + [a for s in sets for a in ("--set", s)]


_RENDERED: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}


def render(variant: str, *sets: str) -> list[dict[str, Any]]:
    key = (variant, sets)
    if key not in _RENDERED:
        out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *values_args(VARIANTS[variant], sets)).stdout
        _RENDERED[key] = [d for d in yaml.safe_load_all(out) if d]
    return _RENDERED[key]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}: {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def workload(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
             and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one workload of {component}, found {[(d['kind'], d['metadata']['name']) for d in found]}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def rendered_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", f"{PREFIX}-config")["data"]["config.yaml"])


# ---- lint and schemas ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(tools: None, variant: str) -> None:
    out = helm("lint", "--strict", str(CHART), *values_args(VARIANTS[variant])).stdout
    assert "0 chart(s) failed" in out, out


def _kubernetes_versions() -> list[str]:
    import kubernetes_validate.utils as kv

    return sorted({"1.30.0", kv.latest_version()}, key=lambda v: [int(x) for x in v.split(".")])


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_validate_strictly(tools: None, variant: str) -> None:
    import kubernetes_validate.utils as kv

    docs = render(variant)
    versions = _kubernetes_versions()
    assert len(versions) == 2 and versions[0] == "1.30.0", versions
    validated = 0
    for version in versions:
        for doc in docs:
            if doc["apiVersion"] == "monitoring.coreos.com/v1":
                # A CRD (prometheus-operator): no schema is bundled; test_service_monitor checks it.
                assert doc["kind"] == "ServiceMonitor"
                continue
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} against Kubernetes {version}: "
                                     f"{exc.message} at {'/'.join(map(str, exc.path))}") from None
            validated += 1
    assert validated >= 2 * 20


def test_values_that_cannot_work_fail_to_render(tools: None) -> None:
    cases = {
        ("trainer.replicas=3",): "allows exactly one trainer",
        ("trainer.jobStore=mysql",): "value must be one of 'sqlite', 'postgres'",  # values.schema.json
        ("generater.replicas=3",): "additional properties 'generater' not allowed",  # a typo is an error
        ("generator.gpu.backend=cuda",): "value must be one of 'auto', 'torch', 'tensorrt', 'onnxruntime'",
        ("tokens.extra={short token}",): "tokens/extra/0",
        ("trainer.jobStore=postgres",): "needs trainer.postgres.dsnSecret.name",
        ("tls.enabled=true",): "needs tls.secretName",
    }
    for sets, message in cases.items():
        done = helm("template", RELEASE, str(CHART), *values_args([], sets), check=False)
        assert done.returncode != 0 and message in done.stderr, (sets, done.stderr)


# ---- what matters -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_non_root_read_only(tools: None, variant: str) -> None:
    docs = render(variant)
    pods = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert {d["kind"] for d in pods} >= {"Deployment", "Job", "Pod"}
    for obj in pods:
        spec = pod_spec(obj)
        where = f"{obj['kind']} {obj['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            sc = c.get("securityContext", {})
            what = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
            assert int(sc.get("runAsUser", pod_sc.get("runAsUser", 0))) != 0, what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("privileged", False) is False, what
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
            assert not sc.get("capabilities", {}).get("add"), what
            assert sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") == "RuntimeDefault", what
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in tmp_volumes, f"{what}: /tmp must be an emptyDir"
            assert "resources" in c and c["resources"].get("limits", {}).get("memory"), f"{what}: memory limit"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_check_grpc_health(tools: None, variant: str) -> None:
    docs = render(variant)
    tls = variant == "gpu-tls"
    ports = {"generator": 50051, "scorer": 50052, "trainer": 50053, "editor": 50054}
    for name in SERVICES:
        spec = pod_spec(workload(docs, name))
        (c,) = spec["containers"]
        assert c["args"][-2:] == ["serve", name]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == ports[name]
        for probe, service in (("readinessProbe", ""), ("livenessProbe", "liveness"), ("startupProbe", "")):
            p = c[probe]
            if tls:  # the kubelet's gRPC probe speaks plaintext only: the same check, over TLS
                assert "grpc" not in p and p["exec"]["command"][1:] == [
                    "/etc/latentedit/config/health_probe.py", str(ports[name]), service], (name, probe, p)
            else:
                assert p["grpc"] == {"port": ports[name], "service": service}, (name, probe, p)
        # Model loading gets minutes, not the liveness probe's patience.
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, startup
        assert spec["terminationGracePeriodSeconds"] > rendered_config(docs)["services"][name]["grace_period_s"]


def _rules_on(policy: dict[str, Any], port: str) -> list[dict[str, Any]]:
    return [r for r in policy["spec"].get("ingress", []) if any(p.get("port") == port for p in r.get("ports", []))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies(tools: None, variant: str) -> None:
    docs = render(variant)
    policies = objects(docs, "NetworkPolicy")
    for name in SERVICES:
        labels = pod_spec_labels = workload(docs, name)["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies if all(pod_spec_labels.get(k) == v
                                                for k, v in p["spec"]["podSelector"]["matchLabels"].items())]
        assert len(selecting) == 1, f"{name}: one NetworkPolicy selects its pods, got {len(selecting)}"
        policy = selecting[0]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        # Every rule names its port: nothing else of the pod is reachable.
        assert all(r.get("ports") for r in policy["spec"]["ingress"]), policy
        grpc_rules = _rules_on(policy, "grpc")
        assert len(grpc_rules) == 1, policy
        peers = grpc_rules[0].get("from")
        if name in ("generator", "scorer"):
            # Only the editor and the trainer of this release (and its helm test pod) reach them.
            assert peers and len(peers) == 1 and set(peers[0]) == {"podSelector"}, peers
            selector = peers[0]["podSelector"]
            assert selector["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
            assert "app.kubernetes.io/component" not in selector["matchLabels"]
            (expression,) = selector["matchExpressions"]
            assert expression["key"] == "app.kubernetes.io/component" and expression["operator"] == "In"
            assert set(expression["values"]) == {"editor", "trainer", "test"}, expression
            test_pod = one(docs, "Pod", f"{PREFIX}-test")
            assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
            for client in ("editor", "trainer"):
                assert workload(docs, client)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] \
                    == client
        elif name == "editor" and variant == "gpu-tls":
            assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}], peers
        else:
            assert peers is None, f"{name}: reachable by its clients (no values.clients: any)"
        metrics_rules = _rules_on(policy, "metrics")
        assert len(metrics_rules) == 1, policy
        assert metrics_rules[0]["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        assert labels["app.kubernetes.io/component"] == name


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscalers_target_generator_and_scorer(tools: None, variant: str) -> None:
    docs = render(variant)
    hpas = objects(docs, "HorizontalPodAutoscaler")
    assert {h["apiVersion"] for h in hpas} == {"autoscaling/v2"}
    targets = {}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["apiVersion"] == "apps/v1" and ref["kind"] == "Deployment"
        deployment = one(docs, "Deployment", ref["name"])
        component = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        targets[component] = hpa
        # The HPA owns the replica count: a fixed one would fight it on every upgrade.
        assert "replicas" not in deployment["spec"], ref["name"]
        metrics = hpa["spec"]["metrics"]
        cpu = [m for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        assert len(cpu) == 1 and cpu[0]["resource"]["target"]["type"] == "Utilization"
        pods = [m for m in metrics if m["type"] == "Pods"]
        assert len(pods) == 1, metrics
        assert pods[0]["pods"]["metric"]["name"] == "latentedit_batcher_queue_rows"
        assert pods[0]["pods"]["metric"]["selector"] == {"matchLabels": {"batcher": component}}
        assert pods[0]["pods"]["target"]["type"] == "AverageValue"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert set(targets) == {"generator", "scorer"}


def test_queue_metric_exists_in_the_services_metrics(generator_server, scorer_server) -> None:
    """The metric the HPAs scale on is one the running services export, with the label value each HPA selects."""
    import grpc
    from prometheus_client import REGISTRY

    from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, scorer_pb2, scorer_pb2_grpc
    from latentedit.rpc.serving import channel_options
    from tests import corpus

    # One real call each, so each service has made its batchers the way it does in production.
    with grpc.insecure_channel(generator_server[0], options=channel_options()) as channel:
        generator_pb2_grpc.GeneratorServiceStub(channel).Synthesize(
            generator_pb2.SynthesizeRequest(latents=corpus.latents(2)), timeout=120)
    with grpc.insecure_channel(scorer_server[0], options=channel_options()) as channel:
        scorer_pb2_grpc.ScorerServiceStub(channel).Score(
            scorer_pb2.ScoreRequest(images=corpus.raw_images(1), heads=["pose"]), timeout=120)

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exported = {(sample.name, tuple(sorted(sample.labels.items()))) for metric in REGISTRY.collect() for sample in metric.samples}
    for component in ("generator", "scorer"):
        metric = values[component]["autoscaling"]["queueMetric"]
        selector = metric["selector"]["matchLabels"]
        assert (metric["name"], tuple(sorted(selector.items()))) in exported, (
            metric, sorted(entry for entry in exported if entry[0] == metric["name"]))


def _mounted_files(spec: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """Paths of the files a container sees from its ConfigMap and Secret volumes."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = set()
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's volumeClaimTemplate
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            continue
        if "items" in source:
            keys = [i["path"] for i in source["items"]]
        elif "secret" in volume and volume["secret"].get("secretName", "").endswith("tls"):
            keys = ["tls.crt", "tls.key", "ca.crt"]  # kubernetes.io/tls Secret (cert-manager adds ca.crt)
        else:
            keys = ["*"]
        files.update(f"{mount['mountPath']}/{k}" for k in keys)
    return files


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_loads_and_names_mounted_files(tools: None, variant: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from latentedit.rpc.security import is_insecure

    docs = render(variant)
    monkeypatch.delenv("LATENTEDIT_REPOSITORY", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", f"{PREFIX}-config")["data"]["config.yaml"])
    config = load_config(path)  # unknown keys would raise: the services would refuse to start
    assert config.repository == "/models"
    for name in SERVICES:
        spec = pod_spec(workload(docs, name))
        (c,) = spec["containers"]
        assert c["args"][:2] == ["--config", "/etc/latentedit/config/config.yaml"]
        assert any(m["mountPath"] == config.repository for m in c["volumeMounts"])
        assert config.services[name].port == {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        if config.observability.metrics_port:
            assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == config.observability.metrics_port
        files = _mounted_files(spec, c)
        assert "/etc/latentedit/config/config.yaml" in files or "/etc/latentedit/config/*" in files
        sec = config.security
        needed = [sec.cert_file, sec.key_file, sec.ca_file, sec.tokens_file] if not is_insecure(sec) else []
        if name in ("editor", "trainer") and not is_insecure(sec):
            needed += [sec.service_token_file, sec.client_cert_file or sec.cert_file, sec.client_key_file or sec.key_file]
        for file in needed:
            assert file and (file in files or f"{file.rsplit('/', 1)[0]}/*" in files), f"{name}: {file} not mounted ({files})"
        if name in ("generator", "scorer") and not is_insecure(sec):
            assert sec.service_token_file not in files, f"{name} must not hold the downstream token"
    # Clients resolve the headless Services (round robin over every ready pod).
    for name in ("generator", "scorer"):
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", config.addresses[name])
        assert match, config.addresses[name]
        service = one(docs, "Service", match[1])
        assert match[2] == NAMESPACE and service["spec"]["clusterIP"] == "None"
        assert int(match[3]) == config.services[name].port
        pod_labels = workload(docs, name)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
    for name in ("trainer", "editor"):
        host, port = config.addresses[name].rsplit(":", 1)
        assert host == f"{PREFIX}-{name}.{NAMESPACE}.svc" and int(port) == config.services[name].port
        one(docs, "Service", f"{PREFIX}-{name}")
    if variant == "gpu-tls":
        assert not is_insecure(config.security) and config.security.require_client_cert
        assert config.observability.otlp_endpoint == "http://otel-collector.monitoring:4317"
        assert config.scorer.threads == 2
    else:
        assert is_insecure(config.security)


def test_service_selectors_match_their_pods(tools: None) -> None:
    docs = render("default")
    for service in objects(docs, "Service"):
        selector = service["spec"]["selector"]
        matching = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                    and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, service["metadata"]["name"]


def test_tokens_secret(tools: None) -> None:
    from latentedit.rpc.security import parse_tokens

    docs = render("gpu-tls")
    secret = one(docs, "Secret", f"{PREFIX}-tokens")["stringData"]
    tokens = {t.name: t for t in parse_tokens(secret["tokens.txt"], "tokens.txt")}
    assert set(tokens) == {"services", "helm-test", "webapp"}
    assert tokens["services"].scopes == {"generate", "score"}
    assert tokens["helm-test"].scopes >= {"edit", "train", "generate", "score"}
    assert secret["service.token"] == "ci-service-token-0123456789abcdef"
    assert "tokens.txt" not in {i["key"] for v in pod_spec(one(docs, "Pod", f"{PREFIX}-test"))["volumes"]
                                 for i in v.get("secret", {}).get("items", [])}
    assert not objects(render("default"), "Secret"), "no tokens without TLS"


def test_gpu_only_on_the_generator(tools: None) -> None:
    for variant in VARIANTS:
        docs = render(variant)
        for obj in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
            spec = pod_spec(obj)
            is_generator = obj["kind"] == "Deployment" and obj["metadata"]["name"] == f"{PREFIX}-generator"
            for c in containers(spec):
                gpus = {**c["resources"].get("limits", {}), **c["resources"].get("requests", {})}.get("nvidia.com/gpu")
                if variant == "gpu-tls" and is_generator:
                    assert gpus == 1, c["resources"]
                    assert c["image"].endswith(":0.1.0-cuda")
                else:
                    assert gpus is None, f"{variant}: {obj['kind']} {obj['metadata']['name']} asks for a GPU"
            if variant == "gpu-tls" and is_generator:
                assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            else:
                assert "nvidia.com/gpu" not in str(spec.get("tolerations", "")) + str(spec.get("nodeSelector", ""))
    generator = rendered_config(render("gpu-tls"))["generator"]
    assert generator == {"device": "cuda", "backend": "tensorrt", "cuda_fp16": True, "max_batch_size": 512}
    assert rendered_config(render("default"))["generator"]["device"] == "cpu"


def test_sqlite_trainer_is_one_pod(tools: None) -> None:
    for variant in ("default", "gpu-tls"):
        docs = render(variant)
        trainer = workload(docs, "trainer")
        # A StatefulSet never runs two pods of its one ordinal (an update deletes before it
        # creates); a Deployment would need Recreate, and would still replace a pod on a lost
        # node while the old one may run.
        assert trainer["kind"] == "StatefulSet", trainer["kind"]
        assert trainer["spec"]["replicas"] == 1
        assert trainer["spec"]["podManagementPolicy"] == "OrderedReady"
        assert trainer["spec"]["updateStrategy"]["type"] in ("RollingUpdate", "OnDelete")
        assert "rollingUpdate" not in trainer["spec"]["updateStrategy"]
        assert not [h for h in objects(docs, "HorizontalPodAutoscaler")
                    if h["spec"]["scaleTargetRef"]["name"].endswith("trainer")]
        assert not [p for p in objects(docs, "PodDisruptionBudget") if p["metadata"]["name"].endswith("trainer")]
        # The SQLite file sits on the pod's own ReadWriteOnce volume, not the shared network one.
        (claim,) = trainer["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        mounts = {m["name"]: m["mountPath"] for m in trainer["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts[claim["metadata"]["name"]] == "/models/.jobs"
        assert not [d for d in objects(docs, "Deployment") if d["metadata"]["name"].endswith("-trainer")]
    done = helm("template", RELEASE, str(CHART), "--set", "trainer.replicas=2", check=False)
    assert done.returncode != 0 and "exactly one trainer" in done.stderr


def test_postgres_trainers(tools: None) -> None:
    docs = render("postgres")
    trainer = workload(docs, "trainer")
    assert trainer["kind"] == "Deployment" and trainer["spec"]["replicas"] == 3
    (c,) = trainer["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["LATENTEDIT_JOB_STORE"]["value"] == "postgres"
    assert env["LATENTEDIT_JOB_STORE_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "latentedit-postgres", "key": "dsn"}
    assert not [m for m in c["volumeMounts"] if m["mountPath"].endswith("/.jobs")]
    assert one(docs, "PodDisruptionBudget", f"{PREFIX}-trainer")["spec"]["maxUnavailable"] == 1
    assert rendered_config(docs)["trainer"] == {"workers": 2}
    assert not objects(docs, "StatefulSet")


def test_service_monitor_only_when_enabled(tools: None) -> None:
    assert not [d for d in render("default") if d["apiVersion"].startswith("monitoring.coreos.com")]
    docs = render("gpu-tls")
    (monitor,) = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    scraped = [s for s in objects(docs, "Service")
               if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    # The four Services, not the headless ones (which would scrape generator and scorer twice).
    assert sorted(s["metadata"]["name"] for s in scraped) == sorted(f"{PREFIX}-{n}" for n in SERVICES)
    for service in scraped:
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    done = helm("template", RELEASE, str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
                "--set", "metrics.enabled=false")
    assert "ServiceMonitor" not in done.stdout


def test_pod_disruption_budgets(tools: None) -> None:
    docs = render("default")
    budgets = {p["metadata"]["name"]: p for p in objects(docs, "PodDisruptionBudget")}
    assert set(budgets) == {f"{PREFIX}-{n}" for n in ("generator", "scorer", "editor")}
    for name, budget in budgets.items():
        labels = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("variant", ["default", "gpu-tls"])
def test_hooks_install_models_and_test_an_edit(tools: None, variant: str) -> None:
    docs = render(variant)
    job = one(docs, "Job", f"{PREFIX}-install-models")
    assert set(job["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"post-install", "pre-upgrade"}
    (c,) = pod_spec(job)["containers"]
    assert c["args"] == ["--config", "/etc/latentedit/config/config.yaml", "models", "install"]
    claim = [v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v][0]["persistentVolumeClaim"]["claimName"]
    assert claim == workload(docs, "generator")["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"]
    test = one(docs, "Pod", f"{PREFIX}-test")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    script = test["spec"]["containers"][0]["args"][0]
    assert "le wait --timeout 600 generator scorer trainer editor" in script
    assert re.search(r"le train pca .*--name helm-test-pca", script)
    assert re.search(r"le edit --method ganspace --param directions=helm-test-pca", script)
    if variant == "gpu-tls":
        assert "--token-file /etc/latentedit/tokens/test.token" in script
    # The CLI accepts what the test pod runs (the parser is the one in the image).
    from latentedit.cli import build_parser

    parser = build_parser()
    lines = [ln.strip() for ln in script.replace("\\\n", " ").splitlines() if ln.strip().startswith("le ")]
    for line in lines:
        args = ["--config", "c.yaml", *line.split()[1:]]
        parsed = parser.parse_args(args)
        assert parsed.func is not None, line


def test_tls_exec_probe_speaks_to_a_mutual_tls_server(tools: None, tmp_path: Path) -> None:
    """The probe script of the ConfigMap against a real mutual-TLS gRPC health server."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from latentedit.rpc.security import make_certs

    paths = make_certs(tmp_path / "certs", hosts=("localhost", f"{PREFIX}-generator.{NAMESPACE}.svc"), tokens=False)
    tls, client = tmp_path / "tls", tmp_path / "client-tls"
    for folder, crt, key in ((tls, "server.crt", "server.key"), (client, "client.crt", "client.key")):
        folder.mkdir()
        (folder / "tls.crt").write_bytes(paths[crt].read_bytes())
        (folder / "tls.key").write_bytes(paths[key].read_bytes())
    (tls / "ca.crt").write_bytes(paths["ca.crt"].read_bytes())
    script = tmp_path / "health_probe.py"
    script.write_text(one(render("gpu-tls"), "ConfigMap", f"{PREFIX}-config")["data"]["health_probe.py"])

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(paths["server.key"].read_bytes(), paths["server.crt"].read_bytes())],
                                              root_certificates=paths["ca.crt"].read_bytes(), require_client_auth=True)
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        def probe(service: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(script), str(port), service], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "LATENTEDIT_PROBE_TLS_DIR": str(tls),
                                                   "LATENTEDIT_PROBE_SERVER_NAME": f"{PREFIX}-generator.{NAMESPACE}.svc",
                                                   "LATENTEDIT_PROBE_CLIENT_TLS_DIR": str(client), **env})

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        assert probe("liveness").returncode == 0, probe("liveness").stderr
        assert probe("").returncode != 0
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe("").returncode == 0
        wrong_name = probe("", LATENTEDIT_PROBE_SERVER_NAME="somewhere-else.example")
        assert wrong_name.returncode != 0 and "UNAVAILABLE" in wrong_name.stderr
    finally:
        server.stop(None)


TLS_SETS = ("tls.enabled=true", "tls.secretName=le-tls", "tls.mutual=true", "tls.clientSecretName=le-client-tls",
            "tokens.serviceToken=local-service-token-0123456789", "tokens.testToken=local-test-token-0123456789")
SECURITY_ENV = ("LATENTEDIT_INSECURE", "LATENTEDIT_TOKENS", "LATENTEDIT_SERVICE_TOKEN", "LATENTEDIT_TOKEN", "LATENTEDIT_CA",
                "LATENTEDIT_CERT", "LATENTEDIT_KEY", "LATENTEDIT_REPOSITORY")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rendered_tls_config_serves_and_the_helm_test_script_passes(tools: None, fresh_repo: Any, tmp_path: Path) -> None:
    """What a cluster would run, on loopback: the chart's config.yaml (mutual TLS, tokens from its
    Secret) starts the four services as processes, the TLS exec probe reports them, and the helm
    test pod's script (health of each service, a PCA job, one edit) passes. Only what a pod cannot
    have here is changed: /etc/latentedit -> a folder, the repository, ports, and the in-cluster
    names -> localhost (the dns:/// scheme stays)."""
    from latentedit.rpc.security import make_certs
    from tests.conftest import free_port

    docs = render("default", *TLS_SETS)
    etc = tmp_path / "etc" / "latentedit"
    paths = make_certs(tmp_path / "pki", hosts=("localhost",), tokens=False)
    files = {
        "tls/tls.crt": paths["server.crt"], "tls/tls.key": paths["server.key"], "tls/ca.crt": paths["ca.crt"],
        "client-tls/tls.crt": paths["client.crt"], "client-tls/tls.key": paths["client.key"],
    }
    for name, source in files.items():
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_bytes(source.read_bytes())
    (etc / "tokens").mkdir()
    for key, text in one(docs, "Secret", f"{PREFIX}-tokens")["stringData"].items():
        (etc / "tokens" / key).write_text(text)
    (etc / "config").mkdir()
    for key, text in one(docs, "ConfigMap", f"{PREFIX}-config")["data"].items():
        (etc / "config" / key).write_text(text.replace("/etc/latentedit", str(etc)))
    config = yaml.safe_load((etc / "config" / "config.yaml").read_text())
    ports = {name: free_port() for name in SERVICES}
    config["repository"] = str(fresh_repo.root)
    for name, port in ports.items():
        config["services"][name]["port"] = port
        scheme = "dns:///" if config["addresses"][name].startswith("dns:///") else ""
        config["addresses"][name] = f"{scheme}localhost:{port}"
    config["observability"]["metrics_port"] = 0  # four processes on one host
    config["generator"]["poll_interval_s"] = 1
    (etc / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    assert config["security"]["require_client_cert"] is True and config["security"]["insecure"] is False

    env = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    env.update(PYTHONUNBUFFERED="1", PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(etc / "config" / "config.yaml"), "serve"],
                               cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        pod = one(docs, "Pod", f"{PREFIX}-test")
        script = pod["spec"]["containers"][0]["args"][0].replace("/etc/latentedit", str(etc))
        script = script.replace("/tmp/helm-test-edit", str(tmp_path / "helm-test-edit"))
        done = subprocess.run(["/bin/sh", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\nserve log:\n{log.read_text()[-3000:]}"
        assert "all SERVING" in done.stdout
        assert list(tmp_path.glob("helm-test-edit*")), done.stdout
        probe_env = {**env, "LATENTEDIT_PROBE_SERVER_NAME": "localhost"}
        for name, port in ports.items():
            container = workload(docs, name)["spec"]["template"]["spec"]["containers"][0]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                command = [part.replace("/etc/latentedit", str(etc)) for part in container[probe]["exec"]["command"]]
                command[0], command[2] = sys.executable, str(port)
                checked = subprocess.run(command, env=probe_env, capture_output=True, text=True, timeout=60)
                assert checked.returncode == 0, (name, probe, checked.stderr)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_deploy_has_one_source_of_manifests() -> None:
    """deploy/k8s (hand-written kustomize) is gone: `helm template` is the way to plain manifests."""
    assert not (ROOT / "deploy" / "k8s").exists()


# ---- the image (static: no Docker engine or base image can be had here) --------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "unterminated continuation line"
    return instructions


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (the FROM first); the global ARGs under ''."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for instruction, args in dockerfile_instructions((ROOT / "deploy" / "Dockerfile").read_text()):
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = match[2]
            assert current not in stages, f"stage {current} twice"
            stages[current] = []
        stages[current].append((instruction, args))
    return stages


def _stage_chain(stages: dict[str, list[tuple[str, str]]], name: str) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it builds on."""
    base = stages[name][0][1].split()[0]
    return (_stage_chain(stages, base) if base in stages else []) + stages[name]


def test_dockerfile_is_multi_stage_non_root_labelled() -> None:
    stages = dockerfile_stages()
    names = list(stages)
    assert {"build-cpu", "build-cuda", "runtime", "cpu", "cuda"} <= set(names), names
    assert names[-1] == "cpu", "the default target (last stage) is the CPU image"
    for final, build in (("cpu", "build-cpu"), ("cuda", "build-cuda")):
        chain = _stage_chain(stages, final)
        # Nothing of the build stages but the venv reaches the image.
        copies = [a for i, a in stages[final] if i == "COPY" and "--from=" in a]
        assert copies == [f"--from={build} --chown=root:root /opt/venv /opt/venv"], copies
        users = [a for i, a in chain if i == "USER"]
        assert users and users[-1] == "10001:10001", users  # the chart's runAsUser; root owns the files
        assert not [a for i, a in chain if i == "RUN" and ("chmod 777" in a or "chown -R latentedit" in a)]
        labels = " ".join(a for i, a in chain if i == "LABEL")
        for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
            assert f"org.opencontainers.image.{key}=" in labels, key
        entrypoint = [a for i, a in chain if i == "ENTRYPOINT"]
        assert entrypoint == ['["latentedit"]'], entrypoint
        assert "useradd --system --uid 10001" in " ".join(a for i, a in chain if i == "RUN")
    # The final images start from the same Python base as the build (the venv's interpreter path).
    assert stages["runtime"][0][1].split()[0] == stages["build-base"][0][1].split()[0] == "${PYTHON_IMAGE}"
    (python_image,) = [a for i, a in stages[""] if i == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", python_image), python_image


def test_dockerfile_installs_from_the_lock_without_a_hard_coded_index() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    instructions = dockerfile_instructions(text)
    # No URL in any instruction (comments may show example build arguments): indexes come from
    # build arguments, and nothing is fetched with ADD, curl or wget.
    for instruction, args in instructions:
        if instruction == "LABEL":
            continue
        assert not re.search(r"\w+://", args), f"{instruction} {args}"
        assert instruction != "ADD", "COPY only"
        assert not re.search(r"\b(curl|wget)\b", args), args
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "TORCH_INDEX_URL"):
        assert f'ARG {name}=""' in text, name
    runs = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    assert any("-r /tmp/lock-without-torch.txt" in r and "--no-deps" in r
               and "grep -v -E '^(torch|playwright|greenlet)==' requirements.lock" in r for r in runs), runs
    torch_installs = [r for r in runs if "grep '^torch==' requirements.lock" in r]
    assert len(torch_installs) == 2, runs  # CPU and CUDA: torch's version is the lock's
    for r in torch_installs:
        assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in r, r
        assert re.search(r"--index-url(?! \"\$TORCH_INDEX_URL\")", r) is None, r
    cuda = [r for r in torch_installs if "-c requirements.lock" in r]
    assert len(cuda) == 1 and "--no-deps" not in cuda[0], "the CUDA wheel needs its nvidia-* libraries"
    assert "--no-deps" in [r for r in torch_installs if r not in cuda][0]
    assert re.search(r"^torch==\d", (ROOT / "requirements.lock").read_text(), flags=re.M)
    copied = {a.split()[0] for i, a in instructions if i == "COPY" and "--from=" not in a and "--chown" not in a}
    assert {"requirements.lock", "latentedit", "generator_svc", "scorer_svc", "trainer_svc", "editor_svc", "web_svc"} <= copied
    assert not copied & {".", ".venv", "model-repo", "out"}, copied


def test_docker_context_excludes_the_local_environment() -> None:
    lines = [ln.strip() for ln in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: everything else stays out (.venv, model-repo, out, certificates)"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {a.split()[0] for i, a in dockerfile_instructions((ROOT / "deploy" / "Dockerfile").read_text())
              if i == "COPY" and "--from=" not in a for a in [a.replace("--chown=root:root ", "")]}
    assert copied <= allowed | {"pyproject.toml", "README.md"}, copied - allowed
    assert not allowed & {".venv", "model-repo", "out"}


def test_the_image_carries_the_shipped_defaults_and_the_web_page(tmp_path) -> None:
    """An installed package has no source tree: the image copies defaults/ and names it in
    LATENTEDIT_SHIPPED_DEFAULTS (which the installer honours), and the page ships as package data."""
    instructions = dockerfile_instructions((ROOT / "deploy" / "Dockerfile").read_text())
    (target,) = [a.split()[-1] for i, a in instructions if i == "COPY" and a.split()[-2] == "defaults"]
    assert f"LATENTEDIT_SHIPPED_DEFAULTS={target}" in [a for i, a in instructions if i == "ENV"]
    probe = "from latentedit import install; print(install.SHIPPED_DIR)"
    env = {**os.environ, "LATENTEDIT_SHIPPED_DEFAULTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path)
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data["web_svc"] == ["static/*"] and (ROOT / "web_svc" / "static" / "index.html").is_file()
