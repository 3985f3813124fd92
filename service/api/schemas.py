"""Every pydantic schema of the HTTP API, in one place (requests, responses, errors)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.imaging import DEFAULT_HEATMAP_FORMAT, DEFAULT_HEATMAP_SIZE
from service.records.model import PART_ID_PATTERN, REQUEST_ID_PATTERN, SOURCE_PATTERN

HeatmapMode = Literal["jpeg", "png", "map", "none"]
MAX_HEATMAP_SIDE = 8192
IMAGE_RULES = ("any format Pillow decodes (PNG, JPEG, BMP, TIFF, WebP, ...), at least 2x2 pixels and at most "
               "`max_image_pixels` pixels (default 40 MP), within `max_body_bytes`")
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Strict base64 (the standard alphabet, padded, no whitespace): what `b64decode(validate=True)` accepts."""

# What the catalog (descriptions.Category) accepts of a noun and a description, as JSON-schema patterns:
# printable characters without leading or trailing space (a description: no '.', which is Grounding DINO's
# caption separator; its surrounding spaces are trimmed). The server takes any printable Unicode; the
# patterns name printable Latin (ASCII, Latin-1, Latin Extended-A/B), a subset a client can rely on.
_TEXT_CHAR = "!-~\u00a1-\u00ac\u00ae-\u024f"
_DESCRIPTION_CHAR = "!-\\-/-~\u00a1-\u00ac\u00ae-\u024f"  # _TEXT_CHAR without '.'
NOUN_PATTERN = f"^[{_TEXT_CHAR}](?:[ {_TEXT_CHAR}]*[{_TEXT_CHAR}])?$"
DESCRIPTION_PATTERN = f"^ *[{_DESCRIPTION_CHAR}][ {_DESCRIPTION_CHAR}]*$"


class InspectParams(BaseModel):
    """The parameters of one inspection, whichever body (multipart or JSON) carried them."""

    model_config = ConfigDict(extra="forbid")

    category: str = Field(..., min_length=1, description="registered category (see GET /v1/categories)")
    top_k: int | None = Field(None, ge=1, le=100, description="how many anomaly types to return")
    grounding: bool | None = Field(None, description="run Grounding DINO (default: the server's setting)")
    heatmap: HeatmapMode = Field(
        DEFAULT_HEATMAP_FORMAT,
        description="'jpeg' or 'png': the colour overlay blended on the image (valid boxes drawn); 'map': the raw "
        "anomaly map as an 8-bit grayscale PNG (v/255 within 1/510 of the map value), for clients that colour it "
        "themselves; 'none': no heatmap",
    )
    heatmap_size: Literal["original", "frame"] | Annotated[int, Field(ge=16, le=MAX_HEATMAP_SIDE)] = Field(
        DEFAULT_HEATMAP_SIZE,
        description="'original' (the image's size), 'frame' (the model's square input frame) or the largest "
        f"long side in pixels (never enlarged; 16..{MAX_HEATMAP_SIDE})",
    )
    source: str | None = Field(
        None, pattern=SOURCE_PATTERN, description="where the image comes from (a line or camera name), kept with "
        "the inspection record: up to 64 letters, digits and -_.:/",
    )
    record: bool = Field(True, description="keep a record of this inspection (GET /v1/inspections)")
    part_id: str | None = Field(
        None, pattern=PART_ID_PATTERN, description="the line's id of the inspected part (a PLC serial, a file "
        "stem), kept with the record and a filter of GET /v1/inspections: up to 64 letters, digits and -_.:/",
    )
    request_id: str | None = Field(
        None, pattern=REQUEST_ID_PATTERN, description="a client-chosen id for this inspection (default: the server "
        "draws one). The service keeps one record per id, so a client that retries after a crash or a lost answer "
        "with the same id never makes a second record; up to 64 letters, digits, '-' and '_'",
    )
    deadline_ms: int | None = Field(
        None, ge=1, le=600_000, description="how long the client will wait, in ms from when the request arrives: "
        "a request not started by then is answered 504 deadline_exceeded instead of being run (default and cap: "
        "the server's request_timeout_s)",
    )

    @field_validator("heatmap_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        elif isinstance(v, str) and v not in ("original", "frame"):
            raise ValueError(f"heatmap_size must be 'original', 'frame' or an integer in 16..{MAX_HEATMAP_SIDE}")
        if isinstance(v, int) and not isinstance(v, bool) and not 16 <= v <= MAX_HEATMAP_SIDE:
            raise ValueError(f"heatmap_size must be 'original', 'frame' or an integer in 16..{MAX_HEATMAP_SIDE}")
        return v


class InspectJSON(InspectParams):
    """JSON body of POST /v1/inspect."""

    image_base64: str = Field(
        ..., min_length=1, description=f"the image file, base64-encoded (strict: padded, no whitespace); {IMAGE_RULES}",
        json_schema_extra={"pattern": BASE64_PATTERN, "contentEncoding": "base64"},  # checked by decoding it
    )


class BoxOut(BaseModel):
    x1: float = Field(..., description="left, original image pixels")
    y1: float
    x2: float
    y2: float
    phrase: str
    confidence: float
    valid: bool = Field(..., description="the phrase names an anomaly; only valid boxes steer the result")


class AnomalyTypeOut(BaseModel):
    description: str
    similarity: float


class ModelInfoOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    tap_layout: str | None = None
    standin: bool = Field(False, description="true when the service runs stand-in weights (seeded random values in "
                          "the real shapes, for measuring the production path): the result is not an inspection")


class TimingOut(BaseModel):
    queue_wait: float = Field(..., description="ms from accepted to its batch starting")
    model: float = Field(..., description="ms the engine batch holding this request took")
    total: float = Field(..., description="ms from the request arriving to the answer")


class HeatmapOut(BaseModel):
    media_type: Literal["image/jpeg", "image/png"]
    width: int
    height: int
    kind: Literal["overlay", "map"] = Field(..., description="overlay: blended on the image; map: 8-bit raw map")
    base64: str


ThresholdSource = Literal["default", "references", "labelled", "learned", "manual"]


class InspectResponse(BaseModel):
    request_id: str
    category: str
    part_id: str | None = Field(None, description="the request's part_id, as given")
    score: float = Field(..., description="image anomaly score")
    is_anomalous: bool = Field(..., description="score >= threshold")
    needs_review: bool = Field(
        False, description="the score lies within the category's review margin of the threshold: the result "
        "waits in the review queue for a person's judgement")
    threshold: float
    threshold_source: ThresholdSource = Field(
        "default", description="where the threshold comes from: the configured default, the category's normal "
        "references, a calibration on labelled images (docs/few-shot.md), one learned from reviewed records, or "
        "set by hand")
    references: int = Field(0, description="normal reference images used for this image (0: zero-shot)")
    position: str | None = Field(None, description="one of the nine positions; null: all nine averaged")
    boxes: list[BoxOut]
    top_types: list[AnomalyTypeOut]
    heatmap: HeatmapOut | None = Field(None, description="the heatmap asked for with `heatmap`; null for 'none'")
    heatmap_png: str | None = Field(
        None, deprecated=True,
        description="deprecated (use `heatmap`): the same base64 PNG overlay, filled only when heatmap=png",
    )
    model: ModelInfoOut
    timing_ms: TimingOut


class CategoryIn(BaseModel):
    """PUT /v1/categories/{name}: register (or replace) a category, or ask an LLM for a draft.

    Registering needs one or more descriptions; `generate: true` needs none (they are ignored)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["descriptions"], "properties": {"descriptions": {"minItems": 1}}},
        {"required": ["generate"], "properties": {"generate": {"const": True}}},
    ]})

    noun: str | None = Field(
        None, min_length=1, max_length=100, description="the word used in the prompts (default: name); printable, "
        "no leading or trailing space", json_schema_extra={"pattern": NOUN_PATTERN},
    )
    descriptions: list[Annotated[str, Field(max_length=200, json_schema_extra={"pattern": DESCRIPTION_PATTERN})]] = (
        Field(default_factory=list, max_length=64, description="fine-grained anomaly descriptions: 1 to 64 (unless "
              "`generate`), each printable, at most 200 characters, not blank, without '.'"))
    generate: bool = Field(False, description="ask the configured LLM for descriptions; returns a draft")
    count: int = Field(10, ge=1, le=50, description="with generate: how many descriptions to ask for")

    @field_validator("descriptions")
    @classmethod
    def _clean(cls, v: list[str]) -> list[str]:
        cleaned = [d.strip() for d in v]
        if any(not d for d in cleaned):
            raise ValueError("descriptions must not be empty strings")
        return cleaned


class CategoryOut(BaseModel):
    name: str
    noun: str
    descriptions: list[str]
    status: Literal["active", "draft"] = "active"
    draft_path: str | None = Field(None, description="draft file a person reviews before registering")
    workers_ready: int | None = Field(
        None, description="queue mode, after PUT: live workers that had built the category's caches when it answered"
    )
    workers_live: int | None = Field(None, description="queue mode, after PUT: live workers at that moment")


class CategoryDetailOut(CategoryOut):
    """GET /v1/categories/{name}: the category with its decision threshold and references (docs/few-shot.md)."""

    threshold: float = Field(..., description="the category's decision threshold: the one its next inspection "
                             "applies")
    threshold_source: ThresholdSource
    review_margin: float = Field(0.0, description="results within this of the threshold are answered needs_review "
                                 "(0: never)")
    references: int = Field(..., description="normal reference images the category holds")


class CategoryList(BaseModel):
    categories: list[CategoryOut]


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    ready: bool
    mode: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "the body cannot be parsed (malformed multipart, a JSON body that is not UTF-8)",
        401: "missing or wrong API key",
        403: "the key's role may not do this (forbidden), or it is outside the key's limits (outside_key_limits)",
        404: "unknown category (lists the known ones)",
        413: "body or image too large",
        415: "unsupported media type or not an image",
        422: "bad parameters, truncated image or decompression bomb",
        429: "queue full (see Retry-After)",
        431: "request line and headers over `max_header_bytes` (64 KiB)",
        500: "the model failed on this request",
        503: "not ready or queue unreachable",
        504: "deadline exceeded",
    }.items()
}


# --- the records API: inspection records, reviews, counts, the threshold's history, learning -------------------


class ReviewOut(BaseModel):
    label: Literal["defect", "good"]
    defect_type: str | None = Field(None, description="what the defect is, as the reviewer typed it")
    note: str | None = None
    reviewer: str = Field(..., description="the name of the key that judged it")
    reviewed_at: str = Field(..., description="ISO-8601, UTC")


class InspectionRecordOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(..., description="the inspection's request id")
    created_at: str = Field(..., description="ISO-8601, UTC")
    category: str
    source: str | None = Field(None, description="the request's `source` (a line or camera)")
    part_id: str | None = Field(None, description="the request's `part_id` (the line's id of the part)")
    key_name: str | None = Field(None, description="the name of the API key that made the inspection")
    score: float
    is_anomalous: bool
    needs_review: bool
    threshold: float
    threshold_source: ThresholdSource
    references: int
    position: str | None
    boxes: list[BoxOut]
    top_types: list[AnomalyTypeOut]
    model_version: str
    timing_ms: dict[str, float]
    has_image: bool = Field(..., description="the uploaded image was kept (GET .../image)")
    has_heatmap: bool = Field(..., description="a heatmap was kept (GET .../heatmap)")
    heatmap_kind: Literal["overlay", "map"] | None = Field(None, description="which picture the kept heatmap is")
    review: ReviewOut | None = Field(None, description="the current judgement; null: not reviewed")


class InspectionPageOut(BaseModel):
    items: list[InspectionRecordOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null: the last page")


class ReviewHistoryOut(BaseModel):
    items: list[ReviewOut] = Field(..., description="every judgement, oldest first")


class StatsRowOut(BaseModel):
    bucket_start: str = Field(..., description="ISO-8601, UTC: the hour or day this row counts")
    category: str
    inspected: int
    ng: int
    reviewed: int
    confirmed_defects: int = Field(..., description="NG judged defect")
    false_alarms: int = Field(..., description="NG judged good")
    misses: int = Field(..., description="OK judged defect")


class StatsOut(BaseModel):
    bucket: Literal["hour", "day"]
    items: list[StatsRowOut]


class ThresholdNowOut(BaseModel):
    threshold: float = Field(..., description="the threshold the category's next inspection applies")
    source: ThresholdSource
    review_margin: float


class ThresholdChangeOut(BaseModel):
    at: str = Field(..., description="ISO-8601, UTC")
    actor: str = Field(..., description="the key (or `cli:<user>`) that made the change")
    source: Literal["manual", "calibrated", "learned", "references", "removed", "review_margin"] = Field(
        ..., description="what changed it")
    threshold: float | None = Field(None, description="the value after the change")
    previous: float | None = Field(None, description="the value before it")
    detail: dict[str, Any]


class ThresholdsOut(BaseModel):
    category: str
    current: ThresholdNowOut
    history: list[ThresholdChangeOut] = Field(..., description="newest first")


class LearnedThresholdOut(BaseModel):
    before: float
    after: float
    source: Literal["learned"]
    f1: float
    how: str = Field(..., description="which scores the cut was set on")
    n_good: int
    n_defective: int


class LearnOut(BaseModel):
    category: str
    dry_run: bool
    reviewed: int = Field(..., description="the category's judged records")
    references_added: int = Field(..., description="false alarms (NG judged good) with their image kept, added")
    references: int = Field(..., description="the references the category holds after learning")
    threshold: LearnedThresholdOut | None = Field(None, description="null: left as it was (see notes)")
    suggested_descriptions: list[str] = Field(..., description="defect types reviewers typed that the category "
                                              "lacks; not added")
    notes: list[str]


class JobErrorOut(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    """A background job (learning from reviews): where it stands, and its result or error once finished."""

    id: str
    kind: Literal["learn"]
    category: str
    actor: str = Field(..., description="the key that started it")
    state: Literal["running", "succeeded", "failed", "lost"] = Field(
        ..., description="lost: the process running it stopped before it finished")
    stage: str = Field(..., description="what it is doing now")
    done: int = Field(..., description="steps of the stage done")
    total: int = Field(..., description="steps of the stage (0: not counted)")
    result: LearnOut | None = Field(None, description="once succeeded: what learning did")
    error: JobErrorOut | None = None
    created_at: str = Field(..., description="ISO-8601, UTC")
    updated_at: str = Field(..., description="ISO-8601, UTC")
