"""The one configuration object of FiLo Inspect.

Every process (CLI, API, worker) reads its configuration from `FiloSettings`: environment
variables prefixed `FILO_` (lists and dicts as JSON), overridden by command-line flags. Keeping
it in one place is what lets ops reason about a pod from its environment alone. Every default is here;
the values FiLo itself defines (its backbone, detector and few-shot matching) come from
`models/constants.py` (no torch), so none is written twice.

The fields stay flat (`settings.redis_url`, `FILO_REDIS_URL`); each is filed under one of the
`SECTIONS` below, and `docs/settings.md` is generated from the fields' sections, types, defaults and
descriptions by `python -m service.settings_doc` (tests/test_settings_reference.py fails when it is stale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.constants import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_WEIGHTS,
    DEFAULT_GROUNDING_MODEL,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MATCH,
    DEFAULT_RADIUS,
    DEFAULT_WEIGHT,
)

Profile = Literal["production", "demo"]


@dataclass(frozen=True)
class Section:
    """One heading of the settings reference: a title and a sentence on what its settings share."""

    title: str
    about: str

    def field(self, default: Any = PydanticUndefined, *, description: str, **kwargs: Any) -> Any:
        """A pydantic `Field` filed under this section (kept in its JSON schema extra as "group")."""
        return Field(default, description=description, json_schema_extra={"group": self.title}, **kwargs)


MODEL = Section("Model", "Which networks run and where their weights and texts come from. The common ones are "
                "also flags of the commands that build a model (`--profile`, `--checkpoint`, ...), which win over "
                "the environment.")
DEVICE = Section("Device and GPU speed", "Where the model runs and the GPU options, each tested against the "
                 "plain path (docs/gpu.md).")
HTTP = Section("HTTP server and request limits", "`filo serve`'s address and what one request may be.")
KEYS = Section("Access keys", "Who may inspect, read records, judge them and change categories, and which "
               "categories and sources a key is limited to (docs/records.md, Keys, roles and limits).")
QUEUE = Section("Batching, queue and workers", "How requests are batched, and in queue mode how API pods and "
                "workers meet through Redis and notice a dead worker (docs/service.md).")
ANSWERS = Section("Answer defaults", "What an answer uses when neither the request nor the category says otherwise.")
REFERENCES = Section("Few-shot references", "Normal reference images per category and how they are matched "
                     "(docs/few-shot.md).")
STATE = Section("State and catalog", "Where categories and caches persist, and how the catalog stays whole.")
RECORDS = Section("Inspection records", "The record of every inspection, its kept images and its way into the "
                  "database (docs/records.md).")
LLM = Section("Description generation (LLM)", "The OpenAI-compatible chat endpoint that drafts category "
              "descriptions (`filo describe`, PUT /v1/categories/{name} with `generate`).")

# the order of docs/settings.md
SECTIONS = (MODEL, DEVICE, HTTP, KEYS, QUEUE, ANSWERS, REFERENCES, STATE, RECORDS, LLM)


class KeyLimit(BaseModel):
    """What one limited key may reach: records and inspections of these categories and sources only. A list
    left out does not limit; at least one is given, and a given list is not empty."""

    model_config = ConfigDict(extra="forbid")

    categories: list[str] | None = Field(None, min_length=1)
    sources: list[str] | None = Field(None, min_length=1)

    @field_validator("categories", "sources")
    @classmethod
    def _names_not_blank(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not name.strip() for name in v):
            raise ValueError("an empty name limits a key to nothing: leave the list out to allow every one")
        return v

    @model_validator(mode="after")
    def _limits_something(self) -> KeyLimit:
        if self.categories is None and self.sources is None:
            raise ValueError('a limit names "categories", "sources" or both (an empty limit would limit nothing)')
        return self


class FiloSettings(BaseSettings):
    # populate_by_name: a field read from other environment names too (hub_offline) is still set by its name
    model_config = SettingsConfigDict(env_prefix="FILO_", extra="ignore", populate_by_name=True)

    profile: Profile = MODEL.field(
        "production",
        description="'production' loads real weights and fails loudly when they are missing; "
        "'demo' builds the tiny randomly initialised models from models/configs (never real results)",
    )
    demo_heads: Literal["trained", "random"] = MODEL.field(
        "trained", description="demo profile only: the bundled synthetic-data heads, or random ones (a baseline)"
    )
    clip_model: str = MODEL.field(
        DEFAULT_CLIP_MODEL, description="open_clip model name; the default builds GELU, as the released FiLo code does "
        "with the OpenAI weights (ViT-L-14-336-quickgelu is the other activation)",
    )
    clip_weights: str = MODEL.field(DEFAULT_CLIP_WEIGHTS, description="open_clip pretrained tag or local state-dict file")
    image_size: int = MODEL.field(DEFAULT_IMAGE_SIZE, description="model input size (the position grid is resized to it)")
    checkpoint: str | None = MODEL.field(None, description="FiLo checkpoint: official .pth or our .safetensors")
    tap_layout: Literal["released", "paper"] | None = MODEL.field(
        None, description="override the checkpoint's tap layout (default: what the checkpoint says)"
    )
    allow_activation_mismatch: bool = MODEL.field(
        False, description="accept a checkpoint trained with the other MLP activation than the backbone's"
    )
    grounding: bool = MODEL.field(True, description="run Grounding DINO for position and box suppression")
    grounding_model: str = MODEL.field(
        DEFAULT_GROUNDING_MODEL, description="Grounding DINO: Hugging Face hub id or local directory"
    )
    descriptions: list[Path] = MODEL.field(
        default_factory=list, description="extra category description files (JSON), on top of the bundled ones"
    )
    cache_dir: Path | None = MODEL.field(
        None, description="where open_clip and Hugging Face weights are cached (default: the Hugging Face cache)"
    )
    hub_offline: bool = MODEL.field(
        False, validation_alias=AliasChoices("FILO_HUB_OFFLINE", "HF_HUB_OFFLINE"),
        description="load Hugging Face models (Grounding DINO, a conversion's base) from local files only, never "
        "the hub; read from FILO_HUB_OFFLINE, else Hugging Face's own HF_HUB_OFFLINE (1/on/yes/true, as it reads it)",
    )

    device: str = DEVICE.field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Literal["fp32", "bf16"] = DEVICE.field(
        "fp32", description="bf16 autocast for the frozen backbones on GPU"
    )
    compile: bool = DEVICE.field(
        False, description="torch.compile the image encoder (the first batch of each new size compiles: tens of "
        "seconds on a GPU); equal to the eager path within float rounding",
    )
    cuda_graphs: bool = DEVICE.field(
        False, description="CUDA: compile the image encoder with CUDA graphs (torch.compile mode 'reduce-overhead') "
        "on batches padded to power-of-two sizes up to max_batch_size, all recorded at warm-up; implies compile",
    )
    pin_memory: bool = DEVICE.field(
        True, description="CUDA: stage model inputs in pinned host memory, copy without blocking"
    )
    gpu_image_path: bool = DEVICE.field(
        False, description="CUDA worker: decode JPEGs with nvJPEG and resize and render heatmaps on the GPU; PNG and "
        "whatever nvJPEG refuses take the CPU path (deviation from the CPU preprocessing: docs/gpu.md)",
    )
    compile_grounding: bool = DEVICE.field(
        False, description="torch.compile Grounding DINO as a whole (the first batch of each new image size and batch "
        "size compiles); equal to the eager detector within float rounding (its graph breaks: docs/gpu.md)",
    )
    grounding_deformable_attention: Literal["auto", "triton", "hub", "pytorch"] = DEVICE.field(
        "auto", description="Grounding DINO's multi-scale deformable attention, chosen for the device the model runs "
        "on: 'auto' is the project's Triton kernel on CUDA and the PyTorch path on the CPU; 'hub' the Hugging Face "
        "Hub's kernel (needs the Hub or its cache; shown as pytorch where it could not load). What runs is logged "
        "at start and shown in /readyz and filo_engine_info",
    )
    allow_pytorch_deformable_attention: bool = DEVICE.field(
        False, description="production profile on CUDA: start even though Grounding DINO's deformable attention "
        "runs the PyTorch path (several times slower; warned at start and in /readyz); without it such a start fails",
    )
    grounding_text_cache: bool = DEVICE.field(
        False, description="keep Grounding DINO's BERT text pass per caption (a few captions, least recently used "
        "out) instead of running it for every batch; bit-identical to the plain model on the CPU (docs/gpu.md)",
    )

    host: str = HTTP.field("127.0.0.1", description="address `filo serve` listens on")
    port: int = HTTP.field(8000, description="port `filo serve` listens on")
    request_timeout_s: float = HTTP.field(
        30.0, gt=0, description="deadline of one inspection from its arrival; past it the answer is 504"
    )
    max_body_bytes: int = HTTP.field(
        20 * 1024 * 1024, ge=1024, description="largest request body; a longer one is answered 413 while it streams in"
    )
    max_header_bytes: int = HTTP.field(
        64 * 1024, ge=1024, description="request line and headers together; a longer head is answered 431 "
        "headers_too_large (filo serve reads at most this plus one socket read of it)",
    )
    max_image_pixels: int = HTTP.field(
        40_000_000, ge=1024, description="most pixels an image may have, checked from its header before decoding "
        "(422 decompression_bomb)",
    )
    cors_origins: list[str] = HTTP.field(
        default_factory=list, description="origins a browser may call the API from (CORS); none by default"
    )
    api_docs: bool = HTTP.field(
        True, description="serve the OpenAPI description and its pages (/openapi.json, /docs, /redoc); false hides "
        "them in production (the console does not need them)",
    )
    metrics_port: int | None = HTTP.field(
        None, ge=1, le=65535, description="`filo serve`: serve /metrics on this port (a second listener on `host`) "
        "and not on the API's port, so an ingress publishing the API never shows it; unset: /metrics on `port`",
    )

    api_keys: list[str] = KEYS.field(
        default_factory=list, description="camera keys: inspect, and read the category catalog (not the records); "
        "'name:secret' records the name, a bare key is recorded by a short hash",
    )
    reader_keys: list[str] = KEYS.field(
        default_factory=list, description="reader keys (QA dashboards): read records, kept images, review and "
        "threshold history, stats and exports, and the catalog; they neither inspect nor judge; 'name:secret' names "
        "the key (the name key_limits uses)",
    )
    reviewer_keys: list[str] = KEYS.field(
        default_factory=list, description="keys that may judge inspection records (and inspect and read); "
        "'name:secret' records the name, a bare key is recorded by a short hash",
    )
    admin_key: str | None = KEYS.field(None, description="the key that may also write categories and thresholds")
    key_limits: dict[str, KeyLimit] = KEYS.field(
        default_factory=dict, description="limits by key name: '{\"supplier-a\": {\"categories\": [\"bottle\"], "
        "\"sources\": [\"supplier-a/line-1\"]}}' lets the camera, reader or reviewer keys named supplier-a reach "
        "those categories' and sources' records and inspections only; every name must be a configured key's name "
        "and the admin key cannot be limited (checked at start)",
    )
    metrics_key: str | None = KEYS.field(
        None, description="a bearer key Prometheus presents for /metrics; unset: /metrics is open (for scraping)"
    )
    allow_open: bool = KEYS.field(False, description="production only: run without API keys on purpose")

    redis_url: str | None = QUEUE.field(
        None, description="Redis that API pods and workers meet through (queue mode); unset: embedded mode, the "
        "model in the API process"
    )
    stream: str = QUEUE.field("filo:requests", description="queue mode: the Redis stream requests travel through")
    consumer_group: str = QUEUE.field(
        "filo-workers", description="queue mode: the workers' consumer group on the request stream"
    )
    max_batch_size: int = QUEUE.field(8, ge=1, le=256, description="most images one model batch holds")
    max_wait_ms: int = QUEUE.field(
        10, ge=0, le=10_000, description="how long a batch waits for more requests after its first"
    )
    queue_max_depth: int = QUEUE.field(
        1000, ge=1, description="requests that may wait for the model; past it a request is answered 429"
    )
    reject_without_workers: bool = QUEUE.field(
        True, description="queue mode: answer 503 at once when no worker heartbeat is live instead of queueing "
        "until the deadline (504); set false when workers scale from zero on queue lag (KEDA minReplicaCount 0)",
    )
    category_apply_timeout_s: float = QUEUE.field(
        10.0, ge=0, description="queue mode: how long a category PUT waits for live workers to build its caches"
    )
    category_lock_s: float = QUEUE.field(
        120.0, gt=0, description="queue mode: how long one change of a category's references or threshold may hold "
        "its lock (a dead holder's lock lapses after this; a change waiting longer is refused with 409)",
    )
    job_claim_s: float = QUEUE.field(
        60.0, gt=0, description="queue mode: a background job (learn) whose API pod has not reported on it for this "
        "long is lost (its pod died) and its category free for a new one",
    )
    claim_idle_ms: int = QUEUE.field(
        15_000, ge=100, description="queue mode: pending requests idle this long are reclaimed, whoever holds them "
        "(the backstop: a dead worker's requests are taken over as soon as its heartbeat lapses)",
    )
    max_deliveries: int = QUEUE.field(
        3, ge=1, description="queue mode: a request delivered more often than this is failed as poison (500)"
    )
    heartbeat_interval_ms: int = QUEUE.field(
        1000, ge=50, description="queue mode: how often a worker writes its heartbeat (from a task of its own, so a "
        "long batch does not silence it); also how long a request must have been left alone before another worker "
        "may take it over from a worker whose heartbeat lapsed",
    )
    heartbeat_ttl_ms: int = QUEUE.field(
        3000, ge=100, description="queue mode: a worker whose last heartbeat is older than this is dead: API pods stop "
        "counting it (/readyz, filo_workers, the 503 no_workers check) and the other workers take over its pending "
        "requests at once and remove it from the consumer group. At least twice heartbeat_interval_ms; give API "
        "pods and workers the same value",
    )
    worker_metrics_host: str = QUEUE.field(
        "0.0.0.0", description="worker health/metrics bind address (all interfaces: probes and Prometheus reach it)"
    )
    worker_metrics_port: int = QUEUE.field(
        9100, ge=0, le=65535, description="worker /healthz /readyz /metrics port"
    )

    thresholds: dict[str, float] = ANSWERS.field(
        default_factory=dict, description="per-category score thresholds, for categories without a calibrated or manual "
        "one"
    )
    default_threshold: float = ANSWERS.field(
        0.5, description="score threshold of a category with none of its own"
    )
    top_k: int = ANSWERS.field(5, ge=1, le=100, description="how many anomaly types an answer lists")

    reference_max_images: int = REFERENCES.field(
        64, ge=1, description="most normal reference images a category may hold"
    )
    reference_max_patches: int = REFERENCES.field(
        16384, ge=64, description="per category and tap: patch memory rows kept (greedy coreset past it)"
    )
    reference_memory_mb: float = REFERENCES.field(
        4096.0, gt=0, description="all categories' patch memories on the device together (least recently used out)"
    )
    reference_match: Literal["position", "global"] = REFERENCES.field(
        DEFAULT_MATCH, description="patch matching: within reference_radius of the same position, or anywhere"
    )
    reference_radius: float = REFERENCES.field(
        DEFAULT_RADIUS, gt=0, le=2, description="position match window, fraction of the grid side"
    )
    reference_weight: float = REFERENCES.field(
        DEFAULT_WEIGHT, ge=0, le=1, description="few-shot share of the fused map and score"
    )

    state_dir: Path | None = STATE.field(
        None, description="without Redis: where categories and prompt caches persist (default ~/.cache/filo-inspect)"
    )
    catalog_sync_s: float = STATE.field(
        2.0, gt=0, description="queue mode: how often each API pod compares the Redis catalog with its durable "
        "copy in the records database (and heals Redis)",
    )

    records: bool = RECORDS.field(
        True, description="keep a record of every inspection (a request may say record=false)"
    )
    records_url: str | None = RECORDS.field(
        None, description="SQLAlchemy URL of the records database (postgresql+psycopg://... in production); "
        "default: a SQLite file records.db under state_dir",
    )
    records_keep: Literal["ng", "all", "none"] = RECORDS.field(
        "ng", description="which results keep their uploaded image and heatmap: NG ones, all, or none",
    )
    records_ok_sample: float = RECORDS.field(
        0.01, ge=0, le=1, description="fraction of OK results whose artefacts are kept too (with records_keep=ng)"
    )
    records_retention_days: float = RECORDS.field(
        90.0, gt=0, description="records and artefacts older than this are purged"
    )
    records_purge_interval_s: float = RECORDS.field(3600.0, gt=0, description="how often the purge runs by itself")
    records_batch: int = RECORDS.field(
        200, ge=1, le=10_000, description="records written per database transaction"
    )
    records_buffer_max: int = RECORDS.field(
        20_000, ge=1, description="records this process holds while its hand-off target is down; past it the "
        "oldest are dropped (counted in filo_records_failed_total{reason=dropped})",
    )
    records_stream: str = RECORDS.field(
        "filo:records", description="queue mode: the Redis stream records travel through"
    )
    records_stream_max: int = RECORDS.field(
        50_000, ge=100, description="queue mode: records waiting in the stream past which they travel without "
        "artefacts; past 4x this none are appended (they wait in the API's buffer), so Redis keeps its memory",
    )
    records_group: str = RECORDS.field(
        "filo-recorders", description="queue mode: consumer group of the record writers"
    )
    records_claim_idle_ms: int = RECORDS.field(
        30_000, ge=100, description="queue mode: records pending this long at another writer (a dead pod) are taken over"
    )

    llm_base_url: str = LLM.field(
        "http://127.0.0.1:11434/v1", description="base URL of the chat-completions API (the default: a local Ollama)"
    )
    llm_model: str = LLM.field("gpt-4o-mini", description="model name sent with each request")
    llm_api_key: str | None = LLM.field(None, description="bearer key for the endpoint, if it needs one")
    llm_timeout_s: float = LLM.field(60.0, gt=0, description="timeout of one chat-completions call")

    @field_validator("image_size")
    @classmethod
    def _image_size_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("image_size must be positive")
        return v

    @field_validator("hub_offline", mode="before")
    @classmethod
    def _flag_as_hugging_face_reads_it(cls, v: object) -> object:
        """HF_HUB_OFFLINE is Hugging Face's variable: read it by their rule (anything else, empty included, is
        off) rather than refuse a value their libraries accept."""
        return v.strip().upper() in {"1", "ON", "YES", "TRUE"} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _heartbeat_outlives_a_late_beat(self) -> FiloSettings:
        if self.heartbeat_ttl_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError(f"heartbeat_ttl_ms ({self.heartbeat_ttl_ms}) must be at least twice heartbeat_interval_ms "
                             f"({self.heartbeat_interval_ms}): one late beat must not declare a worker dead")
        return self

    @model_validator(mode="after")
    def _metrics_port_is_its_own(self) -> FiloSettings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port ({self.metrics_port}) must differ from port: leave it unset to serve "
                             "/metrics on the API's port")
        return self

    @property
    def is_demo(self) -> bool:
        return self.profile == "demo"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
