"""The Kubernetes manifests: schema-valid offline, and wired together the way the docs say."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers.deploy_checks import (
    K8S_DIR,
    K8S_VERSIONS,
    RENDERS,
    Cli,
    hornet_argv,
    one,
    read_env_file,
    verified_precisions,
)

# Bare `gpu`/`cpu` would be test keywords: tests/conftest.py skips anything keyed `gpu`.
SERVING = (
    "overlays/cpu",
    "overlays/cpu-openvino",
    "overlays/gpu",
    "examples/queue-depth-hpa",
    "examples/grpc",
    "examples/network-policy",
    "examples/tracing",
)
GPU_RENDERS = ("overlays/gpu", "examples/queue-depth-hpa")
# CPU overlays and the engine each serves with.
CPU_RENDERS = {
    "overlays/cpu": "onnxruntime",
    "overlays/cpu-openvino": "openvino",
    "examples/grpc": "onnxruntime",
    "examples/network-policy": "onnxruntime",
    "examples/tracing": "onnxruntime",
}
# Where the export Job must run on the kind of hardware that serves: a TensorRT engine
# runs only on the GPU type that built it; a bf16 verification holds for the CPU it ran on.
PINNED = (*GPU_RENDERS, "overlays/cpu-openvino")
# Renders only with a key file that is never committed: checked on a copy (below).
API_KEYS_EXAMPLE = "examples/api-keys"


def _kustomizations() -> list[Path]:
    return sorted(K8S_DIR.rglob("kustomization.yaml"))


def _patch_files() -> set[Path]:
    patches = set()
    for kustomization in _kustomizations():
        spec = yaml.safe_load(kustomization.read_text())
        for patch in spec.get("patches", []):
            if "path" in patch:
                patches.add((kustomization.parent / patch["path"]).resolve())
    return patches


def _standalone_manifests() -> list[Path]:
    """Complete objects on disk: everything but kustomizations and patches."""
    skip = _patch_files() | {k.resolve() for k in _kustomizations()}
    return [p for p in sorted(K8S_DIR.rglob("*.yaml")) if p.resolve() not in skip]


def _kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (offline k8s schemas)"
    )


def _validate(document: dict, version: str) -> None:
    kubernetes_validate = _kubernetes_validate()
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(p) for p in error.path)
        name = document["metadata"]["name"]
        pytest.fail(f"{document['kind']}/{name} at {where}: {error.message} (k8s {version})")


# --- schema --------------------------------------------------------------------------------


def test_every_manifest_is_validated_somewhere():
    """Standalone files are validated as they are; patches only inside a rendered whole."""
    assert not list(K8S_DIR.rglob("*.yml")), "use .yaml: the checks below look for it"
    rendered_dirs = {(K8S_DIR / r).resolve() for r in (*RENDERS, API_KEYS_EXAMPLE)}
    assert {k.parent.resolve() for k in _kustomizations()} == rendered_dirs
    for patch in _patch_files():
        assert patch.parent in rendered_dirs, f"{patch} is patched in but never rendered"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _standalone_manifests(), ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_manifest_file_validates_strictly(path: Path, version: str):
    for document in yaml.safe_load_all(path.read_text()):
        _validate(document, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", RENDERS)
def test_rendered_kustomization_validates_strictly(kustomization: str, version: str, rendered):
    for document in rendered(kustomization):
        _validate(document, version)


def test_strict_validation_rejects_an_unknown_field():
    kubernetes_validate = _kubernetes_validate()
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetPort": "http", "protocl": "TCP"}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSIONS[0], strict=True)


# --- the serving pod -----------------------------------------------------------------------


def _pod(objects: list[dict], kind: str) -> dict:
    return one(objects, kind)["spec"]["template"]["spec"]


def _container(pod: dict, name: str) -> dict:
    return next(c for c in pod["containers"] if c["name"] == name)


def _config(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap", "hornet-serve-config")["data"]


@pytest.mark.parametrize("kustomization", SERVING)
def test_probes_and_scrapes_use_the_metrics_port(kustomization: str, rendered):
    """The kubelet's probes and Prometheus' annotation go to HORNET_METRICS_PORT, which
    the container declares as `metrics` and the Service does not forward: a flood of the
    API port's connections does not fail them (docs/limits.md)."""
    objects = rendered(kustomization)
    config = _config(objects)
    pod = one(objects, "Deployment")["spec"]["template"]
    server = _container(pod["spec"], "hornet-serve")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["http"] == int(config["HORNET_PORT"])
    assert ports["metrics"] == int(config["HORNET_METRICS_PORT"]) != ports["http"]
    probes = {
        kind: server[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert {k: p["path"] for k, p in probes.items()} == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    assert all(p["port"] in ("metrics", ports["metrics"]) for p in probes.values())
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    forwarded = {p["targetPort"] for p in one(objects, "Service")["spec"]["ports"]}
    assert not forwarded & {"metrics", ports["metrics"]}


@pytest.mark.parametrize("kustomization", SERVING)
def test_a_grpc_port_is_the_containers_and_the_services(kustomization: str, rendered):
    """Where the settings open a gRPC port, the container declares it as `grpc` and the
    Service forwards a port to it; where they do not, neither does."""
    objects = rendered(kustomization)
    server = _container(_pod(objects, "Deployment"), "hornet-serve")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    service_ports = {p["name"]: p for p in one(objects, "Service")["spec"]["ports"]}
    grpc_port = int(_config(objects).get("HORNET_GRPC_PORT", "0"))
    if not grpc_port:
        assert "grpc" not in ports and "grpc" not in service_ports
        return
    assert ports["grpc"] == grpc_port and ports["http"] != grpc_port
    assert service_ports["grpc"]["targetPort"] in ("grpc", grpc_port)
    assert service_ports["grpc"].get("appProtocol") == "grpc"


def test_the_network_policy_lets_each_port_only_its_own_peers_in(rendered):
    """The example's policy selects the serving pods (not the export Job); the API port,
    which the Service forwards, is open to the ingress controller and the namespace's pods;
    the metrics port to Prometheus' namespace only, and no rule opens every port."""
    objects = rendered("examples/network-policy")
    policy = one(objects, "NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    served = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    exported = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= served.items() and not selector.items() <= exported.items()
    assert policy["policyTypes"] == ["Ingress"]
    server = _container(_pod(objects, "Deployment"), "hornet-serve")
    ports = {p["name"] for p in server["ports"]}
    rules = {}
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port"
        for port in rule["ports"]:
            assert port["port"] in ports and port["protocol"] == "TCP"
            rules[port["port"]] = rule["from"]
    assert set(rules) == {"http", "metrics"}
    forwarded = {p["targetPort"] for p in one(objects, "Service")["spec"]["ports"]}
    assert forwarded == {"http"}
    namespaces = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in rules["metrics"]
    }
    assert namespaces == {"monitoring"}
    assert all(set(peer) == {"namespaceSelector"} for peer in rules["metrics"])
    assert {"podSelector": {}} in rules["http"]


def test_the_grpc_example_serves_grpc(rendered):
    assert int(_config(rendered("examples/grpc"))["HORNET_GRPC_PORT"]) == 8001


@pytest.mark.parametrize("kustomization", SERVING)
def test_shutdown_grace_covers_prestop_and_drain(kustomization: str, rendered):
    objects = rendered(kustomization)
    pod = _pod(objects, "Deployment")
    pre_stop = _container(pod, "hornet-serve")["lifecycle"]["preStop"]["sleep"]["seconds"]
    config = _config(objects)
    drain = float(config["HORNET_DRAIN_TIMEOUT_S"])
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach every proxy"
    # `hornet serve` bounds each of its two drain phases (open requests, then the batch
    # queues) by HORNET_DRAIN_TIMEOUT_S: see tests/deploy/test_deploy_shutdown.py.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * drain
    assert drain >= float(config["HORNET_REQUEST_TIMEOUT_S"]), "drain shorter than a request"


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
@pytest.mark.parametrize("kustomization", SERVING)
def test_pods_are_non_root_read_only_with_a_tmp_emptydir(kustomization: str, kind: str, rendered):
    pod = _pod(rendered(kustomization), kind)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    for container in pod["containers"]:
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], container["name"]


def _quantity(value) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
@pytest.mark.parametrize("kustomization", SERVING)
def test_every_container_has_requests_within_limits(kustomization: str, kind: str, rendered):
    pod = _pod(rendered(kustomization), kind)
    for container in pod.get("initContainers", []) + pod["containers"]:
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys()
        for resource, limit in limits.items():
            assert _quantity(requests[resource]) <= _quantity(limit), (container["name"], resource)


@pytest.mark.parametrize("kustomization", SERVING)
def test_settings_come_from_the_rendered_configmap(kustomization: str, rendered):
    objects = rendered(kustomization)
    server = _container(_pod(objects, "Deployment"), "hornet-serve")
    names = [e["configMapRef"]["name"] for e in server["envFrom"]]
    assert names == [one(objects, "ConfigMap", "hornet-serve-config")["metadata"]["name"]]
    assert all(key.startswith("HORNET_") for key in _config(objects))


@pytest.mark.parametrize("kustomization", SERVING)
def test_service_pdb_and_hpa_target_the_serving_pods(kustomization: str, rendered):
    objects = rendered(kustomization)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {
        p["name"] for p in _container(_pod(objects, "Deployment"), "hornet-serve")["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert (
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items()
        <= labels.items()
    )
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= job_labels.items(), "Service selects the Job"
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"


def _claim_mount(pod: dict, container: str, claim: str) -> dict:
    volume = next(
        v["name"]
        for v in pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    )
    return next(m for m in _container(pod, container)["volumeMounts"] if m["name"] == volume)


@pytest.mark.parametrize("kustomization", SERVING)
def test_export_job_writes_the_bundles_the_server_loads(kustomization: str, rendered):
    objects = rendered(kustomization)
    claim = one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    serve = _claim_mount(_pod(objects, "Deployment"), "hornet-serve", claim)
    export = _claim_mount(_pod(objects, "Job"), "export", claim)
    assert serve["mountPath"] == export["mountPath"]
    assert serve.get("readOnly") is True and not export.get("readOnly")
    # HORNET_MODEL_DIR is a comma-separated list of bundle directories (service.settings).
    bundles = [Path(d) for d in _config(objects)["HORNET_MODEL_DIR"].split(",") if d]
    assert bundles and all(Path(serve["mountPath"]) in b.parents for b in bundles), bundles
    args = _container(_pod(objects, "Job"), "export")["args"]
    assert Path(args[args.index("--out") + 1]) in bundles, "the Job exports a bundle not served"


@pytest.mark.parametrize("kustomization", SERVING)
def test_engine_threads_fit_the_cpu_limit(kustomization: str, rendered):
    objects = rendered(kustomization)
    limit = _quantity(
        _container(_pod(objects, "Deployment"), "hornet-serve")["resources"]["limits"]["cpu"]
    )
    config = _config(objects)
    threads = int(config["HORNET_ENGINE_THREADS"])
    assert 1 <= threads, "0 (auto) sizes the pool from the node, not the limit"
    # Each instance runs its own threads (OpenVINO: a stream of them each).
    assert threads * int(config.get("HORNET_INSTANCES", "1")) <= limit


@pytest.mark.parametrize("kustomization", SERVING)
def test_the_served_precision_is_one_the_export_verifies(kustomization: str, rendered):
    """`hornet serve` refuses a precision its bundle's manifest has no passed record for."""
    objects = rendered(kustomization)
    config = _config(objects)
    args = _container(_pod(objects, "Job"), "export")["args"]
    precision = config.get("HORNET_PRECISION")
    if precision is None and config["HORNET_ENGINE"] == "tensorrt":
        # No precision asked: the bundle's TensorRT engine, verified when it is built.
        assert args[args.index("--format") + 1] in ("tensorrt", "all"), args
        return
    assert (precision or "fp32") in verified_precisions(args), (precision, args)


@pytest.mark.parametrize("kustomization", SERVING)
def test_containers_call_accepted_cli_commands(kustomization: str, rendered, cli: Cli):
    objects = rendered(kustomization)
    # The images' entrypoints (docker/*.Dockerfile): `hornet` to serve, `hornet export`.
    serve = ["hornet", *_container(_pod(objects, "Deployment"), "hornet-serve")["args"]]
    export = ["hornet", "export", *_container(_pod(objects, "Job"), "export")["args"]]
    for argv in (serve, export):
        assert cli.error(hornet_argv(argv, cli)) is None, cli.error(hornet_argv(argv, cli))


def test_export_job_variant_is_registered(rendered):
    registry = pytest.importorskip("model_export.registry", reason="needs torch (the export extra)")
    for kustomization in SERVING:
        args = _container(_pod(rendered(kustomization), "Job"), "export")["args"]
        registry.get_variant(args[args.index("--variant") + 1])


# --- CPU and GPU overlays ------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", CPU_RENDERS)
def test_cpu_overlays_ask_for_no_gpu(kustomization: str, rendered):
    objects = rendered(kustomization)
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(objects)
    config = _config(objects)
    assert (config["HORNET_ENGINE"], config["HORNET_DEVICE"]) == (CPU_RENDERS[kustomization], "cpu")


def test_bf16_pods_run_on_nodes_whose_cpu_the_service_runs_bf16_on(rendered):
    """The nodeSelector names (as Node Feature Discovery's cpuid label) one of the CPU flags
    by which `hornet serve` decides that bf16 runs here; elsewhere it refuses to start."""
    from service.engines import BF16_CPU_FLAGS

    objects = rendered("overlays/cpu-openvino")
    assert _config(objects)["HORNET_PRECISION"] == "bf16"
    selector = _pod(objects, "Deployment")["nodeSelector"]
    prefix = "feature.node.kubernetes.io/cpu-cpuid."
    flags = {
        k.removeprefix(prefix) for k, v in selector.items() if k.startswith(prefix) and v == "true"
    }
    accepted = {flag.replace("_", "").upper() for flag in BF16_CPU_FLAGS}
    assert flags and flags <= accepted, (flags, accepted)


@pytest.mark.parametrize("kustomization", GPU_RENDERS)
@pytest.mark.parametrize(("kind", "container"), [("Deployment", "hornet-serve"), ("Job", "export")])
def test_gpu_pods_get_one_gpu_on_tainted_gpu_nodes(kustomization, kind, container, rendered):
    pod = _pod(rendered(kustomization), kind)
    resources = _container(pod, container)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"], "no GPU node selector"
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
    )


@pytest.mark.parametrize("kustomization", PINNED)
def test_bundles_are_built_on_the_hardware_that_serves_them(kustomization, rendered):
    objects = rendered(kustomization)
    selector = _pod(objects, "Deployment")["nodeSelector"]
    assert selector and _pod(objects, "Job")["nodeSelector"] == selector


@pytest.mark.parametrize("kustomization", GPU_RENDERS)
def test_gpu_server_uses_tensorrt_within_the_engine_batch_profile(kustomization, rendered):
    objects = rendered(kustomization)
    config = _config(objects)
    assert (config["HORNET_ENGINE"], config["HORNET_DEVICE"]) == ("tensorrt", "cuda")
    args = _container(_pod(objects, "Job"), "export")["args"]
    assert args[args.index("--format") + 1] in ("tensorrt", "all")
    profile_max = int(args[args.index("--batch") + 1].split(":")[2])
    assert int(config["HORNET_MAX_BATCH_SIZE"]) <= profile_max


def test_gpu_rollout_needs_no_spare_gpu(rendered):
    strategy = one(rendered("overlays/gpu"), "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxSurge"] == 0 and strategy["maxUnavailable"] >= 1


# --- autoscaling ---------------------------------------------------------------------------


def test_default_hpa_scales_on_cpu(rendered):
    metrics = one(rendered("overlays/gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [(m["type"], m["resource"]["name"]) for m in metrics] == [("Resource", "cpu")]


def test_queue_depth_example_scales_on_the_metric_the_adapter_serves(rendered):
    metrics = one(rendered("examples/queue-depth-hpa"), "HorizontalPodAutoscaler")["spec"][
        "metrics"
    ]
    assert [(m["type"], m["pods"]["metric"]["name"]) for m in metrics] == [
        ("Pods", "hornet_queue_depth")
    ]
    adapter = yaml.safe_load((K8S_DIR / "examples/prometheus-adapter-rules.yaml").read_text())
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == "hornet_queue_depth" for r in rules)
    assert all(re.match(r"hornet_queue_depth\b", r["seriesQuery"]) for r in rules)


def _exported_series() -> dict[str, set[str]]:
    """Each series name the server's metrics can have (a counter's `_total`, a
    histogram's `_bucket`, ...), with the labels it carries."""
    metrics = pytest.importorskip("service.metrics")
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    served = metrics.ServiceMetrics()
    series = {  # what a scrape has now (the collectors of their own, e.g. the log's)
        sample.name: set(sample.labels)
        for family in served.registry.collect()
        for sample in family.samples
    }
    for collector in vars(served).values():  # the labelled ones have no sample yet
        if not hasattr(collector, "_labelnames"):
            continue
        family = collector._name  # noqa: SLF001 (prometheus_client keeps it there)
        labels = set(collector._labelnames)  # noqa: SLF001
        kind = collector._type  # noqa: SLF001
        for suffix in suffixes.get(kind, ("",)):
            series[family + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def test_the_alerts_name_only_series_and_labels_the_server_exports():
    """Every `hornet_*` series an alert reads is one the server exports, every label an
    alert selects or groups by is one of that series' (or `namespace`/`pod`, which
    Prometheus' service discovery adds), and each alert says how bad it is and what."""
    config = yaml.safe_load((K8S_DIR / "examples/prometheus-alerts.yaml").read_text())
    groups = yaml.safe_load(config["data"]["hornet-serve.rules.yaml"])["groups"]
    alerts = [rule for group in groups for rule in group["rules"]]
    assert len({alert["alert"] for alert in alerts}) == len(alerts) >= 5
    exported = _exported_series()
    discovered = {"namespace", "pod"}
    for alert in alerts:
        expr = alert["expr"]
        names = re.findall(r"\b(hornet_\w+)", expr)
        assert names, alert["alert"]
        for name in names:
            assert name in exported, f"{alert['alert']}: {name} is not exported"
        labels = set().union(*(exported[name] for name in names)) | discovered
        selected = re.findall(r"(\w+)\s*(?:=~|!=|!~|=)\s*\"", expr)
        grouped = [
            label.strip()
            for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr)
            for label in clause.split(",")
        ]
        for label in [*selected, *grouped]:
            assert label in labels, f"{alert['alert']}: no label {label!r} on {names}"
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"]


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("env_file", sorted(K8S_DIR.rglob("*.env")), ids=lambda p: p.name)
def test_configmap_sets_only_real_settings(env_file: Path, env_names: set[str]):
    unknown = set(read_env_file(env_file)) - env_names
    assert not unknown, (
        f"{env_file.name} sets {sorted(unknown)}, which `hornet serve` does not read"
    )


@pytest.mark.parametrize("kustomization", SERVING)
def test_configmap_values_are_accepted_by_the_settings(
    kustomization: str, rendered, settings_class: type, monkeypatch: pytest.MonkeyPatch
):
    for name in [n for n in os.environ if n.startswith("HORNET_")]:
        monkeypatch.delenv(name)
    for name, value in _config(rendered(kustomization)).items():
        monkeypatch.setenv(name, value)
    settings_class()


# --- tracing (k8s/examples/tracing) --------------------------------------------------------


def test_the_tracing_example_exports_and_names_the_pod(rendered, settings_class: type):
    """The endpoint and rate reach the settings; the resource attributes use only
    variables defined before them in the container's env (Kubernetes expands $(NAME) from
    earlier entries only, and leaves the text as it is otherwise); the collector's headers
    come from an optional Secret, never a literal."""
    objects = rendered("examples/tracing")
    config = _config(objects)
    settings = settings_class(
        model_dir=[Path("/models")],
        trace_endpoint=config["HORNET_TRACE_ENDPOINT"],
        trace_rate=config["HORNET_TRACE_RATE"],
    )
    assert settings.trace_endpoint.endswith("/v1/traces") and settings.trace_rate == 100
    server = _container(_pod(objects, "Deployment"), "hornet-serve")
    env = server["env"]
    names = [entry["name"] for entry in env]
    attributes = next(e for e in env if e["name"] == "OTEL_RESOURCE_ATTRIBUTES")["value"]
    used = re.findall(r"\$\((\w+)\)", attributes)
    position = names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert used and all(names.index(name) < position for name in used)
    pairs = dict(pair.split("=", 1) for pair in attributes.split(","))
    assert set(pairs) == {"k8s.pod.name", "k8s.namespace.name", "k8s.node.name"}
    headers = next(e for e in env if e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
    assert "value" not in headers and headers["valueFrom"]["secretKeyRef"]["optional"] is True


# --- API keys (k8s/examples/api-keys) ------------------------------------------------------

EXAMPLE_KEYS = "# rotation: the new key first, the old one until clients moved\nkey-new\nkey-old\n"


@pytest.fixture(scope="module")
def api_keys_objects(rendered, tmp_path_factory) -> list[dict]:
    """The example rendered from a copy of k8s/ holding a made-up api-keys.txt (the real
    one is git-ignored). An absolute path passed to `rendered` replaces K8S_DIR."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S_DIR, copy, ignore=shutil.ignore_patterns("api-keys.txt"))
    (copy / API_KEYS_EXAMPLE / "api-keys.txt").write_text(EXAMPLE_KEYS)
    return rendered(str(copy / API_KEYS_EXAMPLE))


def test_api_keys_file_is_git_ignored():
    ignored = (K8S_DIR / API_KEYS_EXAMPLE / ".gitignore").read_text().split()
    assert "api-keys.txt" in ignored


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_api_keys_example_validates_strictly(api_keys_objects: list[dict], version: str):
    for document in api_keys_objects:
        _validate(document, version)


def test_api_keys_secret_is_mounted_read_only_where_the_key_file_setting_points(
    api_keys_objects: list[dict], env_names: set[str]
):
    secret = one(api_keys_objects, "Secret", "hornet-api-keys")
    deployment = one(api_keys_objects, "Deployment")
    assert secret["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]  # hash suffix too
    server = _container(pod, "hornet-serve")
    mount = next(m for m in server["volumeMounts"] if m["name"] == volume["name"])
    assert mount.get("readOnly") is True and "subPath" not in mount
    env = {e["name"]: e["value"] for e in server["env"]}
    assert "HORNET_API_KEY_FILE" in env_names
    assert Path(env["HORNET_API_KEY_FILE"]) == Path(mount["mountPath"]) / "keys"
    assert set(secret["data"]) == {"keys"}


def test_api_keys_secret_holds_a_key_file_the_settings_read(
    api_keys_objects: list[dict], settings_class: type, tmp_path: Path
):
    data = one(api_keys_objects, "Secret", "hornet-api-keys")["data"]["keys"]
    key_file = tmp_path / "keys"
    key_file.write_bytes(base64.b64decode(data))
    settings = settings_class(model_dir=[tmp_path], api_key_file=key_file)
    key_ring = pytest.importorskip("service.auth").KeyRing
    keys = key_ring(settings.api_keys, settings.api_key_file)  # as the server reads them
    assert keys.keys() == [b"key-new", b"key-old"]


def test_api_keys_example_leaves_the_probes_open(api_keys_objects: list[dict]):
    server = _container(_pod(api_keys_objects, "Deployment"), "hornet-serve")
    probes = [
        server[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    ]
    assert [p["path"] for p in probes] == ["/readyz", "/readyz", "/healthz"]
    assert not any("httpHeaders" in p for p in probes), "keys in probes would sit in the spec"
    settings = {**_config(api_keys_objects), **{e["name"]: e["value"] for e in server["env"]}}
    assert settings.get("HORNET_PROTECT_PROBES", "false").lower() in ("false", "0")


def _wait_for_bundles(objects: list[dict], env: dict[str, str]) -> tuple[bool, str]:
    """Runs the wait-for-bundles init container's command of `objects` here with `env`:
    whether it let the pod go on within 5 s, and what it printed."""
    import subprocess
    import sys

    pod = _pod(objects, "Deployment")
    (init,) = [c for c in pod["initContainers"] if c["name"] == "wait-for-bundles"]
    assert init["command"][:2] == ["python", "-c"]
    try:
        done = subprocess.run(
            [sys.executable, "-c", init["command"][2]],
            env={"PATH": os.environ.get("PATH", ""), **env},
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except subprocess.TimeoutExpired as waited:
        printed = waited.stdout.decode() if isinstance(waited.stdout, bytes) else waited.stdout
        return False, printed or ""
    assert done.returncode == 0, done.stderr
    return True, done.stdout


def test_the_init_container_waits_for_the_bundles_and_repositories_it_is_given(rendered, tmp_path):
    objects = rendered("overlays/cpu")
    bundle, repository, empty = tmp_path / "b", tmp_path / "repo", tmp_path / "empty"
    for folder in (bundle, repository / "m", repository / "lost+found", empty):
        folder.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    (repository / "m" / "manifest.json").write_text("{}")
    assert _wait_for_bundles(objects, {"HORNET_MODEL_DIR": str(bundle)}) == (True, "")
    assert _wait_for_bundles(objects, {"HORNET_MODEL_REPOSITORY": str(repository)}) == (True, "")
    both = {"HORNET_MODEL_DIR": str(bundle), "HORNET_MODEL_REPOSITORY": f"{repository},{empty}"}
    went_on, printed = _wait_for_bundles(objects, both)
    assert not went_on and str(empty) in printed and f"'{repository}'" not in printed
    later = {"HORNET_MODEL_DIR": f"{bundle},{tmp_path / 'later'}"}
    went_on, printed = _wait_for_bundles(objects, later)
    assert not went_on and "waiting for the export Job" in printed
