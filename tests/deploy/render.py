"""Renders a kustomization as ``kubectl kustomize`` does, for the part of
kustomize that Moneta's manifests use, so that the manifests are checked on
machines without kubectl too.

Supported: ``resources`` (files and kustomization folders), ``patches``
(JSON 6902 operations, inline or from a file, with a target by kind, name
and label selector), ``namespace``, ``labels`` (without selectors, with or
without pod templates), ``replicas`` and ``images``, applied in kustomize's
order (patches, namespace, labels, replicas, images). Anything else in a
kustomization is refused by name rather than rendered wrongly. Where kubectl
exists, tests/deploy/test_render.py checks that both render Moneta's
overlays to the same objects.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED = frozenset(
    {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "replicas", "images"}
)
# Kinds whose objects live outside any namespace (of those a kustomization
# here could hold).
CLUSTER_SCOPED = frozenset(
    {
        "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
        "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass", "ClusterIssuer",
        "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    }
)  # fmt: skip
# Where labels go with includeTemplates (kustomize's template label paths).
TEMPLATED = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job"}
)
SCALABLE = frozenset({"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"})


class RenderError(Exception):
    """A kustomization this renderer cannot render faithfully, or a patch
    that does not apply."""


def render(folder: Path) -> list[Obj]:
    """The objects the kustomization in ``folder`` produces."""
    kustomization = _load_one(folder / "kustomization.yaml")
    unsupported = sorted(set(kustomization) - SUPPORTED)
    if unsupported:
        raise RenderError(f"{folder}: unsupported kustomization fields {unsupported}")

    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, patch, folder)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] == "Namespace":  # kustomize renames it to the namespace
                obj["metadata"]["name"] = kustomization["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for label in kustomization.get("labels", []):
        _apply_labels(objects, label)
    for replicas in kustomization.get("replicas", []):
        _apply_replicas(objects, replicas)
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_images(obj, image)
    _refuse_duplicates(objects, folder)
    return objects


def load_documents(path: Path) -> list[Obj]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _load_one(path: Path) -> Obj:
    documents = load_documents(path)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise RenderError(f"{path}: expected one mapping")
    return documents[0]


def _refuse_duplicates(objects: list[Obj], folder: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if key in seen:
            raise RenderError(f"{folder}: {key} appears twice")
        seen.add(key)


# ------------------------------------------------------------------ patches


def _apply_patch(objects: list[Obj], patch: Obj, folder: Path) -> None:
    unknown = sorted(set(patch) - {"patch", "path", "target"})
    if unknown or ("patch" in patch) == ("path" in patch):
        raise RenderError(f"a patch needs exactly one of patch/path (and a target): {patch}")
    text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise RenderError("only JSON 6902 patches (a list of operations) are supported")
    if "target" not in patch:
        raise RenderError("a JSON 6902 patch needs a target")
    targets = [obj for obj in objects if _selected(obj, patch["target"])]
    if not targets:
        raise RenderError(f"the patch target {patch['target']} matches nothing")
    for obj in targets:
        for operation in operations:
            apply_operation(obj, operation)


def _selected(obj: Obj, target: Obj) -> bool:
    unknown = sorted(set(target) - {"kind", "name", "labelSelector", "group", "version"})
    if unknown:
        raise RenderError(f"unsupported target fields {unknown}")
    group, _, version = obj["apiVersion"].rpartition("/")
    labels = obj["metadata"].get("labels", {})
    # A target's name is a regular expression matching the whole name.
    name_matches = re.fullmatch(target.get("name", ".*"), obj["metadata"]["name"]) is not None
    return (
        name_matches
        and target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("group", group) == group
        and target.get("version", version) == version
        and all(labels.get(k) == v for k, v in _label_selector(target.get("labelSelector", "")))
    )


def _label_selector(selector: str) -> Iterator[tuple[str, str]]:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, equals, value = term.partition("=")
        if not equals or value.startswith("="):
            raise RenderError(f"only k=v label selectors are supported: {selector!r}")
        yield key.strip(), value.strip()


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"a JSON pointer starts with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, appending: bool) -> int:
    if appending and token == "-":
        return len(container)
    if not token.isdigit() or int(token) > len(container) - (0 if appending else 1):
        raise RenderError(f"no element {token!r} in a list of {len(container)}")
    return int(token)


def _parent(obj: Obj, tokens: list[str]) -> Any:
    node: Any = obj
    for token in tokens[:-1]:
        if isinstance(node, list):
            node = node[_index(node, token, appending=False)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise RenderError(f"no {token!r} on the way to the patched field")
    return node


def apply_operation(obj: Obj, operation: Obj) -> None:
    """One RFC 6902 operation (add, remove, replace or test), in place."""
    op, tokens = operation.get("op"), _pointer(operation.get("path", ""))
    parent, last = _parent(obj, tokens), tokens[-1]
    value = copy.deepcopy(operation.get("value"))
    if op == "add":
        if isinstance(parent, list):
            parent.insert(_index(parent, last, appending=True), value)
        else:
            parent[last] = value
    elif op in ("remove", "replace", "test"):
        if isinstance(parent, list):
            key: Any = _index(parent, last, appending=False)
        elif last in parent:
            key = last
        else:
            raise RenderError(f"{op}: no {operation['path']}")
        if op == "remove":
            del parent[key]
        elif op == "replace":
            parent[key] = value
        elif parent[key] != value:
            raise RenderError(f"test failed at {operation['path']}")
    else:
        raise RenderError(f"unsupported JSON patch operation {op!r}")


# ------------------------------------------- labels, replicas and images


def _apply_labels(objects: list[Obj], label: Obj) -> None:
    unknown = sorted(set(label) - {"pairs", "includeTemplates", "includeSelectors"})
    if unknown or label.get("includeSelectors"):
        raise RenderError(f"unsupported labels entry: {label}")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        if label.get("includeTemplates") and obj["kind"] in TEMPLATED:
            templates = [obj["spec"]["template"], *obj["spec"].get("volumeClaimTemplates", [])]
            for template in templates:
                metadata = template.setdefault("metadata", {})
                metadata.setdefault("labels", {}).update(label["pairs"])


def _apply_replicas(objects: list[Obj], replicas: Obj) -> None:
    matched = [
        obj
        for obj in objects
        if obj["kind"] in SCALABLE and obj["metadata"]["name"] == replicas["name"]
    ]
    if not matched:
        raise RenderError(f"replicas: nothing named {replicas['name']!r}")
    for obj in matched:
        obj["spec"]["replicas"] = replicas["count"]


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a port in the registry's
    host is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_images(node: Any, image: Obj) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key in ("containers", "initContainers"):
        for container in node.get(key, []) if isinstance(node.get(key), list) else []:
            name, tag, digest = split_image(container.get("image", ""))
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                tag = image.get("newTag", tag)
                container["image"] = (
                    name
                    + (f":{tag}" if tag else "")
                    + (f"@{digest}" if digest and "newTag" not in image else "")
                )
    for value in node.values():
        _set_images(value, image)


def main() -> None:
    """python -m tests.deploy.render <kustomization folder>: the rendered
    objects as YAML, for machines without kubectl."""
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.deploy.render <kustomization folder>")
    yaml.safe_dump_all(render(Path(sys.argv[1])), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
