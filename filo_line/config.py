"""The line file (`line.yaml`) read into one pydantic object, `LineConfig`.

The keys are a contract with the line engineer's file (docs/line.md): every model forbids unknown keys, so a
typo is refused instead of silently ignored, and each refusal names the field by its path in the file
(`stations[0].plc.nodes.ack: field required`). `${NAME}` in a string value is replaced by the environment
variable NAME after the YAML is parsed, so a secret is data and never YAML: a key holding `: ` or `#` stays one
string. A variable that is not set is an error naming it and the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# what the service accepts as a record's `source`; a station's name is its records' source
STATION_NAME_PATTERN = r"^[A-Za-z0-9\-_.:/]{1,64}$"
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DEFAULT_METRICS_PORT = 9108


class ConfigError(ValueError):
    """The line file cannot be used; `problems` holds one "field: reason" line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + ("; ".join(problems) if len(problems) == 1
                                          else "\n  " + "\n  ".join(problems)))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str, schemes: tuple[str, ...], what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"{what} must start with {' or '.join(s + '://' for s in schemes)}, not {value!r}")
    if not parts.hostname:
        raise ValueError(f"{what} {value!r} names no host")
    try:
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise ValueError(f"{what} {value!r} has a port that is not a number from 0 to 65535") from None
    return value


class ServiceConfig(_Strict):
    url: str = Field(..., description="the FiLo Inspect service, e.g. http://127.0.0.1:8000")
    key: str = Field(..., min_length=1, description="an API key of the service (FILO_API_KEYS)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, ("http", "https"), "the service URL").rstrip("/")


class SpoolConfig(_Strict):
    dir: Path = Field(..., description="where images not inspected in time wait for the service")
    max_mb: float = Field(2048, gt=0, description="the spool's bound in MiB; past it new images are refused")


class MetricsConfig(_Strict):
    port: int = Field(DEFAULT_METRICS_PORT, ge=1, le=65535)
    host: str = Field("0.0.0.0", description="the address the Prometheus endpoint binds")


class FolderCamera(_Strict):
    kind: Literal["folder"]
    path: Path
    pattern: str = Field("*", min_length=1, description="file names taken, as a shell pattern (*.png)")


class GenicamCamera(_Strict):
    kind: Literal["genicam"]
    id: str | None = Field(None, description="the camera's Aravis id; none: the first camera found")
    trigger: Literal["software", "hardware", "free"] = "software"


Camera = Annotated[FolderCamera | GenicamCamera, Field(discriminator="kind")]

# The handshake's signals (filo_line/plc/base.py); the trigger pair only where the PLC triggers the parts.
TRIGGER_SIGNALS = ("trigger_ready", "trigger")
RESULT_SIGNALS = ("result_ready", "ok", "ng", "error", "ack")


class OpcUaNodes(_Strict):
    trigger_ready: str | None = None
    trigger: str | None = None
    part_id: str
    result_ready: str
    ok: str
    ng: str
    error: str
    ack: str


class ModbusCoils(_Strict):
    trigger_ready: int | None = Field(None, ge=0, le=65535)
    trigger: int | None = Field(None, ge=0, le=65535)
    result_ready: int = Field(..., ge=0, le=65535)
    ok: int = Field(..., ge=0, le=65535)
    ng: int = Field(..., ge=0, le=65535)
    error: int = Field(..., ge=0, le=65535)
    ack: int = Field(..., ge=0, le=65535)


def _trigger_fields_present(triggered: bool, mapping: BaseModel, where: str) -> None:
    if triggered:
        missing = [name for name in TRIGGER_SIGNALS if getattr(mapping, name) is None]
        if missing:
            raise ValueError(f"{where}.{missing[0]}: field required (triggered: true)")


class OpcUaPlc(_Strict):
    kind: Literal["opcua"]
    endpoint: str
    triggered: bool = False
    nodes: OpcUaNodes

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return _check_url(v, ("opc.tcp",), "the OPC UA endpoint")

    @model_validator(mode="after")
    def _trigger_nodes(self) -> OpcUaPlc:
        _trigger_fields_present(self.triggered, self.nodes, "nodes")
        return self

    def signal_map(self) -> dict[str, str]:
        """Signal name -> node id, the configured ones."""
        return {k: v for k, v in self.nodes.model_dump().items() if v is not None}


class ModbusPlc(_Strict):
    kind: Literal["modbus"]
    host: str = Field(..., min_length=1)
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255)
    triggered: bool = False
    coils: ModbusCoils
    part_id_register: int = Field(..., ge=0, le=65535)

    @model_validator(mode="after")
    def _trigger_coils(self) -> ModbusPlc:
        _trigger_fields_present(self.triggered, self.coils, "coils")
        return self

    def signal_map(self) -> dict[str, int]:
        return {k: v for k, v in self.coils.model_dump().items() if v is not None}


Plc = Annotated[OpcUaPlc | ModbusPlc, Field(discriminator="kind")]


class MqttPublish(_Strict):
    kind: Literal["mqtt"]
    url: str
    topic: str = Field(..., min_length=1)
    qos: Literal[0, 1, 2] = 1

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, ("mqtt", "mqtts"), "the broker URL")

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if "+" in v or "#" in v:
            raise ValueError(f"a topic to publish to holds no wildcard (+ or #): {v!r}")
        return v


class FolderPublish(_Strict):
    kind: Literal["folder"]
    path: Path


Publish = Annotated[MqttPublish | FolderPublish, Field(discriminator="kind")]


class StationConfig(_Strict):
    name: str = Field(..., pattern=STATION_NAME_PATTERN, description="the records' `source`")
    category: str = Field(..., min_length=1)
    deadline_ms: int = Field(..., ge=50, le=600_000, description="from the trigger to the PLC signal")
    on_timeout: Literal["ng", "ok"] = "ng"
    camera: Camera
    plc: Plc | None = None
    publish: list[Publish] = Field(default_factory=list)

    @model_validator(mode="after")
    def _someone_triggers_the_camera(self) -> StationConfig:
        triggered = self.plc is not None and self.plc.triggered
        if isinstance(self.camera, GenicamCamera) and self.camera.trigger == "software" and not triggered:
            raise ValueError("camera.trigger: software needs a PLC that triggers the parts (plc.triggered: true); "
                             "use hardware or free otherwise")
        return self

    @property
    def triggered(self) -> bool:
        return self.plc is not None and self.plc.triggered


class LineConfig(_Strict):
    service: ServiceConfig
    spool: SpoolConfig
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    stations: list[StationConfig] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> LineConfig:
        seen: dict[str, int] = {}
        for i, station in enumerate(self.stations):
            if station.name in seen:
                raise ValueError(f"stations[{i}].name: {station.name!r} is the name of stations[{seen[station.name]}] "
                                 "too; each station needs its own")
            seen[station.name] = i
        return self


# --- reading the file -----------------------------------------------------------------------------------------


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def substitute_env(value: Any, env: dict[str, str], loc: tuple[Any, ...] = ()) -> Any:
    """`${NAME}` in every string of the parsed file replaced by the environment's NAME; raises ConfigError
    naming the variable and the field when NAME is not set."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, (*loc, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, (*loc, i)) for i, v in enumerate(value)]
    if isinstance(value, str):
        missing = [name for name in ENV_REFERENCE.findall(value) if name not in env]
        if missing:
            raise ConfigError("line config", [f"{_path(loc)}: environment variable {missing[0]} is not set"])
        return ENV_REFERENCE.sub(lambda m: env[m.group(1)], value)
    return value


def _user_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """pydantic's error location without the union tags it inserts (`plc.opcua.nodes` -> `plc.nodes`): walk the
    input alongside it and drop a step that is the `kind` of the mapping it stands in, not one of its keys."""
    out: list[Any] = []
    here = data
    for step in loc:
        if isinstance(here, dict) and step not in here and here.get("kind") == step:
            continue
        out.append(step)
        if isinstance(here, dict):
            here = here.get(step)
        elif isinstance(here, list) and isinstance(step, int) and step < len(here):
            here = here[step]
        else:
            here = None
    return tuple(out)


def _reason(error: dict[str, Any]) -> str:
    msg = str(error["msg"])
    if error["type"] == "missing":
        return "field required"
    if error["type"] == "extra_forbidden":
        return "unknown key (a typo? docs/line.md lists the keys)"
    if error["type"] == "union_tag_invalid":
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"kind {error.get('input', {}).get('kind')!r} is not one of {expected}"
    if error["type"] == "union_tag_not_found":
        return "field required: kind"
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def problems_of(exc: ValidationError, data: Any) -> list[str]:
    """One "field: reason" line per error of a validation, fields as they are written in the file."""
    out = []
    for error in exc.errors():
        loc = _user_loc(tuple(error["loc"]), data)
        reason = _reason(error)
        # a cross-field check names its own field path ("stations[1].name: ...") below the model it checks
        named = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", reason)
        if named and error["type"] == "value_error":
            prefix = _path(loc)
            field = named.group(1)
            out.append(f"{prefix + '.' if prefix else ''}{field}: {named.group(2)}")
        else:
            out.append(f"{_path(loc) or '(the file)'}: {reason}")
    return out


def parse_config(text: str, source: str = "line config", env: dict[str, str] | None = None) -> LineConfig:
    """The validated configuration from YAML text; raises ConfigError listing every problem with its field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(source, [f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["(the file): a mapping with service, spool, metrics and stations is expected"])
    try:
        data = substitute_env(data, dict(os.environ) if env is None else env)
    except ConfigError as exc:
        raise ConfigError(source, exc.problems) from None
    try:
        return LineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, problems_of(exc, data)) from None


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> LineConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"(the file): cannot be read ({exc.strerror or exc})"]) from None
    return parse_config(text, str(p), env)
