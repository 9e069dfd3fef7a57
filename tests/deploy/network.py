"""Which connections a set of NetworkPolicies lets through, between pods of
one namespace, as Kubernetes decides it: a connection needs an egress rule
of some policy selecting the source (when any policy selects it for
egress) and an ingress rule of some policy selecting the destination (when
any selects it for ingress)."""

from __future__ import annotations

from dataclasses import dataclass

from tests.deploy.manifests import Obj, label_selector_matches


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str]
    # Container ports by name (and by number, as strings).
    ports: dict[str, int]

    def resolve(self, port: int | str) -> int | None:
        return self.ports.get(str(port)) if isinstance(port, str) else port


def _types(policy: Obj) -> list[str]:
    types: list[str] = policy["spec"].get("policyTypes") or ["Ingress"]
    return types


def _selects(policy: Obj, pod: Pod) -> bool:
    return label_selector_matches(policy["spec"].get("podSelector", {}), pod.labels)


def _port_allowed(rule: Obj, port: int, destination: Pod) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(destination.resolve(p.get("port", port)) == port for p in ports)


def _peer_allows(peer: Obj, other: Pod) -> bool:
    """An in-namespace peer: only a bare podSelector names a pod here;
    namespaceSelector and ipBlock name sources or destinations elsewhere."""
    if "namespaceSelector" in peer or "ipBlock" in peer:
        return False
    return label_selector_matches(peer["podSelector"], other.labels)


def _allowed_one_way(
    policies: list[Obj], pod: Pod, other: Pod, port: int, destination: Pod, direction: str
) -> bool:
    relevant = [p for p in policies if direction in _types(p) and _selects(p, pod)]
    if not relevant:
        return True  # not isolated in this direction
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in relevant:
        for rule in policy["spec"].get(key, []):
            if not _port_allowed(rule, port, destination):
                continue
            if not rule.get(peers) or any(_peer_allows(peer, other) for peer in rule[peers]):
                return True
    return False


def allowed(policies: list[Obj], source: Pod, destination: Pod, port: int) -> bool:
    return _allowed_one_way(
        policies, source, destination, port, destination, "Egress"
    ) and _allowed_one_way(policies, destination, source, port, destination, "Ingress")


def outside_ingress_rules(policies: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(policy, rule) for every ingress rule that admits traffic from
    outside the namespace (another namespace, or addresses)."""
    found = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers or any("namespaceSelector" in p or "ipBlock" in p for p in peers):
                found.append((policy, rule))
    return found
