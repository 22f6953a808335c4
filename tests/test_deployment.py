"""The container deployment as IT would start it: docker-compose.yml, its DICOM-TLS overlay,
.env.example and the Dockerfile.

Compose itself reads the files (`docker compose config`, or Debian's `docker-compose` where the
plugin is absent; neither needs a running engine): the tests then check what each service would
run.  Every command and healthcheck must be a command line the real CLI parser accepts, every
triage service's environment a configuration the real loader accepts, and the guards must hold:
no default password, no placeholder password, allowed callers required, nothing published on
every interface.  No container engine or image registry is reachable here, so no image is built
or started (README, "Containers").
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from settings.config import ConfigError, load_settings
from tests.conftest import REPO
from xray_triage.cli import build_parser

COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker-compose.dicom-tls.yml"]
TRIAGE_IMAGE = "xray-triage:local"
# Values IT fills into .env (the example ships them empty).
FILLED = {
    "POSTGRES_PASSWORD": "Zq4v0n7Yb2kPq8s1",
    "REDIS_PASSWORD": "r3D1s-Tq91-xx7aP",
    "WEB_SECRET_KEY": "k" * 40,
    "LISTENER_ADDRESS": "10.20.30.40",
    "WEB_ADDRESS": "10.20.30.40",
}


class ComposeRefused(Exception):
    pass


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    assert v1, "no Compose: `make test` installs Debian's docker-compose (scripts/system_deps.sh)"
    return [v1]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def filled_env() -> dict[str, str]:
    return {**env_file(REPO / ".env.example"), **FILLED}


def merged_services(env: dict[str, str], tmp_path: Path) -> dict[str, dict[str, Any]]:
    """The services as Compose resolves them from these .env values and every compose file."""
    env_path = tmp_path / "deploy.env"
    env_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
    result = subprocess.run(
        [*compose_command(), "--project-directory", str(REPO), "--env-file", str(env_path), *files,
         "--profile", "setup", "config"],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
    )  # fmt: skip
    if result.returncode != 0:
        raise ComposeRefused(result.stderr.strip())
    return dict(yaml.safe_load(result.stdout)["services"])


def published(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) per published port, in either Compose's notation."""
    out = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):  # the plugin's long form
            out.append((str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])))
        else:  # v1: "addr:published:target/tcp"
            address, host_port, target = str(port).split("/")[0].rsplit(":", 2)
            out.append((address, host_port, target))
    return out


def triage_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if svc.get("image") == TRIAGE_IMAGE}


def dockerfile_entrypoint() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    return list(yaml.safe_load(match.group(1)))


def cli_argv(svc: dict[str, Any]) -> list[str]:
    """What the container runs, as xray-triage arguments."""
    entrypoint = svc.get("entrypoint") or dockerfile_entrypoint()
    argv = [*entrypoint, *(svc.get("command") or [])]
    assert argv[0] == "xray-triage", argv
    return [str(a) for a in argv[1:]]


def test_every_command_and_healthcheck_is_a_real_cli_command(tmp_path: Path) -> None:
    services = triage_services(merged_services(filled_env(), tmp_path))
    assert {"migrate", "listener", "worker", "web", "create-admin"} <= set(services)
    parser = build_parser()
    for name, svc in services.items():
        args = parser.parse_args(cli_argv(svc))  # argparse exits on anything it does not know
        assert callable(args.func), name
        check = svc.get("healthcheck", {}).get("test")
        if check:
            assert check[0] == "CMD" and check[1] == "xray-triage", (name, check)
            assert callable(parser.parse_args(check[2:]).func)
    assert services["listener"]["healthcheck"]["test"][2:] == ["health", "listener"]
    assert services["web"]["healthcheck"]["test"][2:] == ["health", "web"]
    # The first admin: interactive, or with the password on stdin.
    admin = parser.parse_args([*cli_argv(services["create-admin"]), "--password-stdin"])
    assert (admin.command, admin.user_command, admin.role, admin.password_stdin) == ("user", "add", "admin", True)
    assert services["create-admin"]["profiles"] == ["setup"]  # not started by `up`


def test_every_triage_service_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    for name, svc in triage_services(merged_services(filled_env(), tmp_path)).items():
        settings = load_settings(None, environ={k: str(v) for k, v in svc["environment"].items()})
        assert settings.database.url.startswith("postgresql+psycopg://xray:"), name
        assert settings.broker.url.startswith("redis://:"), name
        assert settings.listener.require_allowed_callers and settings.listener.allowed_callers, name
        assert settings.listener.probe_host == "listener"
        assert settings.web.cookie_secure, name
        if name in ("listener", "web"):  # the DICOM-TLS overlay reaches both: /healthz knows the port speaks TLS
            assert settings.listener.tls is not None, name
        volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in svc["volumes"]]
        assert any(v.startswith("data:/var/lib/xray-triage") for v in volumes), name


def _environment(svc: dict[str, Any], **override: str) -> dict[str, str]:
    return {**{k: str(v) for k, v in svc["environment"].items()}, **override}


def test_no_default_passwords_and_placeholders_are_refused(tmp_path: Path) -> None:
    example = env_file(REPO / ".env.example")
    secrets = [k for k in example if re.search(r"PASSWORD|SECRET", k)]
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "WEB_SECRET_KEY"} <= set(secrets)
    assert all(example[k] == "" for k in secrets), "the example must not ship a password"
    # With the example as it ships, Compose refuses to start: the passwords are required.
    for secret in secrets:
        with pytest.raises(ComposeRefused, match=f"set {secret} in .env"):
            merged_services({**filled_env(), secret: ""}, tmp_path)
    # A placeholder password gets past Compose but not past xray-triage's start-up.
    listener = merged_services({**filled_env(), "POSTGRES_PASSWORD": "change-me"}, tmp_path)["listener"]
    with pytest.raises(ConfigError, match=r"database\.url: .*placeholder password 'change-me'"):
        load_settings(None, environ=_environment(listener))
    listener = merged_services({**filled_env(), "REDIS_PASSWORD": "changeme"}, tmp_path)["listener"]
    with pytest.raises(ConfigError, match=r"broker\.url: .*placeholder password"):
        load_settings(None, environ=_environment(listener))


def test_the_listener_needs_allowed_callers_and_a_hospital_address(tmp_path: Path) -> None:
    for missing in ("ALLOWED_CALLERS", "LISTENER_ADDRESS"):
        env = filled_env()
        del env[missing]
        with pytest.raises(ComposeRefused, match=f"set {missing} in .env"):
            merged_services(env, tmp_path)
    # An empty list gets past Compose; the listener's configuration then refuses to start.
    listener = merged_services({**filled_env(), "ALLOWED_CALLERS": "[]"}, tmp_path)["listener"]
    with pytest.raises(ConfigError, match="allowed_callers is required"):
        load_settings(None, environ=_environment(listener))
    assert published(listener) == [(FILLED["LISTENER_ADDRESS"], "11112", "11112")]


def test_only_the_listener_and_the_https_proxy_are_published(tmp_path: Path) -> None:
    services = merged_services(filled_env(), tmp_path)
    exposed = {name for name, svc in services.items() if published(svc)}
    assert exposed == {"listener", "proxy"}
    for name in exposed:
        for address, _, _ in published(services[name]):
            assert address not in ("", "0.0.0.0", "::"), (name, address)
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert doc["networks"]["backend"]["internal"] is True
    for name in ("postgres", "redis", "worker", "web", "migrate"):
        assert list(services[name]["networks"]) == ["backend"], name
    # The proxy terminates HTTPS and forwards to the web service's port.
    web_port = services["web"]["environment"]["XRAY_TRIAGE_WEB__PORT"]
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert re.search(r"listen 8443 ssl;", nginx) and f"proxy_pass http://web:{web_port};" in nginx
    assert published(services["proxy"]) == [(FILLED["WEB_ADDRESS"], "443", "8443")]


def test_the_image_is_built_from_the_wheel_and_runs_unprivileged() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "a wheel stage and a runtime stage"
    build, runtime = stages
    assert "pip wheel" in build
    assert "COPY --from=wheel /wheels /wheels" in runtime and re.search(r"pip install .*/wheels/xray_triage-", runtime)
    assert "COPY . ." not in runtime, "the runtime image holds the wheel, not the checkout"
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # Nothing local goes into the build context.
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "var", ".env", ".git"} <= set(ignored)
