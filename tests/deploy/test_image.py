"""The container image, checked without a Docker engine: what the
Dockerfile copies exists and is not ignored, the final stage is slim,
compiler-free and unprivileged, and the entry point turns every command the
manifests give it into a real `python -m services.<name> <command>`."""

from __future__ import annotations

import fnmatch
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    OVERLAYS,
    ROOT,
    WORKLOAD_KINDS,
    consumer_names,
    containers,
    of_kind,
    pod_spec,
    rendered,
)

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
GRPC_SERVICES = ("ledger", "wallet", "budget", "fraud")


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), by stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    stages: list[list[str]] = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _arg_default(name: str) -> str:
    found = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert found
    return found.group(1)


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (its
    last matching rule wins; '!' lets a path back in)."""
    ignored = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negated
    return ignored


def test_the_final_stage_is_slim_python_311_without_compilers_as_a_fixed_non_root_user() -> None:
    *build, final = _stages()
    assert build, "a build stage installs the dependencies"
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", _arg_default("PYTHON_IMAGE"))
    text = "\n".join(final)
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", text)
    (user,) = [line.split()[1] for line in final if line.startswith("USER ")]
    uid = int(user.split(":")[0])
    assert uid != 0
    # The manifests run the pods as that user.
    for overlay in OVERLAYS:
        for workload in of_kind(rendered(overlay), "Deployment", "Job"):
            assert pod_spec(workload)["securityContext"]["runAsUser"] == uid


def test_the_build_installs_exactly_the_pinned_requirements_from_wheels() -> None:
    build = "\n".join(_stages()[0])
    assert "pip install --only-binary=:all: -r requirements.txt" in build
    assert "grpc_tools.protoc" in build
    pins = (ROOT / "requirements.txt").read_text().splitlines()
    assert all("==" in p for p in pins if p and not p.startswith("#"))


def test_everything_the_dockerfile_copies_exists_and_reaches_the_build_context() -> None:
    copies = [line for stage in _stages() for line in stage if line.startswith("COPY ")]
    sources = [source for line in copies if "--from=" not in line for source in line.split()[1:-1]]
    assert {"requirements.txt", "protos", "services", "deploy/docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source), f"{source} is excluded by .dockerignore"
    for migrations in (ROOT / "services").glob("*/migrations"):
        assert not _ignored(str(migrations.relative_to(ROOT)))
    assert _ignored(".venv") and _ignored("gen") and _ignored("tests")


def test_the_entry_point_is_the_copied_script() -> None:
    final = _stages()[-1]
    (entry,) = [line for line in final if line.startswith("ENTRYPOINT ")]
    target = entry.split('"')[1]
    assert f"COPY deploy/docker/entrypoint.sh {target}" in final


def _dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@functools.cache
def _commands_of(service: str) -> set[str]:
    """The commands `python -m services.<service>` accepts, from its usage line."""
    usage = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--no-such-command--"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    found = re.search(r"\[([a-z|-]+)\]", usage.stderr)
    assert found, usage.stderr
    return set(found.group(1).split("|"))


def _assert_runs_a_real_module(line: str) -> None:
    words = line.split()
    while words and (words[0] == "env" or "=" in words[0]):
        words.pop(0)
    assert words[:2] == ["python", "-m"], line
    module, *rest = words[2:]
    package = module.removeprefix("services.")
    assert (ROOT / "services" / package / "__main__.py").is_file(), line
    if package in GRPC_SERVICES:
        assert len(rest) == 1 and rest[0] in _commands_of(package), line
    else:
        assert rest == [], line


def test_every_command_the_manifests_give_runs_a_real_module() -> None:
    seen = set()
    for overlay in OVERLAYS:
        for workload in of_kind(rendered(overlay), *WORKLOAD_KINDS):
            for container in containers(workload):
                if not container["image"].split("/")[-1].startswith("moneta"):
                    continue  # the dev overlay's PostgreSQL, RabbitMQ and Redis
                args = tuple(container["args"])
                result = _dry_run(*args)
                assert result.returncode == 0, result.stderr
                for line in result.stdout.splitlines():
                    _assert_runs_a_real_module(line)
                seen.add(args[0])
    assert seen == {*GRPC_SERVICES, "gateway", "consumer", "migrate"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ledger"], ["python -m services.ledger serve"]),
        (["ledger", "verify"], ["python -m services.ledger verify"]),
        (["gateway"], ["python -m services.gateway"]),
        (["relay", "wallet"], ["python -m services.wallet relay"]),
        (["migrate", "budget"], ["python -m services.budget migrate"]),
        (["consumer", "user_created"],
         ["env MONETA_EVENTS_CONSUMERS=user_created python -m services.wallet consume"]),
    ],
)  # fmt: skip
def test_the_entry_point_dispatches_each_name(args: list[str], expected: list[str]) -> None:
    result = _dry_run(*args)
    assert (result.returncode, result.stdout.splitlines()) == (0, expected)
    for line in expected:
        _assert_runs_a_real_module(line)


def test_migrate_runs_every_service_that_has_migrations_in_turn() -> None:
    with_migrations = sorted(p.parent.name for p in (ROOT / "services").glob("*/migrations"))
    lines = _dry_run("migrate").stdout.splitlines()
    assert sorted(lines) == [f"python -m services.{s} migrate" for s in with_migrations]


def test_the_entry_point_knows_exactly_the_wallets_consumers_and_relays() -> None:
    listed = re.search(r'^CONSUMERS="([^"]*)"$', ENTRYPOINT.read_text(), re.MULTILINE)
    assert listed and listed.group(1).split() == list(consumer_names())
    for consumer in consumer_names():
        assert _dry_run("consumer", consumer).returncode == 0
    for service in GRPC_SERVICES:
        relays = "relay" in _commands_of(service)
        assert (_dry_run("relay", service).returncode == 0) == relays, service


@pytest.mark.parametrize(
    "args", [[], ["bogus"], ["consumer", "no_such"], ["relay", "ledger"], ["migrate", "gateway"]]
)
def test_an_unknown_command_is_refused_with_the_usage(args: list[str]) -> None:
    result = _dry_run(*args)
    assert result.returncode == 64 and result.stdout == ""
    assert result.stderr.startswith("usage: moneta")
