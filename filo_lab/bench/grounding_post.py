"""Grounding DINO's CPU-side costs, each against the plain path it replaced, on the CPU:

1. post-processing of one image's queries: the per-query loop (one ``select_queries`` host sync, one
   decode and one ``.item()`` per kept query) against ``GroundingDetector.detections_from_batch``
   (whole-batch tensor operations, each distinct token set decoded once), on synthetic outputs shaped like
   the stand-in weights' (900 queries, 756 over the box threshold, token sets drawn from a pool so that
   queries share them) or, with ``--standin``, on the real architecture's outputs for a product-like image
   (filo_lab/data/synth.py) with each stand-in (filo_lab/standin.py): the realistic one (a handful of boxes, as
   trained weights keep) and the worst case (the random initialisation: most of the 900 queries boxed), and
   how many queries each lets over the box threshold on a few product-like images.
   "before" is the per-query loop with one decode per query and the released phrase shown ([SEP] and
   all), "plain" the same loop with the shown phrase (two decodes), "batched" the detector's;
2. the text pass cache (``FILO_GROUNDING_TEXT_CACHE``): ``forward_batch`` of the tiny test model with and
   without it, the BERT-base text backbone of the real architecture alone (one row kept vs B rows run) and,
   with ``--standin``, the real architecture's ``forward_batch`` for one image;
3. with ``--standin``, everything the engine does on the CPU with one image's detector outputs: detections,
   HQ-Loc (position, suppression mask) and the answer's boxes (``service.engine.pipeline.localise_detections``),
   with an empty phrase memo (a category's first image) and a warm one (every later image), for each stand-in.

Every pair is checked for equal results before it is timed; figures are the best of ``--repeat`` runs.

    python -m filo_lab.bench.grounding_post [--threads 1] [--repeat 20] [--standin]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from models.grounding.detector import (
    GroundingDetector,
    load_tiny_config,
    load_tiny_tokenizer,
    make_image_processor,
)
from models.grounding.hqloc import Detection, build_caption, is_valid_phrase
from models.grounding.text_cache import TextPassCache

DESCRIPTIONS = ["uneven shape ", "Unusual consistency", "crack", "broken edge", "burn mark", "bent"]


# ----- the per-query paths the detector's batched one replaces, restated to time them -------------------------


def plain_detections(detector: GroundingDetector, probs: torch.Tensor, boxes: torch.Tensor,
                     input_ids: Sequence[int], descriptions: Sequence[str], shown: bool = True) -> list[Detection]:
    """One image, query by query: a host sync for the fallback, then per kept query a posmap, a
    ``.tolist()``, two decodes (shown and released phrase) and three ``.item()``-like transfers.
    ``shown=False``: one decode, the released phrase shown as it is (the "before" column)."""
    best = probs.max(dim=1).values
    keep = (best > detector.box_threshold) & (boxes[:, 2] * boxes[:, 3] < detector.area_threshold)
    if not bool(keep.any()):
        keep = torch.zeros_like(keep)
        keep[torch.argmax(best)] = True
    drop = set(detector.tokenizer.all_special_ids) - {detector.tokenizer.unk_token_id}
    out = []
    for q in keep.nonzero(as_tuple=True)[0].tolist():
        posmap = probs[q] > detector.text_threshold
        posmap[0:1] = False
        posmap[255:] = False
        ids = [int(input_ids[i]) for i in posmap.nonzero(as_tuple=True)[0].tolist() if i < len(input_ids)]
        released = detector.tokenizer.decode(ids)
        phrase = detector.tokenizer.decode([i for i in ids if i not in drop]) if shown else released
        out.append(Detection(tuple(float(v) for v in boxes[q].tolist()), float(probs[q].max().item()), phrase,
                             is_valid_phrase(released, descriptions)))
    return out


# ----- inputs --------------------------------------------------------------------------------------------------


def synthetic_outputs(input_ids: Sequence[int], queries: int = 900, kept: int = 756, patterns: int = 60,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, 256) probabilities and (queries, 4) boxes: ``kept`` queries over the box threshold with a
    small box, each with one of ``patterns`` token sets (7 tokens on average, [SEP] in a third of them, as
    the stand-in weights give); the rest under every threshold."""
    g = torch.Generator().manual_seed(seed)
    n = len(input_ids)
    sets = torch.zeros(patterns, 256, dtype=torch.bool)
    sets[:, 1 : n - 1] = torch.rand(patterns, n - 2, generator=g) < 7 / (n - 2)
    sets[: patterns // 3, n - 1] = True
    probs = torch.rand(queries, 256, generator=g) * 0.2
    probs[:, n:] = 0.0
    on = sets[torch.randint(0, patterns, (kept,), generator=g)]
    probs[:kept][on] = 0.3 + 0.7 * torch.rand(int(on.sum()), generator=g)
    probs[:kept, 1] = torch.maximum(probs[:kept, 1], torch.full((kept,), 0.26))  # over the box threshold
    boxes = torch.rand(queries, 4, generator=g) * 0.5
    return probs[torch.randperm(queries, generator=g)], boxes


def standin_detector(seed: int = 0, text_cache: int = 0, kind: str = "worst-case", arch: str = "real"
                     ) -> GroundingDetector:
    """The real architecture (grounding-dino-tiny's shape; ``arch="tiny"``: the test model) with the stand-in
    weights of ``kind`` ("realistic" or "worst-case", filo_lab/standin.py)."""
    from filo_lab.standin import grounding_model

    return GroundingDetector(grounding_model(seed, arch, kind), make_image_processor(), load_tiny_tokenizer(),
                             text_cache=text_cache)


def product_images(n: int = 3, size: tuple[int, int] = (480, 640), seed: int = 0) -> list[np.ndarray]:
    """Product-like pictures: synthetic washers, pills and bolts on a background, each with a defect."""
    from filo_lab.data.synth import CATEGORIES, apply_defect, render

    objects = [spec for spec in CATEGORIES if spec.kind == "object"]
    images = []
    for i in range(n):
        spec = objects[i % len(objects)]
        rng = np.random.default_rng([seed, i])
        image, region, background = render(spec, rng, size)
        images.append(apply_defect(image, spec.defects[i % len(spec.defects)], rng, region, background)[0])
    return images


def standin_outputs(detector: GroundingDetector, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One product-like image through ``detector``: (900, 256) probs, (900, 4) boxes, the caption's ids."""
    encoding = detector.encode_caption(build_caption(DESCRIPTIONS))
    probs, boxes = detector.forward_batch(detector.preprocess(product_images(1, seed=seed)[0]), encoding)
    return probs[0], boxes[0], encoding.ids


def boxes_per_image(detector: GroundingDetector, images: Sequence[np.ndarray]) -> list[int]:
    """How many queries pass the detector's box threshold (and area rule) on each image: what the host
    post-processes (with none passing, the released rule keeps the best one)."""
    from models.grounding.hqloc import keep_queries

    encoding = detector.encode_caption(build_caption(DESCRIPTIONS))
    counts = []
    for image in images:
        probs, boxes = detector.forward_batch(detector.preprocess(image), encoding)
        best = probs.max(dim=-1).values
        passing = (best > detector.box_threshold) & (boxes[..., 2] * boxes[..., 3] < detector.area_threshold)
        counts.append(int(passing.sum()))
        assert int(keep_queries(probs, boxes, detector.box_threshold, detector.area_threshold).sum()) == max(1, counts[-1])
    return counts


# ----- timing --------------------------------------------------------------------------------------------------


def best_ms(*fns: Callable[[], object], repeat: int) -> list[float]:
    """Best wall time (ms) of each function over ``repeat`` rounds, the functions interleaved in every round
    so that a busy machine slows them alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def time_post_processing(probs: torch.Tensor, boxes: torch.Tensor, input_ids: Sequence[int],
                         repeat: int) -> dict[str, float]:
    detector = GroundingDetector(torch.nn.Module(), None, load_tiny_tokenizer())
    plain = plain_detections(detector, probs, boxes, input_ids, DESCRIPTIONS)
    batched = detector.detections_from_outputs(probs, boxes, input_ids, DESCRIPTIONS)
    if plain != batched:
        raise RuntimeError("the batched post-processing differs from the plain loop: not timing it")
    distinct = len({d.phrase for d in plain})
    before_ms, plain_ms, batched_ms = best_ms(
        lambda: plain_detections(detector, probs, boxes, input_ids, DESCRIPTIONS, False),
        lambda: plain_detections(detector, probs, boxes, input_ids, DESCRIPTIONS),
        lambda: detector.detections_from_outputs(probs, boxes, input_ids, DESCRIPTIONS),
        repeat=repeat,
    )
    return {"kept": len(plain), "distinct_phrases": distinct, "before_ms": before_ms, "plain_ms": plain_ms,
            "batched_ms": batched_ms}


def time_whole_post_processing(detector: GroundingDetector, probs: torch.Tensor, boxes: torch.Tensor,
                               input_ids: Sequence[int], repeat: int,
                               image_hw: tuple[int, int] = (1000, 1500)) -> dict[str, float]:
    """ms of host work per image between the detector's outputs and the answer, memo empty and warm."""
    from models.lru import LRUDict
    from service.engine.pipeline import localise_detections

    def once(memo: dict) -> list:
        dets = detector.detections_from_batch(probs[None], boxes[None], input_ids, [DESCRIPTIONS], memo)[0]
        return localise_detections(dets, image_hw, 518)[2]

    warm: LRUDict = LRUDict(4096)
    n_boxes = len(once(warm))
    cold_ms, warm_ms = best_ms(lambda: once(LRUDict(4096)), lambda: once(warm), repeat=repeat)
    return {"boxes": n_boxes, "cold_ms": cold_ms, "warm_ms": warm_ms}


def time_text_cache(batch_sizes: Sequence[int], repeat: int) -> list[dict[str, float]]:
    """``forward_batch`` of the tiny test model, plain and with the text pass cache (warm)."""
    plain, cached = GroundingDetector.tiny(), GroundingDetector.tiny(text_cache=4)
    encoding = plain.encode_caption(build_caption(DESCRIPTIONS))
    rows = []
    for batch in batch_sizes:
        rng = np.random.default_rng(batch)
        pixels = torch.cat([plain.preprocess(rng.integers(0, 256, (518, 518, 3), dtype=np.uint8))
                            for _ in range(batch)])
        want, got = plain.forward_batch(pixels, encoding), cached.forward_batch(pixels, encoding)
        if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
            raise RuntimeError("the cached text pass changed the outputs: not timing it")
        plain_ms, cached_ms = best_ms(lambda p=pixels: plain.forward_batch(p, encoding),
                                      lambda p=pixels: cached.forward_batch(p, encoding), repeat=repeat)
        rows.append({"batch": batch, "plain_ms": plain_ms, "cached_ms": cached_ms})
    return rows


def time_real_forward(detector: GroundingDetector, repeat: int) -> dict[str, float]:
    """``forward_batch`` of the real architecture for one image, plain and with the text pass cache (warm)."""
    pixels = detector.preprocess(np.random.default_rng(1).integers(0, 256, (518, 518, 3), dtype=np.uint8))
    encoding = detector.encode_caption(build_caption(DESCRIPTIONS))
    want = detector.forward_batch(pixels, encoding)
    cache = TextPassCache(detector.model.model.text_backbone, 4)

    def cached():
        cache.install()
        try:
            return detector.forward_batch(pixels, encoding)
        finally:
            cache.uninstall(clear=False)  # the plain runs in between see the plain model

    got = cached()
    if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
        raise RuntimeError("the cached text pass changed the real architecture's outputs: not timing it")
    plain_ms, cached_ms = best_ms(lambda: detector.forward_batch(pixels, encoding), cached, repeat=repeat)
    return {"batch": 1, "plain_ms": plain_ms, "cached_ms": cached_ms}


def time_text_backbone(arch: str, batch_sizes: Sequence[int], repeat: int) -> list[dict[str, float]]:
    """The text backbone alone on the FiLo caption (``arch`` "tiny": the test model's BERT; "real": the
    BERT-base of grounding-dino-tiny's shape): B rows run (plain) against the cache's hit (the kept row
    expanded and copied)."""
    from transformers import AutoModel, GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        SPECIAL_TOKENS,
        generate_masks_with_special_tokens_and_transfer_map,
    )

    config = GroundingDinoConfig() if arch == "real" else load_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = AutoModel.from_config(config.text_config, add_pooling_layer=False).eval()
    ids = load_tiny_tokenizer()(build_caption(DESCRIPTIONS), return_tensors="pt")["input_ids"]
    cache = TextPassCache(bert, 4).install()
    rows = []
    for batch in batch_sizes:
        input_ids = ids.expand(batch, -1)
        mask, position_ids = generate_masks_with_special_tokens_and_transfer_map(input_ids,
                                                                                  torch.tensor(SPECIAL_TOKENS))
        args = (input_ids, mask[:, None], torch.zeros_like(input_ids), position_ids)
        with torch.no_grad():
            plain_ms, cached_ms = best_ms(lambda a=args: type(bert).forward(bert, *a, return_dict=True),
                                          lambda a=args: cache(*a, return_dict=True), repeat=repeat)
        rows.append({"batch": batch, "tokens": ids.shape[1], "plain_ms": plain_ms, "cached_ms": cached_ms})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--patterns", type=int, default=60, help="distinct token sets among the synthetic queries")
    p.add_argument("--standin", action="store_true",
                   help="also time the real architecture's outputs with each stand-in (runs it: tens of seconds)")
    p.add_argument("--batch-sizes", default="1,8", help="text cache: batch sizes")
    p.add_argument("--images", type=int, default=3, help="--standin: product-like images to count boxes on")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    print(f"# Grounding DINO CPU-side costs, torch {torch.__version__}, {args.threads} thread(s), best of "
          f"{args.repeat}")
    print("\n| post-processing input | kept queries | distinct phrases | before ms | plain ms | batched ms | "
          "speed-up vs plain | vs before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ids = load_tiny_tokenizer()(build_caption(DESCRIPTIONS))["input_ids"]
    cases = [(f"synthetic, {args.patterns} token sets", *synthetic_outputs(ids, patterns=args.patterns), ids),
             ("synthetic, 756 token sets drawn", *synthetic_outputs(ids, patterns=756), ids)]
    standins = {kind: standin_detector(kind=kind) for kind in ("realistic", "worst-case")} if args.standin else {}
    for kind, detector in standins.items():
        cases.append((f"real architecture, {kind} stand-in, a product-like image", *standin_outputs(detector)))
    for name, probs, boxes, input_ids in cases:
        r = time_post_processing(probs, boxes, input_ids, args.repeat)
        print(f"| {name} | {r['kept']} | {r['distinct_phrases']} | {r['before_ms']:.2f} | {r['plain_ms']:.2f} | "
              f"{r['batched_ms']:.2f} | {r['plain_ms'] / r['batched_ms']:.1f}x | "
              f"{r['before_ms'] / r['batched_ms']:.1f}x |", flush=True)
    if standins:
        print("\n| host work per image after the detector (detections, HQ-Loc, boxes) | boxes | first image ms | "
              "later images ms |\n|---|---:|---:|---:|")
        for (kind, detector), case in zip(standins.items(), cases[-len(standins):], strict=True):
            r = time_whole_post_processing(detector, *case[1:], args.repeat)
            print(f"| real architecture, {kind} stand-in | {r['boxes']} | {r['cold_ms']:.2f} | {r['warm_ms']:.2f} |",
                  flush=True)
        images = product_images(args.images)
        print(f"\n| queries over the box threshold, {args.images} product-like images | per image |\n|---|---|")
        for kind, detector in standins.items():
            print(f"| real architecture, {kind} stand-in | {', '.join(map(str, boxes_per_image(detector, images)))} |",
                  flush=True)
    print("\n| text pass cache | batch | plain ms | cached ms | speed-up |\n|---|---:|---:|---:|---:|")
    for r in time_text_cache(sizes, max(3, args.repeat // 4)):
        print(f"| tiny model, forward_batch | {r['batch']} | {r['plain_ms']:.1f} | {r['cached_ms']:.1f} | "
              f"{r['plain_ms'] / r['cached_ms']:.2f}x |", flush=True)
    for arch, label in (("tiny", "tiny model's text backbone alone"), ("real", "BERT-base text backbone alone")):
        for r in time_text_backbone(arch, sizes, args.repeat):
            print(f"| {label} ({r['tokens']} tokens) | {r['batch']} | {r['plain_ms']:.2f} | {r['cached_ms']:.2f} | "
                  f"{r['plain_ms'] / r['cached_ms']:.1f}x |", flush=True)
    if standins:
        r = time_real_forward(standins["realistic"], 2)
        print(f"| real architecture, forward_batch | {r['batch']} | {r['plain_ms']:.1f} | {r['cached_ms']:.1f} | "
              f"{r['plain_ms'] / r['cached_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
