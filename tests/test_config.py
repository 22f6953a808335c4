"""The one Settings object: file + environment, and errors that name the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import ConfigError, effective_config, load_settings, mask_secrets


def test_environment_overrides_the_file_with_typed_values(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listener:\n  port: 11112\n  ae_title: FROM_FILE\nhandoff:\n  stability_window_s: 5\n")
    settings = load_settings(
        cfg,
        environ={
            "XRAY_TRIAGE_LISTENER__PORT": "10404",
            "XRAY_TRIAGE_HANDOFF__STABILITY_WINDOW_S": "0.5",
            "XRAY_TRIAGE_LISTENER__ALLOWED_CALLERS": "[{ae_title: PACS, host: 10.0.0.5}]",
        },
    )
    assert settings.listener.port == 10404 and settings.listener.ae_title == "FROM_FILE"
    assert settings.handoff.stability_window_s == 0.5
    assert settings.listener.allowed_callers[0].host == "10.0.0.5"


@pytest.mark.parametrize(
    ("yaml_text", "env", "key"),
    [
        ("", {"XRAY_TRIAGE_LISTENER__PORT": "70000"}, "listener.port"),
        ("listener:\n  prot: 104\n", {}, "listener.prot: unknown key"),
        ("listener:\n  allowed_callers:\n    - ae_title: 'BAD\\\\AE'\n", {}, "listener.allowed_callers.0.ae_title"),
        ("listener:\n  max_pdu: 100\n", {}, "listener.max_pdu"),
        ("listener:\n  sop_classes: [CT]\n", {}, "listener.sop_classes"),
        ("queues:\n  urgent: same\n  routine: same\n", {}, "queues"),
        ("database:\n  url: mysql://x/y\n", {}, "database.url"),
        ("handoff:\n  stability_window_s: 0\n", {}, "handoff.stability_window_s"),
        ("", {"XRAY_TRIAGE_WEB__PORT": "0"}, "web.port"),
        ("web:\n  secret_key: short\n", {}, "web.secret_key"),
        ("web:\n  refresh_s: 30\n", {}, "web.refresh_s"),
        ("web:\n  mask_patient_identity: maybe\n", {}, "web.mask_patient_identity"),
        ("triage:\n  min_steering_specificity: 1.5\n", {}, "triage.min_steering_specificity"),
        ("", {"XRAY_TRIAGE_TRIAGE__MIN_STEERING_WITHIN_AUC": "-0.1"}, "triage.min_steering_within_auc"),
        ("worker:\n  heartbeat_interval_s: 0\n", {}, "worker.heartbeat_interval_s"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, yaml_text: str, env: dict[str, str], key: str):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ=env)
    assert key in str(err.value)


def test_unreadable_or_invalid_files_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})


def test_secrets_are_masked():
    settings = load_settings(
        environ={
            "XRAY_TRIAGE_DATABASE__URL": "postgresql://triage:s3cr3t@db.example:5432/xt",
            "XRAY_TRIAGE_BROKER__URL": "redis://:hunter2@redis.example:6379/0",
        }
    )
    shown = str(effective_config(settings))
    assert "s3cr3t" not in shown and "hunter2" not in shown and shown.count("***") == 2
    key = "k" * 40
    with_key = effective_config(load_settings(environ={"XRAY_TRIAGE_WEB__SECRET_KEY": key}))
    assert with_key["web"]["secret_key"] == "***" and key not in str(with_key)
    assert settings.database.url.startswith("postgresql+psycopg://")
    assert mask_secrets("sqlite:///var/x.db") == "sqlite:///var/x.db"


@pytest.mark.parametrize("key", ["thresholds", "critical_thresholds"])
def test_a_misspelt_finding_in_a_threshold_map_stops_the_cli_naming_the_key(tmp_path, key):
    import subprocess
    import sys

    config = tmp_path / "site.yaml"
    config.write_text(f"triage:\n  {key}:\n    pneumnia: 0.5\n")
    result = subprocess.run(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "config", "check"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"triage.{key}: unknown finding pneumnia" in result.stderr and "pneumonia" in result.stderr
    assert "Traceback" not in result.stderr


def test_relative_paths_in_a_config_file_resolve_against_its_folder_from_any_working_folder(tmp_path: Path):
    import os
    import subprocess
    import sys

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir()
    elsewhere.mkdir()
    config = site / "xray-triage.yaml"
    config.write_text("storage:\n  spool_dir: data/spool\ndatabase:\n  url: sqlite:///data/x.db\n")
    settings = load_settings(config, environ={})
    assert settings.storage.spool_dir == site / "data/spool"
    assert settings.database.url == f"sqlite:///{site / 'data/x.db'}"
    assert settings.worker.heatmap_dir == site / "var/heatmaps"  # defaults too: one data folder per site
    home = load_settings(config, environ={"XRAY_TRIAGE_HOME": str(tmp_path / "home")})
    assert home.storage.spool_dir == tmp_path / "home/data/spool"

    cli = [sys.executable, "-m", "xray_triage.cli", "--config", str(config)]
    for args in (["db", "upgrade"], ["status", "--json"]):
        env = {k: v for k, v in os.environ.items() if k not in ("XRAY_TRIAGE_HOME", "XRAY_TRIAGE_VAR")}
        result = subprocess.run([*cli, *args], cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
    assert (site / "data/x.db").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing written where the command was run


def test_queue_names_fit_the_database_column() -> None:
    """A study records its queue's name in 64 characters: a longer name would fail every hand-off."""
    with pytest.raises(ConfigError, match=r"queues\.urgent: String should have at most 64 characters"):
        load_settings(None, environ={"XRAY_TRIAGE_QUEUES__URGENT": "q" * 65})
    assert load_settings(None, environ={"XRAY_TRIAGE_QUEUES__URGENT": "q" * 64}).queues.urgent == "q" * 64


def test_export_destinations_from_one_variable_validated_and_masked() -> None:
    pacs = '{"name": "pacs", "kind": "dicom", "ae_title": "ORTHANC", "host": "10.1.2.3", "port": 4242}'
    ris = '{"name": "ris", "kind": "hl7", "host": "ris.hospital.example", "port": 2575}'
    settings = load_settings(environ={"XRAY_TRIAGE_EXPORT__DESTINATIONS": f"[{pacs}, {ris}]"})
    assert [(d.name, d.kind, d.object_kinds) for d in settings.export.destinations] == [
        ("pacs", "dicom", ("sr", "heatmaps")),
        ("ris", "hl7", ("oru",)),
    ]
    shown = effective_config(settings)["export"]["destinations"]
    assert [d["host"] for d in shown] == ["10.***", "ris.***"]
    for bad, says in (
        ('[{"name": "pacs", "kind": "dicom", "host": "h", "port": 104}]', "needs ae_title"),
        (f"[{pacs}, {pacs}]", "must be unique: pacs"),
        ('[{"name": "ris", "kind": "hl7", "host": "h", "port": 2575, "objects": ["sr"]}]', "dicom destinations only"),
        ('[{"name": "x y", "kind": "dicom", "ae_title": "A", "host": "h", "port": 104}]', "export.destinations.0.name"),
        ('[{"name": "pacs", "kind": "smtp", "host": "h", "port": 25}]', "export.destinations.0.kind"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_settings(environ={"XRAY_TRIAGE_EXPORT__DESTINATIONS": bad})
