"""DICOM TLS on the listener (PS3.15 Annex B) against real DCMTK peers and real certificates.

The certificates are made here with the ``openssl`` command line, the way a site makes its
own: a site CA, a server certificate it signs (SAN IP:127.0.0.1, DNS:localhost), a sender's
client certificate it signs, and a second CA with a client certificate of its own that the
listener must refuse.  What a site relies on: with TLS configured the port speaks only TLS,
only senders the site CA vouches for get through (when client certificates are required),
nothing older than TLS 1.2 is accepted, a refused peer leaves one clear log line and the
listener serving on, and a bad certificate or key stops start-up with a one-line reason.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import func, select

from db.models import Instance, StudyState
from db.session import make_engine, make_sessionmaker
from dicom_io.tls import server_ssl_context
from settings import ConfigError, Settings, load_settings
from settings.config import ListenerTlsConfig
from tests.conftest import REPO
from tests.plugins.ingest import AE_TITLE, dimse_statuses, real_files, storescu, wait_for
from tests.plugins.scoring import open_scoring_env, write_config
from xray_triage.cli import EXIT_CONFIG

# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    """The files a site keeps: its CA, the listener's pair, a sender's pair; and an outsider's."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        stem, _, ext = name.rpartition("_")
        return self.root / f"{stem}.{ext}"


def _openssl(cwd: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _make_ca(root: Path, name: str) -> None:
    _openssl(root, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/O=xray-triage test/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def _make_leaf(root: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(root, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/O=xray-triage test/CN={name}")  # fmt: skip
    (root / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + extensions
    )
    _openssl(root, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    _make_ca(root, "ca")
    _make_ca(root, "otherca")
    _make_leaf(root, "server", "ca", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_leaf(root, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(root, "otherclient", "otherca", "extendedKeyUsage=clientAuth\n")
    return Pki(root)


def tls_config(pki: Pki, *, require_client_cert: bool = True, with_ca: bool = True) -> ListenerTlsConfig:
    return ListenerTlsConfig(
        cert_file=pki.server_crt,
        key_file=pki.server_key,
        ca_file=pki.ca_crt if with_ca else None,
        require_client_cert=require_client_cert,
    )


def with_tls(settings: Settings, tls: ListenerTlsConfig) -> Settings:
    return settings.model_copy(update={"listener": settings.listener.model_copy(update={"tls": tls})})


# ------------------------------------------------------------------------------ DCMTK peers


def client_tls(pki: Pki, key: Path | None = None, cert: Path | None = None) -> tuple[str, ...]:
    """DCMTK options of a sender with a client certificate that verifies the listener against the site CA."""
    return ("+tls", str(key or pki.client_key), str(cert or pki.client_crt), "+cf", str(pki.ca_crt))


def anonymous_tls(pki: Pki) -> tuple[str, ...]:
    """No client certificate, but the listener's certificate is still verified (DCMTK's default -rc)."""
    return ("+tla", "+cf", str(pki.ca_crt))


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    cmd = ["echoscu", "-v", "-aet", "ECHOSCU", "-aec", AE_TITLE, *options, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def assert_echo_ok(port: int, *options: str) -> None:
    result = echoscu(port, *options)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr


def instance_count(settings: Settings) -> int:
    engine = make_engine(settings.database.url)
    try:
        with make_sessionmaker(engine)() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


def spooled(settings: Settings) -> list[Path]:
    return sorted(Path(settings.storage.spool_dir).rglob("*.dcm"))


def assert_refused_and_logged(log_text: Callable[[], str], reason: str) -> None:
    """One clear line per refused peer, no traceback (pynetdicom's own reader logs one for a failed read)."""
    wait_for(lambda: reason in log_text(), what=f"the log line {reason!r}")
    assert "TLS handshake with 127.0.0.1:" in log_text()
    assert "Traceback" not in log_text()


# ------------------------------------------------------------------------------ the cases


@pytest.mark.dcmtk
def test_mutual_tls_store_is_recorded_and_scored(pki: Pki, tmp_path: Path) -> None:
    tls = tls_config(pki).model_dump(mode="json")
    chest = real_files()[0]  # a real adult PA chest CR, which the default model scores
    study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True, force=True).StudyInstanceUID)
    with open_scoring_env("sqlite", tmp_path, listener={"tls": tls}) as env:
        assert env.settings.listener.tls is not None and env.settings.listener.tls.require_client_cert
        port = env.listener.port
        assert_echo_ok(port, *client_tls(pki))

        result = storescu(port, [chest], extra=client_tls(pki))
        assert result.returncode == 0, result.stderr
        assert dimse_statuses(result.stderr) == [0x0000]
        study = env.wait_final(study_uid)
        assert study.state == StudyState.SCORED, study.state_reason
        assert env.states(study_uid) == ["receiving", "queued", "processing", "scored"]
        (scored,) = env.results(study_uid)
        assert scored.outcome == "scored" and scored.scores

        with env.factory() as s:
            (instance,) = s.scalars(select(Instance)).all()
        data = (Path(env.settings.storage.spool_dir) / instance.spool_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == instance.sha256
        assert instance.calling_ae == "STORESCU"


@pytest.mark.dcmtk
def test_plain_tcp_on_the_tls_port_is_refused_and_the_listener_serves_on(
    sqlite_backend, tmp_path, start_listener, log_text, pki: Pki
) -> None:
    settings = with_tls(sqlite_backend.settings(tmp_path), tls_config(pki))
    handle = start_listener(settings)

    echo = echoscu(handle.port)
    assert echo.returncode != 0
    assert "Received Echo Response" not in echo.stderr
    store = storescu(handle.port, [real_files()[0]])
    assert store.returncode != 0
    assert dimse_statuses(store.stderr) == []
    assert instance_count(settings) == 0 and spooled(settings) == []
    assert_refused_and_logged(log_text, "does not speak TLS")

    assert_echo_ok(handle.port, *client_tls(pki))
    assert "Traceback" not in log_text()


@pytest.mark.dcmtk
def test_peers_that_stall_before_or_inside_the_handshake_hold_up_no_other_sender(
    sqlite_backend, tmp_path, start_listener, pki: Pki
) -> None:
    settings = with_tls(sqlite_backend.settings(tmp_path), tls_config(pki))
    handle = start_listener(settings)
    # One connection that says nothing, one that stops after the first bytes of a ClientHello:
    # a handshake run where connections are accepted would leave every later sender waiting.
    with (
        socket.create_connection(("127.0.0.1", handle.port)),
        socket.create_connection(("127.0.0.1", handle.port)) as partial,
    ):
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")
        assert_echo_ok(handle.port, *client_tls(pki))
        store = storescu(handle.port, [real_files()[0]], extra=client_tls(pki))
        assert store.returncode == 0, store.stderr
        assert instance_count(settings) == 1


@pytest.mark.dcmtk
def test_a_client_certificate_from_another_ca_is_refused(
    sqlite_backend, tmp_path, start_listener, log_text, pki: Pki
) -> None:
    settings = with_tls(sqlite_backend.settings(tmp_path), tls_config(pki))
    handle = start_listener(settings)
    outsider = client_tls(pki, pki.otherclient_key, pki.otherclient_crt)

    assert echoscu(handle.port, *outsider).returncode != 0
    store = storescu(handle.port, [real_files()[0]], extra=outsider)
    assert store.returncode != 0
    assert dimse_statuses(store.stderr) == []
    assert instance_count(settings) == 0 and spooled(settings) == []
    assert_refused_and_logged(log_text, "client certificate not accepted")

    # Required means required: a sender with no certificate at all is refused too.
    assert echoscu(handle.port, *anonymous_tls(pki)).returncode != 0
    assert_refused_and_logged(log_text, "the peer sent no client certificate")

    assert_echo_ok(handle.port, *client_tls(pki))
    store = storescu(handle.port, [real_files()[0]], extra=client_tls(pki))
    assert store.returncode == 0, store.stderr
    assert instance_count(settings) == 1 and len(spooled(settings)) == 1


@pytest.mark.dcmtk
@pytest.mark.parametrize("with_ca", [True, False], ids=["site-ca-optional-cert", "no-ca"])
def test_without_required_client_certificates_an_anonymous_sender_stores(
    sqlite_backend, tmp_path, start_listener, pki: Pki, with_ca: bool
) -> None:
    settings = with_tls(sqlite_backend.settings(tmp_path), tls_config(pki, require_client_cert=False, with_ca=with_ca))
    handle = start_listener(settings)

    assert_echo_ok(handle.port, *anonymous_tls(pki))
    store = storescu(handle.port, [real_files()[0]], extra=anonymous_tls(pki))
    assert store.returncode == 0, store.stderr
    assert dimse_statuses(store.stderr) == [0x0000]
    wait_for(lambda: instance_count(settings) == 1, what="the instance row")
    assert len(spooled(settings)) == 1
    # Still TLS only: a plain sender is refused whether or not certificates are required.
    assert echoscu(handle.port).returncode != 0


def _python_client(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.ca_crt)
    context.load_cert_chain(pki.client_crt, pki.client_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 and TLSv1_1 are deprecated names
        context.minimum_version = min(version, ssl.TLSVersion.TLSv1_2, key=lambda v: v.value)
        context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 refuses TLS 1.0/1.1 at its default security level; drop that so the listener is what refuses.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(pki: Pki, port: int, version: ssl.TLSVersion) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as raw:
        with _python_client(pki, version).wrap_socket(raw, server_hostname="localhost") as tls:
            return str(tls.version())


def test_tls_below_1_2_is_refused_and_1_2_is_accepted(
    sqlite_backend, tmp_path, start_listener, log_text, pki: Pki
) -> None:
    handle = start_listener(with_tls(sqlite_backend.settings(tmp_path), tls_config(pki)))

    with pytest.raises(OSError) as refused:  # ssl.SSLError, or a reset, is an OSError
        _handshake(pki, handle.port, ssl.TLSVersion.TLSv1_1)
    if isinstance(refused.value, ssl.SSLError) and refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION":
        # The listener's alert: it saw the offer and refused it (not this client's OpenSSL refusing to offer).
        assert_refused_and_logged(log_text, "only TLS versions below 1.2")

    assert _handshake(pki, handle.port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _handshake(pki, handle.port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert_echo_ok(handle.port, *client_tls(pki))


# ------------------------------------------------------------------------------ configuration


def test_server_context_follows_the_configuration(pki: Pki) -> None:
    assert server_ssl_context(None) is None
    required = server_ssl_context(tls_config(pki))
    optional = server_ssl_context(tls_config(pki, require_client_cert=False))
    none = server_ssl_context(tls_config(pki, require_client_cert=False, with_ca=False))
    assert required is not None and optional is not None and none is not None
    assert (required.verify_mode, optional.verify_mode, none.verify_mode) == (
        ssl.CERT_REQUIRED,
        ssl.CERT_OPTIONAL,
        ssl.CERT_NONE,
    )
    assert required.minimum_version == ssl.TLSVersion.TLSv1_2


def _broken_configs(pki: Pki, tmp: Path) -> dict[str, tuple[dict[str, Path], str, Path]]:
    """Case -> (config changes, the key the message must name, the file it must name)."""
    (tmp / "junk.pem").write_text("not a certificate\n")
    encrypted = tmp / "encrypted.key"
    _openssl(tmp, "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted))
    return {
        "missing key": ({"key_file": tmp / "absent.key"}, "key_file", tmp / "absent.key"),
        "missing cert": ({"cert_file": tmp / "absent.crt"}, "cert_file", tmp / "absent.crt"),
        "key of another certificate": ({"key_file": pki.client_key}, "key_file", pki.client_key),
        "encrypted key": ({"key_file": encrypted}, "key_file", encrypted),
        "certificate in the key's place": ({"key_file": pki.server_crt}, "key_file", pki.server_crt),
        "not a certificate": ({"cert_file": tmp / "junk.pem"}, "cert_file", tmp / "junk.pem"),
        "CA file not a certificate": ({"ca_file": tmp / "junk.pem"}, "ca_file", tmp / "junk.pem"),
        "missing CA file": ({"ca_file": tmp / "absent-ca.crt"}, "ca_file", tmp / "absent-ca.crt"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing key",
        "missing cert",
        "key of another certificate",
        "encrypted key",
        "certificate in the key's place",
        "not a certificate",
        "CA file not a certificate",
        "missing CA file",
    ],
)
def test_a_bad_certificate_or_key_is_a_one_line_config_error(pki: Pki, tmp_path: Path, case: str) -> None:
    changes, key, path = _broken_configs(pki, tmp_path)[case]
    tls = tls_config(pki).model_copy(update=changes)
    with pytest.raises(ConfigError) as err:
        server_ssl_context(tls)
    message = str(err.value)
    assert message.startswith(f"listener.tls.{key}: ") and str(path) in message
    assert "\n" not in message and "_ssl.c" not in message


def test_required_client_certificates_need_a_ca() -> None:
    with pytest.raises(ConfigError, match=r"listener\.tls: .*require_client_cert needs ca_file"):
        load_settings(
            environ={"XRAY_TRIAGE_LISTENER__TLS": "{cert_file: s.crt, key_file: s.key, require_client_cert: true}"}
        )


def test_listen_with_a_missing_key_says_so_in_one_line(sqlite_backend, tmp_path: Path, pki: Pki) -> None:
    tls = tls_config(pki).model_copy(update={"key_file": tmp_path / "absent.key"})
    config = write_config(with_tls(sqlite_backend.settings(tmp_path), tls), tmp_path / "site.yaml")
    assert yaml.safe_load(config.read_text())["listener"]["tls"]["key_file"] == str(tmp_path / "absent.key")
    result = subprocess.run(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "listen"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "listener.tls.key_file" in last and str(tmp_path / "absent.key") in last, result.stderr
    # `config check` finds it too, before anything is started.
    check = subprocess.run(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "config", "check"],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert check.returncode == EXIT_CONFIG and "listener.tls.key_file" in check.stderr, check.stderr
