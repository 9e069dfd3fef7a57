"""TLS in transit: the ledger and the wallet as real processes with mutual
TLS, on certificates made here. A client holding a certificate from the
deployment's CA is served (and the wallet reaches the ledger the same way);
a client without one, with one from another CA, or in plaintext, is refused.
The kubelet's plaintext health port answers health and nothing else."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.config import CommonSettings, load_settings
from services.common.tls import open_channel
from services.wallet.domain import wallet_account_id
from tests.conftest import ROOT, TestRun
from tests.processes import (
    SERVICE_NAMES,
    ServiceProcess,
    die_with_parent,
    free_port,
    service_process,
)

# ------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(common_name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return Issuer(name, key, cert)


def write_pem(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    """Writes <name>.crt and <name>.key, as cert-manager's Secret holds them."""
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def issue(ca: Issuer, folder: Path, name: str) -> None:
    """A certificate for both ends of a call (server and client auth), for
    localhost and 127.0.0.1, signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, ca.name, key)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    write_pem(folder, name, cert, key)


@dataclass(frozen=True)
class Pki:
    folder: Path

    def tls_env(self, name: str, ca: str = "ca") -> dict[str, str]:
        return {
            "MONETA_TLS_CERT_FILE": str(self.folder / f"{name}.crt"),
            "MONETA_TLS_KEY_FILE": str(self.folder / f"{name}.key"),
            "MONETA_TLS_CA_FILE": str(self.folder / f"{ca}.crt"),
        }

    def client_settings(self, name: str, ca: str = "ca") -> CommonSettings:
        return CommonSettings(
            tls_cert_file=str(self.folder / f"{name}.crt"),
            tls_key_file=str(self.folder / f"{name}.key"),
            tls_ca_file=str(self.folder / f"{ca}.crt"),
        )

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("moneta-test-ca"), make_ca("someone-elses-ca")
    write_pem(folder, "ca", ca.cert, ca.key)
    write_pem(folder, "other-ca", other_ca.cert, other_ca.key)
    for name in ("ledger", "wallet", "gateway"):
        issue(ca, folder, name)
    issue(other_ca, folder, "intruder")
    return Pki(folder)


# ---------------------------------------------------------------- processes


@dataclass
class TlsServiceProcess(ServiceProcess):
    """A service whose own port speaks mutual TLS: readiness is read on its
    plaintext health port, as the kubelet reads it."""

    health_port: int = 0

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
                try:
                    request = health_pb2.HealthCheckRequest(service=SERVICE_NAMES[self.name])
                    if (
                        stub.Check(request, timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready in {seconds}s")


def tls_process(name: str, env: dict[str, str], log_dir: Path, pki: Pki, **settings: str):
    health_port = free_port()
    plain = service_process(
        name,
        env,
        log_dir,
        **pki.tls_env(name),
        MONETA_GRPC_HEALTH_PORT=str(health_port),
        **settings,
    )
    return TlsServiceProcess(
        plain.name, plain.env, plain.log_path, plain.port, health_port=health_port
    )


@dataclass(frozen=True)
class TlsMesh:
    ledger: TlsServiceProcess
    wallet: TlsServiceProcess


@pytest.fixture(scope="module")
def tls_mesh(
    test_run: TestRun, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsMesh]:
    env = {**test_run.env(), "MONETA_DB_PREFIX": f"{test_run.db_prefix}tls_"}
    logs = tmp_path_factory.mktemp("tls-logs")
    ledger = tls_process("ledger", env, logs, pki)
    wallet = tls_process(
        "wallet",
        env,
        logs,
        pki,
        MONETA_LEDGER_ADDR=ledger.address,
        MONETA_BUDGET_ADDR=f"127.0.0.1:{free_port()}",
        MONETA_FRAUD_ADDR=f"127.0.0.1:{free_port()}",
        MONETA_BANK_PARTNER_URL=f"http://127.0.0.1:{free_port()}",
    )
    try:
        ledger.start()
        wallet.start()
        yield TlsMesh(ledger, wallet)
    finally:
        wallet.stop()
        ledger.stop()


@pytest.fixture
async def gateway_channel(tls_mesh: TlsMesh, pki: Pki) -> AsyncIterator[grpc.aio.Channel]:
    """The wallet as the gateway sees it: mutual TLS with the CA's certificate."""
    async with open_channel(tls_mesh.wallet.address, pki.client_settings("gateway")) as channel:
        yield channel


async def _create_wallet(stub: wallet_pb2_grpc.WalletServiceStub) -> wallet_pb2.Wallet:
    user_id = str(uuid.uuid4())
    handle = f"t{user_id[:8]}"
    await stub.CreateUser(
        wallet_pb2.CreateUserRequest(
            user=wallet_pb2.User(
                user_id=user_id,
                email=f"{handle}@example.com",
                username=handle,
                full_name="TLS Test",
                role=wallet_pb2.ROLE_USER,
                default_currency="USD",
            )
        ),
        timeout=10,
    )
    response: wallet_pb2.CreateWalletResponse = await stub.CreateWallet(
        wallet_pb2.CreateWalletRequest(user_id=user_id, currency="USD"), timeout=10
    )
    return response.wallet


# -------------------------------------------------------------------- tests


async def test_a_client_with_the_cas_certificate_is_served_and_the_wallet_reaches_the_ledger(
    gateway_channel: grpc.aio.Channel, tls_mesh: TlsMesh, pki: Pki
) -> None:
    wallet = await _create_wallet(wallet_pb2_grpc.WalletServiceStub(gateway_channel))

    # The wallet opened its ledger account over its own mutual-TLS channel.
    account_id = wallet_account_id(uuid.UUID(wallet.wallet_id), "USD")
    async with open_channel(tls_mesh.ledger.address, pki.client_settings("gateway")) as channel:
        found = await ledger_pb2_grpc.LedgerServiceStub(channel).LookupAccounts(
            ledger_pb2.LookupAccountsRequest(ids=[str(account_id)]), timeout=10
        )
    assert [a.id for a in found.accounts] == [str(account_id)]


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return refused.value.code()


async def test_a_client_without_a_certificate_is_refused(tls_mesh: TlsMesh, pki: Pki) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca_file.read_bytes())
    for address in (tls_mesh.ledger.address, tls_mesh.wallet.address):
        async with grpc.aio.secure_channel(address, anonymous) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_with_another_cas_certificate_is_refused(
    tls_mesh: TlsMesh, pki: Pki
) -> None:
    # The intruder trusts our CA (so it would accept the server), but its own
    # certificate is signed by another CA: the server refuses the handshake.
    intruder = pki.client_settings("intruder", ca="ca")
    for address in (tls_mesh.ledger.address, tls_mesh.wallet.address):
        async with open_channel(address, intruder) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_is_refused(tls_mesh: TlsMesh) -> None:
    async with grpc.aio.insecure_channel(tls_mesh.ledger.address) as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_refuses_a_server_outside_its_ca(tls_mesh: TlsMesh, pki: Pki) -> None:
    # A client configured with the other CA cannot verify the ledger.
    stranger = pki.client_settings("intruder", ca="other-ca")
    async with open_channel(tls_mesh.ledger.address, stranger) as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_the_gateway_reaches_the_services_over_mutual_tls(
    test_run: TestRun, tls_mesh: TlsMesh, pki: Pki, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        **test_run.env(),
        **pki.tls_env("gateway"),
        "MONETA_GATEWAY_PORT": str(port),
        "MONETA_HTTP_HOST": "127.0.0.1",
        "MONETA_LEDGER_ADDR": tls_mesh.ledger.address,
        "MONETA_WALLET_ADDR": tls_mesh.wallet.address,
        # Budget and fraud are not running: the gateway says so, and is not ready.
        "MONETA_BUDGET_ADDR": f"127.0.0.1:{free_port()}",
        "MONETA_FRAUD_ADDR": f"127.0.0.1:{free_port()}",
    }
    with (tmp_path / "gateway.log").open("wb") as log:
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        checks = await _ready_checks(f"http://127.0.0.1:{port}/ready", gateway, seconds=30)
    finally:
        gateway.send_signal(signal.SIGTERM)
        await asyncio.wait_for(gateway.wait(), 15)
    assert (checks["ledger"], checks["wallet"]) == ("SERVING", "SERVING")
    assert checks["budget"] != "SERVING"


async def _ready_checks(
    url: str, process: asyncio.subprocess.Process, seconds: float
) -> dict[str, str]:
    """The gateway's readiness checks, once it answers with the ledger's and
    the wallet's settled (the channels connect lazily)."""
    deadline = asyncio.get_running_loop().time() + seconds
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            assert process.returncode is None, "the gateway exited"
            try:
                checks: dict[str, str] = (await client.get(url)).json()["checks"]
                if checks["ledger"] == checks["wallet"] == "SERVING":
                    return checks
            except httpx.HTTPError:
                checks = {}
            if asyncio.get_running_loop().time() > deadline:
                return checks
            await asyncio.sleep(0.1)


async def test_the_health_port_answers_health_in_plaintext_and_nothing_else(
    tls_mesh: TlsMesh,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_mesh.ledger.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        ready = await health.Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAMES["ledger"]), timeout=5
        )
        alive = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as business:
            await ledger_pb2_grpc.LedgerServiceStub(channel).LookupAccounts(
                ledger_pb2.LookupAccountsRequest(ids=[str(uuid.uuid4())]), timeout=5
            )
    assert ready.status == alive.status == health_pb2.HealthCheckResponse.SERVING
    assert business.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------ settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MONETA_TLS_CERT_FILE", "MONETA_TLS_KEY_FILE", "MONETA_TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _exit_line(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        load_settings(CommonSettings, "moneta-test")
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_certificate_without_its_key_is_a_one_line_error(
    clean_env: pytest.MonkeyPatch, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("MONETA_TLS_CERT_FILE", str(pki.folder / "ledger.crt"))
    assert "MONETA_TLS_KEY_FILE" in _exit_line(capsys)


def test_a_ca_without_a_certificate_is_a_one_line_error(
    clean_env: pytest.MonkeyPatch, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("MONETA_TLS_CA_FILE", str(pki.ca_file))
    assert "MONETA_TLS_CA_FILE" in _exit_line(capsys)


def test_a_missing_certificate_file_is_a_one_line_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("MONETA_TLS_CERT_FILE", str(tmp_path / "absent.crt"))
    clean_env.setenv("MONETA_TLS_KEY_FILE", str(tmp_path / "absent.key"))
    line = _exit_line(capsys)
    assert "MONETA_TLS_CERT_FILE" in line and "no such file" in line


def test_no_tls_settings_mean_plaintext(clean_env: pytest.MonkeyPatch) -> None:
    settings = CommonSettings()
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file) == ("", "", "")
