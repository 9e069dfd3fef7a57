"""The rendered Kubernetes manifests and what the code says they must agree
with: each workload's settings class, ports, health names and dependencies."""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from services.common.config import ENV_PREFIX, CommonSettings
from tests.deploy.render import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# The Kubernetes version the manifests are validated against (its JSON
# schemas ship with the pinned kubernetes-validate, so no network is needed).
KUBERNETES_VERSION = "1.32.0"

Obj = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def renderer() -> str:
    """What renders the overlays here: kubectl's kustomize where kubectl is
    installed, tests/deploy/render.py otherwise."""
    return "kubectl" if shutil.which("kubectl") else "render.py"


@functools.cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    folder = K8S / "overlays" / overlay if overlay != "base" else K8S / "base"
    if renderer() == "kubectl":
        return tuple(kubectl_kustomize(folder))
    return tuple(render(folder))


def kubectl_kustomize(folder: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    output = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc is not None]


def of_kind(objects: tuple[Obj, ...], *kinds: str) -> list[Obj]:
    return [o for o in objects if o["kind"] in kinds]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels."""
    if not matches(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def config_map(objects: tuple[Obj, ...]) -> dict[str, str]:
    data: dict[str, str] = named(objects, "ConfigMap", "moneta-config")["data"]
    return data


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?$")
_FACTORS = {
    None: Decimal(1), "m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6),
    "G": Decimal(10**9), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}  # fmt: skip


def quantity(value: str | int) -> Decimal:
    """A Kubernetes quantity (500m, 512Mi, 1) as a number."""
    found = _QUANTITY.match(str(value))
    assert found, f"not a quantity: {value!r}"
    return Decimal(found.group(1)) * _FACTORS[found.group(2)]


# ----------------------------------------------------- what the code says


@dataclass(frozen=True)
class Workload:
    """What the code says about one Moneta workload."""

    settings: type[CommonSettings]
    # The settings field holding the port its Service targets, and its metrics port.
    port_field: str
    metrics_field: str | None
    # The health name its readiness probe asks for ("" for HTTP workloads).
    health_name: str
    # The package whose code the workload runs (its dependencies are read there).
    package: str

    def default(self, field: str) -> Any:
        return self.settings.model_fields[field].default


def _service_name(service: str) -> str:
    name: str = importlib.import_module(f"services.{service}.api").SERVICE_NAME
    return name


def _consumers_health_name() -> str:
    name: str = importlib.import_module("services.wallet.__main__").CONSUMERS_HEALTH_NAME
    return name


def _settings(service: str, cls: str) -> type[CommonSettings]:
    settings: type[CommonSettings] = getattr(
        importlib.import_module(f"services.{service}.config"), cls
    )
    return settings


@functools.cache
def workloads() -> dict[str, Workload]:
    """Every Moneta Deployment by name, with what the code says of it."""
    found = {
        service: Workload(
            _settings(service, f"{service.capitalize()}Settings"),
            f"{service}_port",
            f"{service}_metrics_port",
            _service_name(service),
            service,
        )
        for service in ("ledger", "wallet", "budget", "fraud")
    }
    found["gateway"] = Workload(
        _settings("gateway", "GatewaySettings"), "gateway_port", None, "", "gateway"
    )
    wallet = _settings("wallet", "WalletSettings")
    for consumer in consumer_names():
        found[f"wallet-consumer-{consumer.replace('_', '-')}"] = Workload(
            wallet, "events_port", "events_metrics_port", _consumers_health_name(), "wallet"
        )
    return found


def consumer_names() -> tuple[str, ...]:
    names: tuple[str, ...] = importlib.import_module("services.wallet.config").CONSUMERS
    return names


def settings_classes() -> list[type[BaseSettings]]:
    """Every settings class of every service (services/*/config.py)."""
    classes: list[type[BaseSettings]] = [CommonSettings]
    for config in sorted((ROOT / "services").glob("*/config.py")):
        module = importlib.import_module(f"services.{config.parent.name}.config")
        classes.extend(
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, CommonSettings)
            and value.__module__ == module.__name__
        )
    return classes


def setting_names() -> set[str]:
    """MONETA_<FIELD> of every field some settings class reads."""
    return {
        f"{ENV_PREFIX}{field.upper()}" for cls in settings_classes() for field in cls.model_fields
    }


def peers_of(workload: Workload) -> set[str]:
    """The gRPC services the workload's settings name an address for."""
    return {
        field.removesuffix("_addr")
        for field in workload.settings.model_fields
        if field.endswith("_addr")
    }


def infrastructure_of(package: str) -> set[str]:
    """What the package's code connects to: postgres (a service database),
    amqp (the broker) or redis, read from its sources."""
    source = "\n".join(p.read_text() for p in (ROOT / "services" / package).glob("*.py"))
    uses = {
        "postgres": "database_url(" in source,
        "amqp": "amqp_url" in source,
        "redis": "redis_url" in source,
    }
    return {name for name, used in uses.items() if used}


def env_names(container: Obj) -> Iterator[str]:
    for entry in container.get("env", []):
        yield entry["name"]
