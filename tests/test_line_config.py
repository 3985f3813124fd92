"""The line file: the issue's keys and no others, `${ENV}` for secrets, and every refusal naming its field."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import yaml

from filo_line.config import ConfigError, GenicamCamera, LineConfig, ModbusPlc, OpcUaPlc, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
NODES = {"trigger_ready": "ns=2;s=C.TR", "trigger": "ns=2;s=C.T", "part_id": "ns=2;s=C.P",
         "result_ready": "ns=2;s=C.RR", "ok": "ns=2;s=C.OK", "ng": "ns=2;s=C.NG", "error": "ns=2;s=C.E",
         "ack": "ns=2;s=C.A"}


def minimal(**station: object) -> dict:
    base = {"name": "cam1", "category": "bottle", "deadline_ms": 1500,
            "camera": {"kind": "folder", "path": "/srv/cam1", "pattern": "*.png"}}
    base.update(station)
    return {"service": {"url": "http://127.0.0.1:8000", "key": "k"}, "spool": {"dir": "/var/lib/x", "max_mb": 10},
            "stations": [base]}


def problems(data: dict | str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data if isinstance(data, str) else yaml.safe_dump(data), env=env or {})
    return caught.value.problems


def test_the_issues_example_file_is_valid_and_reads_every_kind():
    config = load_config(REPO / "deploy" / "line" / "line.yaml", env={"FILO_LINE_KEY": "s3cret: #not yaml"})
    assert config.service.key == "s3cret: #not yaml"  # a secret is data, never YAML
    assert [s.name for s in config.stations] == ["cam1", "cam2"]
    cam1, cam2 = config.stations
    assert isinstance(cam1.plc, OpcUaPlc) and cam1.triggered and cam1.plc.signal_map()["ack"] == "ns=2;s=Cam1.ResultAck"
    assert isinstance(cam2.plc, ModbusPlc) and not cam2.triggered and set(cam2.plc.signal_map()) == {
        "result_ready", "ok", "ng", "error", "ack"}
    assert [p.kind for p in cam1.publish] == ["mqtt", "folder"] and cam1.publish[0].qos == 1
    assert (config.metrics.port, config.spool.max_mb, cam1.on_timeout, cam2.on_timeout) == (9108, 2048, "ng", "ng")


def test_defaults_and_a_genicam_camera():
    config = parse_config(yaml.safe_dump(minimal(
        camera={"kind": "genicam", "id": "Aravis-Fake-GV01", "trigger": "free"})), env={})
    assert isinstance(config.stations[0].camera, GenicamCamera) and config.stations[0].camera.trigger == "free"
    assert config.stations[0].plc is None and config.stations[0].publish == [] and config.metrics.port == 9108


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["stations"][0].update(plc={"kind": "opcua", "endpoint": "opc.tcp://h:4840",
                                            "nodes": {k: v for k, v in NODES.items() if k != "ack"}}),
     "stations[0].plc.nodes.ack: field required"),
    (lambda d: d["stations"][0].update(plc={"kind": "opcua", "endpoint": "opc.tcp://h:4840", "triggered": True,
                                            "nodes": {k: v for k, v in NODES.items() if k != "trigger"}}),
     "stations[0].plc.nodes.trigger: field required (triggered: true)"),
    (lambda d: d["stations"][0].update(plc={"kind": "modbus", "host": "h", "part_id_register": 0,
                                            "coils": {"result_ready": 1, "ok": 2, "ng": 3, "error": 4}}),
     "stations[0].plc.coils.ack: field required"),
    (lambda d: d["stations"][0].update(plc={"kind": "profinet"}),
     "stations[0].plc: kind 'profinet' is not one of 'opcua', 'modbus'"),
    (lambda d: d["stations"][0].update(colour="red"), "stations[0].colour: unknown key"),
    (lambda d: d["spool"].update(max_gb=2), "spool.max_gb: unknown key"),
    (lambda d: d.update(stations=[]), "stations: list should have at least 1 item"),
    (lambda d: d["service"].pop("key"), "service.key: field required"),
    (lambda d: d["service"].update(url="127.0.0.1:8000"), "service.url: the service URL must start with http://"),
    (lambda d: d["service"].update(url="http://:8000"), "service.url: the service URL 'http://:8000' names no host"),
    (lambda d: d["service"].update(url="http://h:99999"), "service.url: the service URL 'http://h:99999' has a port"),
    (lambda d: d["stations"][0].update(publish=[{"kind": "mqtt", "url": "tcp://b:1883", "topic": "t"}]),
     "stations[0].publish[0].url: the broker URL must start with mqtt:// or mqtts://"),
    (lambda d: d["stations"][0].update(publish=[{"kind": "mqtt", "url": "mqtt://b", "topic": "line/#"}]),
     "stations[0].publish[0].topic: a topic to publish to holds no wildcard"),
    (lambda d: d["stations"][0].update(plc={"kind": "opcua", "endpoint": "http://h:4840", "nodes": NODES}),
     "stations[0].plc.endpoint: the OPC UA endpoint must start with opc.tcp://"),
    (lambda d: d["stations"][0].update(deadline_ms=10), "stations[0].deadline_ms: input should be greater than"),
    (lambda d: d["stations"][0].update(on_timeout="maybe"), "stations[0].on_timeout: input should be 'ng' or 'ok'"),
    (lambda d: d["stations"][0].update(name="cam 1"), "stations[0].name: string should match pattern"),
    (lambda d: d["stations"][0].update(camera={"kind": "genicam", "trigger": "software"}),
     "stations[0].camera.trigger: software needs a PLC that triggers the parts"),
    (lambda d: d["stations"].append(dict(d["stations"][0])),
     "stations[1].name: 'cam1' is the name of stations[0] too"),
], ids=["missing-node", "missing-trigger-node", "missing-coil", "unknown-plc-kind", "unknown-key",
        "unknown-spool-key", "no-stations", "no-key", "url-no-scheme", "url-no-host", "url-bad-port", "mqtt-scheme",
        "mqtt-wildcard", "opc-scheme", "deadline-too-short", "on-timeout", "name-pattern", "software-untriggered",
        "duplicate-name"])
def test_a_bad_file_is_refused_naming_the_field_and_the_reason(mutate, expected):
    data = minimal()
    mutate(data)
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_of_a_file_is_listed_at_once():
    data = minimal(colour="red")
    data["service"]["url"] = "ftp://x"
    found = problems(data)
    assert [p.split(":")[0] for p in found] == ["service.url", "stations[0].colour"]


def test_env_substitution_happens_after_parsing_and_a_missing_variable_is_named():
    text = yaml.safe_dump(minimal()).replace("key: k", "key: ${FILO_LINE_KEY}").replace(
        "max_mb: 10", "max_mb: ${SPOOL_MB}")
    config = parse_config(text, env={"FILO_LINE_KEY": "a]b{c", "SPOOL_MB": "64"})
    assert (config.service.key, config.spool.max_mb) == ("a]b{c", 64)
    assert problems(text, env={"SPOOL_MB": "64"}) == ["service.key: environment variable FILO_LINE_KEY is not set"]
    assert problems(text.replace("${SPOOL_MB}", "lots-${SPOOL_MB}"), env={"FILO_LINE_KEY": "k", "SPOOL_MB": "1"}) \
        == ["spool.max_mb: input should be a valid number, unable to parse string as a number"]


def test_not_yaml_and_not_a_file_are_refused_with_where():
    assert problems("service: {url: [")[0].startswith("line 1, column")
    assert problems("- just\n- a list\n") == [
        "(the file): a mapping with service, spool, metrics and stations is expected"]
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config("/nonexistent/line.yaml")


def test_the_model_holds_exactly_the_documented_keys():
    """The keys are a contract with the line engineer's file: adding one is a decision, not an accident."""
    def keys(model: type) -> set[str]:
        return set(model.model_fields)

    assert keys(LineConfig) == {"service", "spool", "metrics", "stations"}
    from filo_line import config as c

    assert keys(c.ServiceConfig) == {"url", "key"} and keys(c.SpoolConfig) == {"dir", "max_mb"}
    assert keys(c.MetricsConfig) == {"port", "host"}
    assert keys(c.StationConfig) == {"name", "category", "deadline_ms", "on_timeout", "camera", "plc", "publish"}
    assert keys(c.FolderCamera) == {"kind", "path", "pattern"} and keys(c.GenicamCamera) == {"kind", "id", "trigger"}
    assert keys(c.OpcUaPlc) == {"kind", "endpoint", "triggered", "nodes"}
    assert keys(c.ModbusPlc) == {"kind", "host", "port", "unit", "triggered", "coils", "part_id_register"}
    assert keys(c.OpcUaNodes) == set(NODES) and keys(c.ModbusCoils) == set(NODES) - {"part_id"}
    assert keys(c.MqttPublish) == {"kind", "url", "topic", "qos"} and keys(c.FolderPublish) == {"kind", "path"}


def test_the_systemd_unit_restarts_always_as_its_own_user_with_a_state_dir_and_an_environment_file():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read(REPO / "deploy" / "line" / "filo-line.service")
    service = unit["Service"]
    assert service["Restart"] == "always" and service["User"] == "filo-line" != "root"
    assert service["StateDirectory"] == "filo-line" and service["EnvironmentFile"] == "/etc/filo-line/env"
    assert service["ExecStart"].endswith("filo line --config /etc/filo-line/line.yaml")
    example = load_config(REPO / "deploy" / "line" / "line.yaml", env={"FILO_LINE_KEY": "k"})
    assert str(example.spool.dir).startswith("/var/lib/filo-line/")  # the unit's state directory
