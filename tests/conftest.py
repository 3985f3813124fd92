"""Shared fixtures: tiny models of FiLo's real architecture, built once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def needs(condition: object, reason: str) -> None:
    """Skip a test whose requirement is missing on a development machine; fail it under CI (CI=true),
    where everything the suite needs is installed by scripts/test.sh, so that nothing skips silently."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_clip():
    from models.clip_backbone import TINY_CLIP_MODEL, BackboneSpec, create_clip

    return create_clip(BackboneSpec(TINY_CLIP_MODEL, None, 518), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from models.clip_backbone import TINY_CLIP_MODEL, get_tokenizer

    return get_tokenizer(TINY_CLIP_MODEL)


def random_heads(clip, seed: int = 1, scale: float = 1.0):
    """FiLo heads with random weights that are not PyTorch's default init (so tests see real mixing)."""
    from models.heads import FiLoHeads

    torch.manual_seed(seed)
    heads = FiLoHeads(clip.visual.transformer.width, clip.text_projection.shape[1],
                      clip.token_embedding.weight.shape[1])
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.05 * scale)
    return heads.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_clip, tiny_tokenizer):
    from models.filo import FiLoModel

    return FiLoModel(tiny_clip, tiny_tokenizer, random_heads(tiny_clip), 518, "released").eval()


def synthetic_image(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """A textured image with a dark blob: enough structure for every stage to do real work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 40 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    img = np.stack([base, base * 0.9, base * 1.1], axis=-1) + rng.normal(0, 6, (h, w, 3))
    cy, cx = int(h * 0.3), int(w * 0.7)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) // 10) ** 2] = (30, 20, 25)
    return np.clip(img, 0, 255).astype(np.uint8)


# --- the records database: a PostgreSQL server per module, an empty store on each backend ----------------------


@pytest.fixture(scope="module")
def module_postgres():
    """One PostgreSQL server for a whole test module (tests that only read and write need none of their own)."""
    from tests.postgres_server import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """An empty, migrated records store, once on SQLite and once on PostgreSQL (the module's server)."""
    from service.records.db import migrate, open_engine
    from service.records.schema import metadata
    from service.records.store import RecordStore

    url = (f"sqlite:///{tmp_path / 'records.db'}" if request.param == "sqlite"
           else request.getfixturevalue("module_postgres").url)
    engine = open_engine(url)
    migrate(engine)
    with engine.begin() as conn:  # a module's server is shared: each test starts empty
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    yield RecordStore(engine)
    engine.dispose()
