"""The Kubernetes manifests, rendered for each overlay and checked like
code: valid against the pinned Kubernetes schemas (offline), locked down,
probed, sized, and in agreement with what the services' code reads and
listens on."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest

from tests.deploy.manifests import (
    KUBERNETES_VERSION,
    OVERLAYS,
    WORKLOAD_KINDS,
    Obj,
    config_map,
    consumer_names,
    containers,
    env_names,
    infrastructure_of,
    label_selector_matches,
    matches,
    named,
    of_kind,
    peers_of,
    pod_labels,
    pod_spec,
    quantity,
    rendered,
    setting_names,
    workloads,
)
from tests.deploy.network import Pod, allowed, outside_ingress_rules

pytestmark = pytest.mark.unit

CERT_MANAGER_SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "cert-manager-v1.json").read_text()
)
INFRA_APPS = {"postgres": "postgres", "amqp": "rabbitmq", "redis": "redis"}
INFRA_PORTS = {"postgres": 5432, "amqp": 5672, "redis": 6379}
TLS_MOUNT = "/etc/moneta/tls"
CONTAINER_TMP = "/tmp"  # noqa: S108 - a path inside the containers, backed by an emptyDir


def _key(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _moneta_deployments(objects: tuple[Obj, ...]) -> list[Obj]:
    return [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] in workloads()]


def _long_running(objects: tuple[Obj, ...]) -> list[Obj]:
    return of_kind(objects, "Deployment", "StatefulSet")


def _port(container: Obj, name: str) -> int:
    found = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    assert len(found) == 1, f"{container['name']}: no port named {name}"
    return int(found[0])


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_pinned_schemas(overlay: str) -> None:
    objects = rendered(overlay)
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith("cert-manager.io/"):
            schema = {**CERT_MANAGER_SCHEMA, "$ref": f"#/$defs/{obj['kind']}"}
            jsonschema.Draft202012Validator(schema).validate(obj)
        else:
            # strict: an unknown field anywhere is an error, not ignored.
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_pinned_kubernetes_version_is_one_kubernetes_validate_ships() -> None:
    assert KUBERNETES_VERSION.rsplit(".", 1)[0] in {
        v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_moneta_namespace(overlay: str) -> None:
    assert {o["metadata"].get("namespace") for o in rendered(overlay)} == {"moneta"}


# ------------------------------------------------------ containers and pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_startup_liveness_and_readiness_probes(
    overlay: str,
) -> None:
    for workload in _long_running(rendered(overlay)):
        for container in containers(workload):
            missing = {"startupProbe", "livenessProbe", "readinessProbe"} - set(container)
            assert not missing, f"{_key(workload)}: {missing}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_within_them(overlay: str) -> None:
    for workload in of_kind(rendered(overlay), *WORKLOAD_KINDS):
        for container in containers(workload):
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{_key(workload)} {resource}"


def test_the_wallet_is_sized_as_the_design_asks() -> None:
    for overlay in OVERLAYS:
        (wallet,) = containers(named(rendered(overlay), "Deployment", "wallet"))
        assert wallet["resources"] == {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "1000m", "memory": "1Gi"},
        }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_and_container_is_locked_down(overlay: str) -> None:
    for workload in of_kind(rendered(overlay), *WORKLOAD_KINDS):
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, _key(workload)
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, _key(workload)
        assert spec.get("automountServiceAccountToken") is False, _key(workload)
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), _key(workload)
        for container in containers(workload):
            context = container.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, _key(workload)
            assert context.get("allowPrivilegeEscalation") is False, _key(workload)
            assert context.get("readOnlyRootFilesystem") is True, _key(workload)
            assert context.get("capabilities") == {"drop": ["ALL"]}, _key(workload)
            assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, _key(workload)
            assert not context.get("privileged"), _key(workload)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_moneta_pods_run_as_the_images_user_with_a_writable_tmp(overlay: str) -> None:
    for workload in [
        *_moneta_deployments(rendered(overlay)),
        named(rendered(overlay), "Job", "moneta-migrate"),
    ]:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsUser"] == 10001, _key(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == CONTAINER_TMP]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], _key(workload)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_the_pause_and_the_drain(overlay: str) -> None:
    objects = rendered(overlay)
    drain = float(config_map(objects)["MONETA_SHUTDOWN_GRACE_SECONDS"])
    for workload in _moneta_deployments(objects):
        (container,) = containers(workload)
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod_spec(workload)["terminationGracePeriodSeconds"] > pause + drain


# ------------------------------------------------------ probes and ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_probes_ask_the_health_port_for_the_names_the_code_registers(overlay: str) -> None:
    objects = rendered(overlay)
    health_port = int(config_map(objects)["MONETA_GRPC_HEALTH_PORT"])
    for workload in _moneta_deployments(objects):
        code = workloads()[workload["metadata"]["name"]]
        if not code.health_name:
            continue
        (container,) = containers(workload)
        assert _port(container, "health") == health_port
        assert container["readinessProbe"]["grpc"] == {
            "port": health_port,
            "service": code.health_name,
        }
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": health_port, "service": ""}


def test_the_gateway_probes_its_health_and_ready_routes() -> None:
    from services.gateway.app import create_app
    from services.gateway.config import GatewaySettings

    routes = {getattr(r, "path", "") for r in create_app(GatewaySettings()).routes}
    for overlay in OVERLAYS:
        (container,) = containers(named(rendered(overlay), "Deployment", "gateway"))
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        assert {"/ready", "/health"} <= routes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_workload_listens_on_the_ports_its_code_defaults_to(overlay: str) -> None:
    objects = rendered(overlay)
    deployments = _moneta_deployments(objects)
    assert {d["metadata"]["name"] for d in deployments} == set(workloads())
    for workload in deployments:
        code = workloads()[workload["metadata"]["name"]]
        (container,) = containers(workload)
        main = "http" if code.package == "gateway" else "grpc"
        assert _port(container, main) == code.default(code.port_field), _key(workload)
        if code.metrics_field:
            assert _port(container, "metrics") == code.default(code.metrics_field)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_a_deployment_whose_port_it_targets(overlay: str) -> None:
    objects = rendered(overlay)
    for service in of_kind(objects, "Service"):
        selected = [
            w for w in _long_running(objects) if matches(service["spec"]["selector"], pod_labels(w))
        ]
        assert selected, f"{_key(service)} selects nothing"
        for port in service["spec"]["ports"]:
            for workload in selected:
                (container,) = containers(workload)
                target = port["targetPort"]
                number = _port(container, target) if isinstance(target, str) else target
                assert number in {p["containerPort"] for p in container["ports"]}
                if workload["metadata"]["name"] in workloads():
                    code = workloads()[workload["metadata"]["name"]]
                    assert port["name"] in ("grpc", "http"), _key(service)
                    assert number == code.default(code.port_field), _key(service)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_peers_are_dialled_at_their_services_ports(overlay: str) -> None:
    objects = rendered(overlay)
    data = config_map(objects)
    for name in ("ledger", "wallet", "budget", "fraud"):
        host, port = data[f"MONETA_{name.upper()}_ADDR"].split(":")
        service = named(objects, "Service", host)
        assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
        assert int(port) == workloads()[name].default(f"{name}_port")


# --------------------------------------------------------------- settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_key_and_env_variable_is_a_setting_the_code_reads(overlay: str) -> None:
    objects = rendered(overlay)
    settings = setting_names()
    for cm in of_kind(objects, "ConfigMap"):
        unread = set(cm["data"]) - settings
        assert not unread, f"{_key(cm)}: nothing reads {sorted(unread)}"
    for workload in of_kind(objects, "Deployment", "Job"):
        for container in containers(workload):
            unread = {n for n in env_names(container) if n not in settings}
            assert not unread, f"{_key(workload)}: nothing reads {sorted(unread)}"


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_no_secret_is_kept_in_the_repository_outside_dev(overlay: str) -> None:
    assert of_kind(rendered(overlay), "Secret") == []


def _secret_refs(workload: Obj) -> set[tuple[str, str]]:
    return {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in containers(workload)
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_dev_defines_every_secret_referenced_and_marks_it_development_only() -> None:
    objects = rendered("dev")
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        for name, key in _secret_refs(workload):
            assert key in secrets[name]["stringData"], f"{_key(workload)}: {name}/{key}"
    for secret in secrets.values():
        assert secret["metadata"]["annotations"]["moneta.io/development-only"] == "true"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_workload_gets_the_credentials_of_its_infrastructure_only(overlay: str) -> None:
    credentials = {
        "postgres": "MONETA_POSTGRES_URL",
        "amqp": "MONETA_AMQP_URL",
        "redis": "MONETA_REDIS_URL",
    }
    for workload in _moneta_deployments(rendered(overlay)):
        code = workloads()[workload["metadata"]["name"]]
        (container,) = containers(workload)
        given = {k for k, var in credentials.items() if var in set(env_names(container))}
        assert given == infrastructure_of(code.package), _key(workload)


# ----------------------------------------------------- scale and disruption


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_an_autoscaler_and_a_disruption_budget(overlay: str) -> None:
    objects = rendered(overlay)
    autoscalers = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler")
    }
    budgets = of_kind(objects, "PodDisruptionBudget")
    for workload in _moneta_deployments(objects):
        name = workload["metadata"]["name"]
        scaler = autoscalers[name]["spec"]
        assert scaler["scaleTargetRef"]["kind"] == "Deployment"
        assert scaler["minReplicas"] <= workload["spec"]["replicas"] <= scaler["maxReplicas"]
        covering = [
            b
            for b in budgets
            if label_selector_matches(b["spec"]["selector"], pod_labels(workload))
        ]
        assert len(covering) == 1, name


def test_dev_runs_one_replica_of_each_with_infrastructure_on_volumes() -> None:
    objects = rendered("dev")
    assert {d["spec"]["replicas"] for d in of_kind(objects, "Deployment")} == {1}
    statefulsets = {s["metadata"]["name"]: s for s in of_kind(objects, "StatefulSet")}
    assert set(statefulsets) == set(INFRA_APPS.values())
    for statefulset in statefulsets.values():
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        (container,) = containers(statefulset)
        assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}


def test_prod_runs_three_or_more_of_each_spread_across_zones() -> None:
    objects = rendered("prod")
    autoscalers = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]
        for h in of_kind(objects, "HorizontalPodAutoscaler")
    }
    for workload in _moneta_deployments(objects):
        name = workload["metadata"]["name"]
        assert workload["spec"]["replicas"] >= 3 and autoscalers[name]["minReplicas"] >= 3
        spread = {c["topologyKey"]: c for c in pod_spec(workload)["topologySpreadConstraints"]}
        zone = spread["topology.kubernetes.io/zone"]
        assert zone["whenUnsatisfiable"] == "DoNotSchedule"
        assert label_selector_matches(zone["labelSelector"], pod_labels(workload))
        assert "app.kubernetes.io/name" in zone["matchLabelKeys"]
    assert of_kind(objects, "StatefulSet") == []  # the infrastructure is managed, outside


# --------------------------------------------------------------------- TLS


def test_prod_mounts_a_cert_manager_certificate_into_every_workload_for_mutual_tls() -> None:
    objects = rendered("prod")
    data = config_map(objects)
    assert {data[f"MONETA_TLS_{f}_FILE"] for f in ("CERT", "KEY", "CA")} == {
        f"{TLS_MOUNT}/tls.crt",
        f"{TLS_MOUNT}/tls.key",
        f"{TLS_MOUNT}/ca.crt",
    }
    certificates = {c["spec"]["secretName"]: c for c in of_kind(objects, "Certificate")}
    for workload in _moneta_deployments(objects):
        (container,) = containers(workload)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_MOUNT]
        (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
        certificate = certificates[volume["secret"]["secretName"]]["spec"]
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        issuer = named(objects, certificate["issuerRef"]["kind"], certificate["issuerRef"]["name"])
        assert "ca" in issuer["spec"]
    # Each server's certificate names the host its callers dial.
    for name in ("ledger", "wallet", "budget", "fraud"):
        host = data[f"MONETA_{name.upper()}_ADDR"].split(":")[0]
        assert host in certificates[f"{name}-tls"]["spec"]["dnsNames"]


def test_dev_speaks_plaintext_and_the_migration_job_reads_no_tls_files() -> None:
    assert not any(k.startswith("MONETA_TLS_") for k in config_map(rendered("dev")))
    for overlay in OVERLAYS:
        job = named(rendered(overlay), "Job", "moneta-migrate")
        (container,) = containers(job)
        assert "envFrom" not in container  # prod's TLS paths would need the files mounted


# ----------------------------------------------------------------- network


def _pods(objects: tuple[Obj, ...]) -> list[Pod]:
    pods = []
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        ports: dict[str, int] = {}
        for container in containers(workload):
            for port in container.get("ports", []):
                ports[port["name"]] = ports[str(port["containerPort"])] = port["containerPort"]
        pods.append(Pod(workload["metadata"]["name"], pod_labels(workload), ports))
    return pods


def _expected_reach(pod: Pod) -> set[str]:
    """Whom the code says this pod connects to, by workload name."""
    if pod.name == "moneta-migrate":
        return {"postgres"}
    if pod.name not in workloads():
        return set()  # the infrastructure connects to nobody
    code = workloads()[pod.name]
    return peers_of(code) | {INFRA_APPS[i] for i in infrastructure_of(code.package)}


def test_dev_network_policies_let_each_workload_reach_its_peers_and_infrastructure_only() -> None:
    objects = rendered("dev")
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pods(objects)
    for source in pods:
        reached = {
            destination.name
            for destination in pods
            if destination is not source
            and any(
                allowed(policies, source, destination, port) for port in destination.ports.values()
            )
        }
        assert reached == _expected_reach(source), source.name


def test_network_policies_deny_by_default_and_only_the_gateway_takes_outside_traffic() -> None:
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        policies = of_kind(objects, "NetworkPolicy")
        deny = named(objects, "NetworkPolicy", "default-deny")["spec"]
        assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
        assert "ingress" not in deny and "egress" not in deny
        for policy, rule in outside_ingress_rules(policies):
            selector = policy["spec"]["podSelector"]
            if selector == {"matchLabels": {"app.kubernetes.io/name": "gateway"}}:
                assert [p["port"] for p in rule["ports"]] == [8080]
            else:  # Prometheus, on the metrics ports only
                assert [p["port"] for p in rule["ports"]] == ["metrics"], policy["metadata"]
        (ingress,) = of_kind(objects, "Ingress")
        assert ingress["spec"]["tls"] and all(
            r["host"] in ingress["spec"]["tls"][0]["hosts"] for r in ingress["spec"]["rules"]
        )
        backends = {
            p["backend"]["service"]["name"]
            for r in ingress["spec"]["rules"]
            for p in r["http"]["paths"]
        }
        assert backends == {"gateway"}


def test_prod_reaches_managed_infrastructure_by_address() -> None:
    objects = rendered("prod")
    for kind, port in INFRA_PORTS.items():
        (rule,) = named(objects, "NetworkPolicy", f"{kind}-clients-egress")["spec"]["egress"]
        assert all("ipBlock" in peer for peer in rule["to"])
        assert port in [p["port"] for p in rule["ports"]]


def test_there_is_one_consumer_deployment_per_consumer_the_wallet_has() -> None:
    for overlay in OVERLAYS:
        names = {d["metadata"]["name"] for d in of_kind(rendered(overlay), "Deployment")}
        for consumer in consumer_names():
            workload = named(
                rendered(overlay), "Deployment", f"wallet-consumer-{consumer.replace('_', '-')}"
            )
            (container,) = containers(workload)
            assert container["args"] == ["consumer", consumer]
        assert len([n for n in names if n.startswith("wallet-consumer-")]) == len(consumer_names())
