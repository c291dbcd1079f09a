"""Shared fixtures: a real grpc.aio server on an ephemeral port over a real ledger.

Every test that uses a server (the `settings` fixture) runs twice, once per backend: `[sqlite]`,
a file in the test's tmp_path, and `[postgres]`, a schema of its own in the database
``CASLEDGER_TEST_POSTGRES_DSN`` names (skipped, with the reason, without it). A test that reads
or tampers with the SQLite file itself is marked ``sqlite_only``."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from casledger.service.client import LedgerClient, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from tests.support import postgres

BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost (PEM)."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it alone must fail


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """Made at test time with `cryptography`: no key is ever committed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory = tmp_path_factory.mktemp("tls")

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
                ) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def make_ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(common, name(common), key)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA256()))
        return cert, key

    def write(filename: str, data: bytes) -> Path:
        path = directory / filename
        path.write_bytes(data)
        return path

    ca, ca_key = make_ca("casledger test CA")
    other, _ = make_ca("another test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (builder("localhost", ca.subject, key)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return TLSFiles(
        ca=write("ca.pem", ca.public_bytes(pem)),
        cert=write("server.pem", cert.public_bytes(pem)),
        key=write("server-key.pem", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        other_ca=write("other-ca.pem", other.public_bytes(pem)),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that stands on a ledger once per backend (SQLite only when marked)."""
    if "backend" in metafunc.fixturenames:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("backend", BACKENDS[:1] if only_sqlite else BACKENDS,
                             indirect=True)


@pytest.fixture(scope="session", autouse=True)
def _postgres_admin() -> Iterator[None]:
    """The PostgreSQL helpers' admin connection (if any test made one) closes with the run."""
    yield
    postgres.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend of this run of the test: "sqlite" or "postgres"."""
    name: str = getattr(request, "param", "sqlite")
    if name == "postgres" and (reason := postgres.unavailable()) is not None:
        pytest.skip(reason)
    return name


NewLedger = Callable[[str], str]


@pytest.fixture
def new_ledger(backend: str, tmp_path: Path) -> Iterator[NewLedger]:
    """`new_ledger(name)`: the URL of a new, empty ledger on the test's backend (a file named
    after `name`, or a PostgreSQL schema of its own, dropped after the test)."""
    created: list[str] = []

    def make(name: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        created.append(postgres.create_ledger())
        return created[-1]

    yield make
    for url in created:
        postgres.drop_ledger(url)


@pytest.fixture
def settings(new_ledger: NewLedger) -> Settings:
    return Settings(db=new_ledger("ledger"), grpc_listen="127.0.0.1:0", no_http=True,
                    shutdown_grace_s=1.0)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with serve(settings) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[LedgerClient]:
    async with connect(server.target) as ledger:
        yield ledger
