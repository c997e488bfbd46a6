"""Configuration: the documented file, the embedded defaults, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError
from tests.peers import free_port, node_cli

ROOT = Path(__file__).resolve().parents[1]


def test_documented_file_equals_embedded_defaults() -> None:
    """config.yaml at the top documents exactly the defaults the node runs on without it."""
    assert load_config(ROOT / "config.yaml") == Config()


def test_config_is_frozen() -> None:
    """The loaded configuration cannot be changed after start."""
    cfg = load_config(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("node: {port: 70000}", "node.port: 70000 is not a port (1-65535)"),
        ("node: {ae_title: ''}", 'node.ae_title: "" is not an AE title (1-16 characters)'),
        ("node: {ae_title: 'A\\\\B'}", "is not an AE title (no backslash or control characters)"),
        ("node: {ae_title: '    '}", "is not an AE title (not all spaces)"),
        ("node: {ae_title: SEVENTEEN_CHARS_X}", "is not an AE title (1-16 characters)"),
        ("node: {prot: 1}", "node.prot: unknown key"),
        ("storage: {min_free_disk_mb: -5}", "storage.min_free_disk_mb: -5 is invalid"),
        ("study: {stable_seconds: 60, max_wait_seconds: 10}", "max_wait_seconds must be at least"),
        (
            "destinations: [{name: a, ae_title: A, host: h, port: 1},"
            " {name: a, ae_title: B, host: h, port: 2}]",
            "destination names must be unique",
        ),
        ("destinations: [{name: a, host: h, port: 1}]", "destinations[0].ae_title: missing"),
        ("node: {allowed_callers: [{ae_title: 'X\\x01'}]}", "node.allowed_callers[0].ae_title"),
        ("logging: {level: LOUD}", 'logging.level: "LOUD" is invalid'),
        (
            "node: {allowed_callers: [{ae_title: PACS, host: pacs.example}]}",
            'node.allowed_callers[0].host: "pacs.example" is not an IP address',
        ),
        ("jobs: {job_timeout_seconds: .inf}", "jobs.job_timeout_seconds: Infinity is invalid"),
        ("service: {drain_seconds: 120}", "service.drain_seconds: 120 is invalid"),
        ("inference: {seg_scales: [1.25]}", "seg_scales must hold 1.0, and each scale once"),
        (
            "results: {sr_series_description: 'AI\\\\lesions'}",
            "must be printable ASCII without a backslash",
        ),
        (
            "results: {seg_series_description: 'KI-Läsionen'}",
            "results.seg_series_description: ",
        ),
        ("results: {device_serial_number: '  '}", "is not a DICOM long string"),
        ("- just\n- a list", "the top level must be a mapping"),
        ("node: [unclosed", "not valid YAML"),
    ],
)
def test_bad_values_name_key_value_and_expectation(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    """Each bad value is reported with its key's path, the value and what was expected."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    """Command-line overrides replace file values and get the same checks."""
    path = tmp_path / "c.yaml"
    path.write_text("node: {port: 4000, ae_title: FROMFILE}")
    cfg = load_config(path, overrides={"node": {"port": 5000}})
    assert (cfg.node.port, cfg.node.ae_title) == (5000, "FROMFILE")
    with pytest.raises(ConfigError, match=r"node\.port: 0 is not a port"):
        load_config(path, overrides={"node": {"port": 0}})


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    """check-config: 0 and 'valid' for a good file; 2 and the reasons for a bad one."""
    good = node_cli("check-config", str(ROOT / "config.yaml"))
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 70000}\nstudy: {stable_seconds: -1}\n")
    done = node_cli("check-config", str(bad))
    assert done.returncode == 2
    assert "node.port: 70000 is not a port (1-65535)" in done.stderr
    assert "study.stable_seconds: -1 is invalid" in done.stderr
    assert "Traceback" not in done.stderr
    missing = node_cli("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_serve_with_bad_config_exits_2_before_binding(tmp_path: Path) -> None:
    """serve refuses a bad file at start with the message and exit status 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 70000}\n")
    done = node_cli("serve", "--config", str(bad))
    assert done.returncode == 2
    assert "node.port: 70000 is not a port (1-65535)" in done.stderr
    flag = node_cli("serve", "--config", str(tmp_path / "nope.yaml"), "--ae-title", "X" * 17)
    assert flag.returncode == 2


def test_a_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    """A file saved in Latin-1 is reported in one line (not a traceback), status 2."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(
        "results:\n  sr_series_description: Befund (nicht gepr\xfcft)\n".encode("latin-1")
    )
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
    done = node_cli("check-config", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """A second ``node:`` section would silently undo the first (YAML keeps the last)."""
    path = tmp_path / "twice.yaml"
    path.write_text("node:\n  ae_title: SITE_NODE\nnode:\n  port: 104\n")
    with pytest.raises(ConfigError, match="the key 'node' is given twice"):
        load_config(path)


def test_a_choice_is_named_as_it_must_be_spelt(tmp_path: Path) -> None:
    """The allowed values of a choice keep their case in the message."""
    path = tmp_path / "level.yaml"
    path.write_text("logging:\n  level: info\n")
    with pytest.raises(ConfigError, match="input should be 'DEBUG', 'INFO'"):
        load_config(path)


def _site(tmp_path: Path, **sections: dict[str, object]) -> Path:
    import yaml

    raw: dict[str, object] = {
        "storage": {"data_dir": str(tmp_path / "var")},
        "model": {"path": None},
        **sections,
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {
                "node": {
                    "tls": {
                        "cert": "/nowhere/n.crt",
                        "key": "/nowhere/n.key",
                        "ca": "/nowhere/ca.crt",
                    }
                }
            },
            "node.tls.cert",
        ),
        ({"model": {"path": "/nowhere/model"}}, "model.path: '/nowhere/model' is not a folder"),
        ({"node": {"host": "node.invalid"}}, "node.host: 'node.invalid' does not resolve"),
        (
            {"service": {"http_host": "health.invalid", "http_port": 8080}},
            "service.http_host: 'health.invalid' does not resolve",
        ),
        (
            {"inference": {"device": "cpu", "precision": "fp16"}, "model": {}},
            "'fp16' is supported on CUDA only",
        ),
    ],
)
def test_check_config_refuses_what_serve_refuses(
    tmp_path: Path, sections: dict[str, dict[str, object]], expected: str
) -> None:
    """check-config, which install.sh runs before restarting the service, refuses what the
    node would refuse at start (certificates, model folder, host names, device and precision),
    not only what the schema does; and serve refuses it with status 2."""
    if sections.get("model") == {}:
        sections = {**sections, "model": {"path": str(ROOT / "models/lung-ct-unet-resnet50")}}
    path = _site(tmp_path, **sections)
    done = node_cli("check-config", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    if "model" not in sections and "service" not in sections:
        served = node_cli("serve", "--config", str(path), "--port", str(free_port()))
        assert served.returncode == 2, served.stderr[-500:]
        assert expected in served.stderr


def test_check_config_warns_of_a_destination_host_that_does_not_resolve(tmp_path: Path) -> None:
    """A destination or known peer whose host does not resolve is named as a warning (a name
    server may be out of reach for now: the configuration stays valid, exit 0)."""
    path = _site(
        tmp_path,
        destinations=[  # type: ignore[arg-type]
            {"name": "pacs", "ae_title": "PACS", "host": "pacs.invalid", "port": 104},
            {"name": "here", "ae_title": "HERE", "host": "127.0.0.1", "port": 104},
        ],
        dispatch={
            "known_peers": [{"ae_title": "CT1", "host": "ct1.invalid", "port": 104}],
        },
    )
    done = node_cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert [w.split(" (")[0] for w in warnings] == [  # the reason is the resolver's own words
        "warning: destinations[pacs].host: 'pacs.invalid' does not resolve",
        "warning: dispatch.known_peers[CT1].host: 'ct1.invalid' does not resolve",
    ]
    assert all(w.endswith("results for it wait in the outbox until it does") for w in warnings)
    assert done.stdout.strip().endswith(": valid")


def _keys(value: object, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        out = set()
        for k, v in value.items():
            out |= {f"{prefix}{k}"} | _keys(v, f"{prefix}{k}.")
        return out
    return set()


def test_documented_file_names_every_key() -> None:
    """config.yaml spells out every key of every section (the reference an operator reads)."""
    import yaml

    documented = _keys(yaml.safe_load((ROOT / "config.yaml").read_text()))
    embedded = _keys(Config().model_dump(mode="json"))
    assert embedded - documented == set()
    assert documented - embedded == set()


def test_python_dash_m_runs_the_command() -> None:
    """``python -m dicom_node`` is the ``dicom-node`` command (where the script is not on PATH)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", str(ROOT / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout
