"""tests/deploy/render.py renders as kustomize does, for what it supports,
and refuses the rest; where kubectl exists, it renders Moneta's overlays to
exactly the objects `kubectl kustomize` gives."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import K8S, OVERLAYS, kubectl_kustomize
from tests.deploy.render import RenderError, apply_operation, render, split_image

pytestmark = pytest.mark.unit

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "api", "labels": {"tier": "web"}},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "api"}},
        "template": {
            "metadata": {"labels": {"app": "api"}},
            "spec": {"containers": [{"name": "api", "image": "moneta"}]},
        },
    },
}
CONFIG = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"A": "1"}}


def _write(folder: Path, kustomization: dict[str, Any], *objects: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["objects.yaml"], **kustomization})
    )
    return folder


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def test_resources_come_from_files_and_nested_kustomizations(tmp_path: Path) -> None:
    base = _write(tmp_path / "base", {}, DEPLOYMENT)
    overlay = _write(tmp_path / "overlay", {"resources": ["objects.yaml", "../base"]}, CONFIG)
    assert sorted(o["kind"] for o in render(overlay)) == ["ConfigMap", "Deployment"]
    assert render(base) == [DEPLOYMENT]


def test_namespace_goes_on_namespaced_objects_and_renames_a_namespace(tmp_path: Path) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
    objects = render(_write(tmp_path, {"namespace": "moneta"}, CONFIG, namespace))
    assert _one(objects, "ConfigMap")["metadata"]["namespace"] == "moneta"
    assert _one(objects, "Namespace")["metadata"] == {"name": "moneta"}


def test_labels_go_on_metadata_and_with_include_templates_on_pod_templates(
    tmp_path: Path,
) -> None:
    plain = render(_write(tmp_path / "a", {"labels": [{"pairs": {"p": "m"}}]}, DEPLOYMENT))
    templated = render(
        _write(
            tmp_path / "b",
            {"labels": [{"pairs": {"p": "m"}, "includeTemplates": True}]},
            DEPLOYMENT,
        )
    )
    assert plain[0]["metadata"]["labels"] == {"tier": "web", "p": "m"}
    assert plain[0]["spec"]["template"]["metadata"]["labels"] == {"app": "api"}
    assert templated[0]["spec"]["template"]["metadata"]["labels"] == {"app": "api", "p": "m"}
    assert templated[0]["spec"]["selector"] == {"matchLabels": {"app": "api"}}


def test_patches_apply_to_every_target_that_matches(tmp_path: Path) -> None:
    other = {**DEPLOYMENT, "metadata": {"name": "worker", "labels": {"tier": "jobs"}}}
    patch = "- op: replace\n  path: /spec/replicas\n  value: 4\n"
    objects = render(
        _write(
            tmp_path,
            {
                "patches": [
                    {"target": {"kind": "Deployment", "labelSelector": "tier=web"}, "patch": patch}
                ]
            },
            DEPLOYMENT,
            other,
            CONFIG,
        )
    )
    replicas = {o["metadata"]["name"]: o.get("spec", {}).get("replicas") for o in objects}
    assert replicas == {"api": 4, "worker": 1, "cfg": None}


def test_a_patch_file_and_a_name_pattern_select_as_kustomize_does(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").parent.mkdir(parents=True, exist_ok=True)
    _write(tmp_path, {"patches": [{"target": {"name": "a.i"}, "path": "p.yaml"}]}, DEPLOYMENT)
    (tmp_path / "p.yaml").write_text("- op: add\n  path: /metadata/annotations\n  value: {x: z}\n")
    assert render(tmp_path)[0]["metadata"]["annotations"] == {"x": "z"}


def test_json_patch_operations_follow_rfc_6902() -> None:
    obj: dict[str, Any] = {"a": {"list": [1, 2], "k~/": 0}}
    apply_operation(obj, {"op": "add", "path": "/a/list/-", "value": 3})
    apply_operation(obj, {"op": "add", "path": "/a/list/0", "value": 0})
    apply_operation(obj, {"op": "replace", "path": "/a/k~0~1", "value": 9})
    apply_operation(obj, {"op": "remove", "path": "/a/list/1"})
    apply_operation(obj, {"op": "test", "path": "/a/list", "value": [0, 2, 3]})
    assert obj == {"a": {"list": [0, 2, 3], "k~/": 9}}
    with pytest.raises(RenderError):
        apply_operation(obj, {"op": "replace", "path": "/a/missing", "value": 1})
    with pytest.raises(RenderError):
        apply_operation(obj, {"op": "test", "path": "/a/list", "value": []})
    with pytest.raises(RenderError):
        apply_operation(obj, {"op": "add", "path": "/a/list/9", "value": 1})


def test_images_and_replicas_are_set_by_name(tmp_path: Path) -> None:
    objects = render(
        _write(
            tmp_path,
            {
                "images": [
                    {"name": "moneta", "newName": "registry:5000/m/moneta", "newTag": "1.2"}
                ],
                "replicas": [{"name": "api", "count": 3}],
            },
            DEPLOYMENT,
        )
    )
    spec = objects[0]["spec"]
    assert spec["replicas"] == 3
    assert spec["template"]["spec"]["containers"][0]["image"] == "registry:5000/m/moneta:1.2"


def test_image_references_split_into_name_tag_and_digest() -> None:
    assert split_image("registry:5000/m/moneta:1.2@sha256:ab") == (
        "registry:5000/m/moneta",
        "1.2",
        "sha256:ab",
    )
    assert split_image("moneta") == ("moneta", "", "")


@pytest.mark.parametrize(
    "kustomization",
    [
        {"commonLabels": {"a": "b"}},
        {"configMapGenerator": [{"name": "x", "literals": ["A=1"]}]},
        {"patches": [{"target": {"kind": "Deployment"}, "patch": "spec: {replicas: 2}"}]},
        {"labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]},
        {"patches": [{"target": {"kind": "Secret"}, "patch": "[]"}]},
    ],
    ids=["commonLabels", "generator", "strategic-merge", "selectors", "no-match"],
)
def test_what_it_cannot_render_faithfully_is_refused(
    tmp_path: Path, kustomization: dict[str, Any]
) -> None:
    with pytest.raises(RenderError):
        render(_write(tmp_path, kustomization, DEPLOYMENT))


def test_the_same_object_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="twice"):
        render(_write(tmp_path, {}, CONFIG, CONFIG))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_it_renders_monetas_manifests_exactly_as_kubectl_kustomize(folder: str) -> None:
    def by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
        return {
            (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
            for o in objects
        }

    ours, kubectl = by_key(render(K8S / folder)), by_key(kubectl_kustomize(K8S / folder))
    assert ours.keys() == kubectl.keys()
    for key, obj in ours.items():
        assert obj == kubectl[key], key
