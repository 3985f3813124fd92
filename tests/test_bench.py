"""`filo bench`: the rows it reports and the FLOP accounting (figures come from running it, not from here)."""

from __future__ import annotations

import pytest

from filo_lab.bench.model import build_random_engine, flops_per_image, run_bench
from service.cli import main


@pytest.fixture(scope="module")
def tiny_engine():
    return build_random_engine("tiny", "cpu", grounding=True)


def test_flops_by_part_match_the_architecture(tiny_engine):
    off = flops_per_image(tiny_engine, grounding=False)
    on = flops_per_image(tiny_engine, grounding=True)
    heads = tiny_engine.model.heads
    width, embed = heads.decoder_cov.fc_77[0].in_channels, heads.decoder_cov.fc_77[0].out_channels
    grid = (tiny_engine.image_size // 14) ** 2
    mmci = 3 * 2 * grid * 7 * 7 * width * embed / 1e9  # three fused 7x7 convolutions over the patch grid
    assert off["MMCI convolutions"] == pytest.approx(mmci, rel=1e-6)
    assert off["Grounding DINO"] == 0 and on["Grounding DINO"] > 0
    for parts in (off, on):
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], rel=1e-9)
    # with a position found, only that position's abnormal sentences are encoded
    assert on["text encoder, maps, rest"] < off["text encoder, maps, rest"]


def test_run_bench_reports_every_combination():
    rows = list(run_bench("tiny", "cpu", [1, 2], ["fp32"], [False], iters=1, warmup=0))
    assert [(r.batch_size, r.precision, r.grounding) for r in rows] == [(1, "fp32", False), (2, "fp32", False)]
    assert all(r.images_per_s > 0 and r.ms_per_batch > 0 and r.peak_gib is None for r in rows)  # CPU: no peak
    assert rows[1].images_per_s == pytest.approx(2000 / rows[1].ms_per_batch)


def test_bench_command_prints_the_tables(capsys):
    assert main(["bench", "--arch", "tiny", "--device", "cpu", "--batch-sizes", "1", "--precisions", "fp32",
                 "--grounding", "off", "--iters", "1", "--warmup", "0", "--flops"]) == 0
    out = capsys.readouterr().out
    assert "| cpu | fp32 | off | 1 |" in out and "| peak GiB |" in out
    assert "| MMCI convolutions |" in out and "| total |" in out


@pytest.mark.redis
def test_service_bench_measures_the_path_around_the_model(capsys):
    """`filo bench --service` on a 1.5 MP photo-like JPEG: every figure present, and the default heatmap within
    the issue's targets (API CPU at most 2x one decode, response under 400 KB), measured in this one run."""
    assert main(["bench", "--service", "--sizes", "1.5MP", "--formats", "JPEG", "--heatmaps", "default,none",
                 "--requests", "10"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 1.5MP")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("JPEG", "default"), ("JPEG", "none")]
    default, none = ({"api_ratio": float(r[6].strip().rstrip("x")), "worker_ms": float(r[7]),
                      "response_kb": float(r[9])} for r in rows)
    assert default["api_ratio"] <= 2.0 and default["response_kb"] < 400
    assert default["worker_ms"] > 0 and none["worker_ms"] > 0  # the worker reports its non-model stages
    assert none["response_kb"] < 5


def test_host_work_after_the_detector_is_timed_on_the_engine_path():
    """The bench times the engine's own function over every kept query, with an empty and a warm memo."""
    import torch

    from filo_lab.bench.grounding_post import DESCRIPTIONS, synthetic_outputs, time_whole_post_processing
    from models.grounding.detector import GroundingDetector, load_tiny_tokenizer
    from models.grounding.hqloc import build_caption

    tokenizer = load_tiny_tokenizer()
    ids = tokenizer(build_caption(DESCRIPTIONS))["input_ids"]
    probs, boxes = synthetic_outputs(ids, queries=40, kept=30, patterns=5)
    detector = GroundingDetector(torch.nn.Module(), None, tokenizer)
    r = time_whole_post_processing(detector, probs, boxes, ids, repeat=2)
    assert r["boxes"] == 30
    assert r["warm_ms"] > 0 and r["cold_ms"] > 0
