"""The one configuration object of FiLo Inspect.

Every process (CLI, API, worker) reads its configuration from `FiloSettings`: environment
variables prefixed `FILO_` (lists and dicts as JSON), overridden by command-line flags. Keeping
it in one place is what lets ops reason about a pod from its environment alone. Every default is here;
the values FiLo itself defines (its backbone, detector and few-shot matching) come from
`models/constants.py` (no torch), so none is written twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
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


class FiloSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FILO_", extra="ignore")

    # --- which model -------------------------------------------------------------------------
    profile: Profile = Field(
        "production",
        description="'production' loads real weights and fails loudly when they are missing; "
        "'demo' builds the tiny randomly initialised models from models/configs (never real results).",
    )
    demo_heads: Literal["trained", "random"] = Field(
        "trained", description="demo profile only: the bundled synthetic-data heads, or random ones (a baseline)"
    )
    clip_model: str = Field(
        DEFAULT_CLIP_MODEL, description="open_clip model name; the default builds GELU, as the released FiLo code does "
        "with the OpenAI weights (ViT-L-14-336-quickgelu is the other activation)",
    )
    clip_weights: str = Field(DEFAULT_CLIP_WEIGHTS, description="open_clip pretrained tag or local state-dict file")
    image_size: int = Field(DEFAULT_IMAGE_SIZE, description="model input size (the position grid is resized to it)")
    checkpoint: str | None = Field(None, description="FiLo checkpoint: official .pth or our .safetensors")
    tap_layout: Literal["released", "paper"] | None = Field(
        None, description="override the checkpoint's tap layout (default: what the checkpoint says)"
    )
    allow_activation_mismatch: bool = Field(
        False, description="accept a checkpoint trained with the other MLP activation than the backbone's"
    )
    grounding: bool = Field(True, description="run Grounding DINO for position and box suppression")
    grounding_model: str = Field(
        DEFAULT_GROUNDING_MODEL, description="Hugging Face hub id or local directory"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast for the frozen backbones on GPU")
    # --- GPU speed options (each tested against the plain path; README "GPU path") ---------------
    compile: bool = Field(
        False, description="torch.compile the image encoder (the first batch of each new size compiles: tens of "
        "seconds on a GPU); equal to the eager path within float rounding",
    )
    cuda_graphs: bool = Field(
        False, description="CUDA: compile the image encoder with CUDA graphs (torch.compile mode 'reduce-overhead') "
        "on batches padded to power-of-two sizes up to max_batch_size, all recorded at warm-up; implies compile",
    )
    pin_memory: bool = Field(True, description="CUDA: stage model inputs in pinned host memory, copy without blocking")
    gpu_image_path: bool = Field(
        False, description="CUDA worker: decode JPEGs with nvJPEG and resize and render heatmaps on the GPU; PNG and "
        "whatever nvJPEG refuses take the CPU path (deviation from the CPU preprocessing: README 'GPU path')",
    )
    grounding_text_cache: bool = Field(
        False, description="keep Grounding DINO's BERT text pass per caption (a few captions, least recently used "
        "out) instead of running it for every batch; bit-identical to the plain model on the CPU (README 'GPU path')",
    )
    descriptions: list[Path] = Field(
        default_factory=list, description="extra category description files (JSON), on top of the bundled ones"
    )
    cache_dir: Path | None = Field(None, description="where open_clip/HF weights are cached (default: HF cache)")

    # --- service (see service/ for how each is used) ------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = Field(None, description="Redis for API<->worker batching; None = embedded mode")
    stream: str = "filo:requests"
    consumer_group: str = "filo-workers"
    max_batch_size: int = Field(8, ge=1, le=256)
    max_wait_ms: int = Field(10, ge=0, le=10_000)
    queue_max_depth: int = Field(1000, ge=1)
    reject_without_workers: bool = Field(
        True, description="queue mode: answer 503 at once when no worker heartbeat is live instead of queueing "
        "until the deadline (504); set false when workers scale from zero on queue lag (KEDA minReplicaCount 0)",
    )
    request_timeout_s: float = Field(30.0, gt=0)
    category_apply_timeout_s: float = Field(
        10.0, ge=0, description="queue mode: how long a category PUT waits for live workers to build its caches"
    )
    category_lock_s: float = Field(
        120.0, gt=0, description="queue mode: how long one change of a category's references or threshold may hold "
        "its lock (a dead holder's lock lapses after this; a change waiting longer is refused with 409)",
    )
    claim_idle_ms: int = Field(
        15_000, ge=100, description="queue mode: pending requests idle this long are reclaimed, whoever holds them "
        "(the backstop: a dead worker's requests are taken over as soon as its heartbeat lapses)",
    )
    heartbeat_interval_ms: int = Field(
        1000, ge=50, description="queue mode: how often a worker writes its heartbeat (from a task of its own, so a "
        "long batch does not silence it); also how long a request must have been left alone before another worker "
        "may take it over from a worker whose heartbeat lapsed",
    )
    heartbeat_ttl_ms: int = Field(
        3000, ge=100, description="queue mode: a worker whose last heartbeat is older than this is dead: API pods stop "
        "counting it (/readyz, filo_workers, the 503 no_workers check) and the other workers take over its pending "
        "requests at once and remove it from the consumer group. At least twice heartbeat_interval_ms; give API "
        "pods and workers the same value",
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="request line and headers together; a longer head is answered 431 "
        "headers_too_large (filo serve reads at most this plus one socket read of it)",
    )
    max_image_pixels: int = Field(40_000_000, ge=1024)
    api_keys: list[str] = Field(default_factory=list)
    admin_key: str | None = None
    allow_open: bool = Field(False, description="production only: run without API keys on purpose")
    cors_origins: list[str] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict, description="per-category score thresholds")
    default_threshold: float = 0.5
    # --- few-shot normal references and calibrated thresholds (docs/few-shot.md) ---------------
    reference_max_images: int = Field(64, ge=1, description="most normal reference images a category may hold")
    reference_max_patches: int = Field(
        16384, ge=64, description="per category and tap: patch memory rows kept (greedy coreset past it)"
    )
    reference_memory_mb: float = Field(
        4096.0, gt=0, description="all categories' patch memories on the device together (least recently used out)"
    )
    reference_match: Literal["position", "global"] = Field(
        DEFAULT_MATCH, description="patch matching: within reference_radius of the same position, or anywhere"
    )
    reference_radius: float = Field(
        DEFAULT_RADIUS, gt=0, le=2, description="position match window, fraction of the grid side"
    )
    reference_weight: float = Field(DEFAULT_WEIGHT, ge=0, le=1, description="few-shot share of the fused map and score")
    top_k: int = Field(5, ge=1, le=100)
    llm_base_url: str = "http://127.0.0.1:11434/v1"
    llm_model: str = "gpt-4o-mini"
    llm_api_key: str | None = None
    worker_metrics_port: int = Field(9100, ge=0, le=65535, description="worker /healthz /readyz /metrics port")
    worker_metrics_host: str = Field(
        "0.0.0.0", description="worker health/metrics bind address (all interfaces: probes and Prometheus reach it)"
    )
    state_dir: Path | None = Field(
        None, description="without Redis: where categories and prompt caches persist (default ~/.cache/filo-inspect)"
    )
    # --- inspection records and the review loop (README "Inspection records") --------------------
    records: bool = Field(True, description="keep a record of every inspection (a request may say record=false)")
    records_url: str | None = Field(
        None, description="SQLAlchemy URL of the records database (postgresql+psycopg://... in production); "
        "default: a SQLite file records.db under state_dir",
    )
    records_keep: Literal["ng", "all", "none"] = Field(
        "ng", description="which results keep their uploaded image and heatmap: NG ones, all, or none",
    )
    records_ok_sample: float = Field(0.01, ge=0, le=1, description="fraction of OK results whose artefacts are "
                                     "kept too (with records_keep=ng)")
    records_retention_days: float = Field(90.0, gt=0, description="records and artefacts older than this are purged")
    records_purge_interval_s: float = Field(3600.0, gt=0, description="how often the purge runs by itself")
    records_batch: int = Field(200, ge=1, le=10_000, description="records written per database transaction")
    records_buffer_max: int = Field(
        20_000, ge=1, description="records this process holds while its hand-off target is down; past it the "
        "oldest are dropped (counted in filo_records_failed_total{reason=dropped})",
    )
    records_stream: str = Field("filo:records", description="queue mode: the Redis stream records travel through")
    records_stream_max: int = Field(
        50_000, ge=100, description="queue mode: records waiting in the stream past which they travel without "
        "artefacts; past 4x this none are appended (they wait in the API's buffer), so Redis keeps its memory",
    )
    records_group: str = Field("filo-recorders", description="queue mode: consumer group of the record writers")
    records_claim_idle_ms: int = Field(30_000, ge=100, description="queue mode: records pending this long at "
                                       "another writer (a dead pod) are taken over")
    catalog_sync_s: float = Field(2.0, gt=0, description="queue mode: how often each API pod compares the Redis "
                                  "catalog with its durable copy in the records database (and heals Redis)")
    reviewer_keys: list[str] = Field(
        default_factory=list, description="keys that may judge inspection records (and inspect and read); "
        "'name:secret' records the name, a bare key is recorded by a short hash",
    )
    max_deliveries: int = Field(3, ge=1, description="a request delivered more often than this is failed as poison")
    llm_timeout_s: float = Field(60.0, gt=0, description="timeout of one chat-completions call")

    @field_validator("image_size")
    @classmethod
    def _multiple_of_patch(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("image_size must be positive")
        return v

    @model_validator(mode="after")
    def _heartbeat_outlives_a_late_beat(self) -> FiloSettings:
        if self.heartbeat_ttl_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError(f"heartbeat_ttl_ms ({self.heartbeat_ttl_ms}) must be at least twice heartbeat_interval_ms "
                             f"({self.heartbeat_interval_ms}): one late beat must not declare a worker dead")
        return self

    @property
    def is_demo(self) -> bool:
        return self.profile == "demo"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
