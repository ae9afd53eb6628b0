"""Configuration precedence: defaults < TOML < environment < command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfer.config import ConfigError, load


def test_defaults():
    cfg = load({}, env={})
    assert (cfg.host, cfg.port, cfg.state_dir) == ("127.0.0.1", 8080, Path("./data"))
    assert cfg.database.startswith("sqlite:///") and cfg.database.endswith("data/state.db")
    assert cfg.advertise == "http://127.0.0.1:8080"


def test_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'host = "0.0.0.0"\nport = 9000\nstate-dir = "/srv/vdit"\n'
        'advertise_url = "https://vdit.example/"\n'
    )
    cfg = load({"config": toml}, env={})
    assert (cfg.host, cfg.port, cfg.state_dir) == ("0.0.0.0", 9000, Path("/srv/vdit"))
    assert cfg.advertise == "https://vdit.example"
    cfg = load({"config": toml}, env={"VDIT_PORT": "9100"})
    assert cfg.port == 9100
    cfg = load({"config": toml, "port": 9200}, env={"VDIT_PORT": "9100"})
    assert cfg.port == 9200
    cfg = load({}, env={"VDIT_CONFIG": str(toml)})
    assert cfg.port == 9000


@pytest.mark.parametrize(
    "cli, env, message",
    [
        ({"port": 70000}, {}, "port"),
        ({}, {"VDIT_PORT": "eighty"}, "port"),
        ({}, {"VDIT_DATABASE_URL": "mysql://x"}, "database_url"),
        ({}, {"VDIT_LOG_FORMAT": "xml"}, "log_format"),
        ({"config": Path("/nonexistent.toml")}, {}, "cannot read"),
    ],
)
def test_errors_name_the_key(cli, env, message):
    with pytest.raises(ConfigError, match=message):
        load(cli, env=env)


def test_invalid_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load({"config": toml}, env={})


@pytest.mark.parametrize(
    "mapping, message",
    [
        ("raw:raw, raw:vhd", "'raw:vhd' maps 'raw' a second time"),
        ("tar:tar", "'tar:tar': 'tar' is not a runtime format"),
        ("vmdk:raw", "'vmdk:raw': 'vmdk' is not an upload format"),
        ("qcow2", "'qcow2' is not source:runtime"),
    ],
)
def test_images_type_mapping_errors_name_the_entry(mapping, message):
    with pytest.raises(ConfigError, match=message):
        load({}, env={"VDIT_IMAGES_TYPE_MAPPING": mapping})


def test_images_type_mapping(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('images_type = "vhd"\nimages_type_mapping = ["raw:raw", "qcow2:qcow2"]\n')
    cfg = load({"config": toml}, env={})
    assert cfg.image_mapping == {"raw": "raw", "qcow2": "qcow2"}
    assert cfg.images_type == "vhd"
    with pytest.raises(ConfigError, match="images_type: 'tar'"):
        load({}, env={"VDIT_IMAGES_TYPE": "tar"})


def test_the_deploy_examples_load():
    """The config files deploy/ ships are valid for this version."""
    root = Path(__file__).resolve().parent.parent / "deploy"
    single = load({"config": str(root / "config.example.toml")}, env={})
    assert single.advertise == "https://vdit1.example:8080"
    assert single.tls_cert == Path("/etc/vdi-transfer/cert.pem") and single.tls_key
    assert single.max_transfers == 64 and single.min_rate_bytes == 64 << 10
    assert single.max_json_body_bytes == 1 << 20 and single.idle_timeout == 300
    pool = load({"config": str(root / "pool" / "host.example.toml")}, env={})
    assert pool.database.startswith("postgresql://") and pool.advertise == "https://vdit1.example"


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("max_transfers", "-1", "max_transfers"),
        ("idle_timeout", "-5", "idle_timeout"),
        ("rate_window", "0", "rate_window"),
        ("min_rate", "fast", "min_rate"),
        ("max_json_body", "1K", "max_json_body"),
        ("max_header_size", "100", "max_header_size"),
    ],
)
def test_limits_that_cannot_be_used_name_their_key(key, value, says):
    with pytest.raises(ConfigError, match=says):
        load({}, env={f"VDIT_{key.upper()}": value})
