"""HQ-Loc pure functions against hand-computed numbers, and the tiny Grounding DINO end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.grounding.detector import GroundingDetector, GroundingWeightsNotFound, load_tiny_tokenizer
from models.grounding.hqloc import (
    GENERAL_WORDS,
    POSITIONS,
    Detection,
    best_valid_box,
    boxes_norm_to_frame,
    build_caption,
    cell_bounds,
    choose_position,
    dropped_special_ids,
    is_valid_phrase,
    keep_queries,
    localise,
    phrase_from_posmap,
    phrases_from_posmaps,
    position_of_point,
    released_confidence,
    select_queries,
    suppression_keep_mask,
)
from models.lru import LRUDict

# ------------------------------------------------------------------------------------------ caption


def test_build_caption() -> None:
    assert build_caption([]) == "anomaly . damage . broken . defect . contamination."
    assert build_caption(["Uneven coating", "scratches"]) == (
        "anomaly . damage . broken . defect . contamination . uneven coating . scratches."
    )
    assert build_caption(["dent."]).endswith(". dent.")
    assert not build_caption(["dent."]).endswith("..")
    assert GENERAL_WORDS == ("anomaly", "damage", "broken", "defect", "contamination")


# ------------------------------------------------------------------------------------------ queries


def test_select_queries_thresholds_are_strict() -> None:
    probs = torch.tensor(
        [
            [0.10, 0.30, 0.00],  # 0: 0.30 > 0.25, area 0.25 -> kept
            [0.25, 0.25, 0.25],  # 1: 0.25 is not > 0.25 -> dropped
            [0.90, 0.00, 0.00],  # 2: area 0.7 is not < 0.7 -> dropped
            [0.00, 0.00, 0.26],  # 3: kept
        ]
    )
    boxes = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],
            [0.5, 0.5, 0.1, 0.1],
            [0.5, 0.5, 1.0, 0.7],
            [0.5, 0.5, 0.2, 0.2],
        ]
    )
    assert select_queries(probs, boxes).tolist() == [0, 3]
    assert select_queries(probs, boxes, box_threshold=0.27, area_threshold=0.71).tolist() == [0, 2]
    assert select_queries(probs, boxes).dtype == torch.long


def test_select_queries_fallback_keeps_single_best_even_if_too_big() -> None:
    probs = torch.tensor([[0.10, 0.20], [0.24, 0.0], [0.0, 0.24], [0.9, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]] * 3 + [[0.5, 0.5, 1.0, 1.0]])
    # query 3 has the best probability but covers the whole image: nothing passes, so it is the fallback.
    assert select_queries(probs, boxes).tolist() == [3]
    # ties in the fallback go to the first query (torch.argmax), like the released code.
    assert select_queries(probs[:3], boxes[:3]).tolist() == [1]


# ------------------------------------------------------------------------------------------ phrases


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def ids_of(tokenizer, tokens: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids or "[UNK]" in tokens
    return ids


def test_tiny_vocab_keeps_bert_special_ids(tokenizer) -> None:
    # transformers' Grounding DINO hard-codes these ids to split the caption into phrases.
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "a"]) == [
        0, 100, 101, 102, 103, 1012, 1029, 1037,
    ]  # fmt: skip
    enc = tokenizer("anomaly . Bent scratchesq.")
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"]) == [
        "[CLS]", "anomaly", ".", "bent", "scratches", "##q", ".", "[SEP]",
    ]  # fmt: skip


def test_phrase_joins_wordpieces_and_skips_cls(tokenizer) -> None:
    ids = ids_of(tokenizer, ["[CLS]", "burn", "mark", "##s", ".", "bent", "[SEP]"])
    probs = torch.zeros(256)
    probs[:7] = torch.tensor([0.9, 0.1, 0.3, 0.3, 0.2, 0.26, 0.25])
    # [CLS] is forced off; 0.25 is not > 0.25; "mark" + "##s" decode to one word.
    assert phrase_from_posmap(probs, ids, tokenizer) == "marks bent"
    probs[6] = 0.5
    assert phrase_from_posmap(probs, ids, tokenizer) == "marks bent"  # shown: no [SEP]
    assert phrase_from_posmap(probs, ids, tokenizer, keep_special=True) == "marks bent [SEP]"  # released
    assert phrase_from_posmap(probs, ids, tokenizer, text_threshold=0.29) == "marks"
    assert phrase_from_posmap(probs, ids, tokenizer, text_threshold=0.29, keep_special=True) == "marks [SEP]"
    # tokenizers' WordPiece decoder glues "." to the previous word.
    dots = ids_of(tokenizer, ["[CLS]", "damage", ".", "broken"])
    assert phrase_from_posmap(torch.tensor([0.0, 1.0, 1.0, 1.0]), dots, tokenizer) == "damage. broken"


def test_phrase_ignores_positions_past_caption_and_from_255(tokenizer) -> None:
    bent, burn = ids_of(tokenizer, ["bent", "burn"])
    short = [101, bent, 102]
    probs = torch.zeros(256)
    probs[1] = 0.9
    probs[10] = 0.9  # past the caption: skipped, not an IndexError
    assert phrase_from_posmap(probs, short, tokenizer) == "bent"

    long_ids = [101] + [bent] * 253 + [burn] * 46  # 300 tokens; positions 254.. are "burn"
    probs = torch.zeros(300)
    probs[253] = probs[254] = probs[255] = probs[299] = 0.9
    assert phrase_from_posmap(probs, long_ids, tokenizer) == "bent burn"
    assert probs[255] == pytest.approx(0.9)  # the caller's tensor is not modified


def test_phrase_drops_special_tokens_but_keeps_unk(tokenizer) -> None:
    """[SEP], [PAD], [MASK] (and [CLS]) never show; [UNK] stands for a caption word and stays."""
    assert dropped_special_ids(tokenizer) == set(
        tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    )
    ids = ids_of(tokenizer, ["[CLS]", "bent", "[MASK]", "burn", "[UNK]", "mark", "[SEP]", "[PAD]"])
    probs = torch.ones(len(ids))
    assert phrase_from_posmap(probs, ids, tokenizer) == "bent burn [UNK] mark"
    assert phrase_from_posmap(probs, ids, tokenizer, keep_special=True) == "bent [MASK] burn [UNK] mark [SEP] [PAD]"
    # without [UNK], the same as the tokenizer's own skip_special_tokens
    no_unk = [i for i in ids[1:] if i != tokenizer.unk_token_id]
    assert phrase_from_posmap(torch.ones(len(no_unk) + 1), [ids[0], *no_unk], tokenizer) == tokenizer.decode(
        no_unk, skip_special_tokens=True
    )
    only_sep = torch.zeros(len(ids))
    only_sep[6] = 1.0
    assert phrase_from_posmap(only_sep, ids, tokenizer) == ""
    assert phrase_from_posmap(only_sep, ids, tokenizer, keep_special=True) == "[SEP]"


def test_validity_is_judged_on_the_released_phrase(tokenizer) -> None:
    """VisA macaroni1's released description "uneven shape " (trailing space) occurs in the released phrase
    "uneven shape [SEP]" but not in the shown "uneven shape": the box stays valid, as in the released code."""
    from descriptions import CategoryCatalog

    descs = list(CategoryCatalog.load().get("macaroni1").descriptions)
    assert "uneven shape " in descs
    detector = GroundingDetector(_NoModel(), None, tokenizer)
    ids = tokenizer(build_caption(descs))["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    start = tokens.index("uneven")
    assert tokens[start + 1] == "shape" and tokens[-1] == "[SEP]"
    probs = torch.zeros(2, 256)
    probs[:, [start, start + 1, len(ids) - 1]] = 0.9  # query 0: uneven shape [SEP]
    probs[1, len(ids) - 1] = 0.0  # query 1: uneven shape
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]] * 2)
    first, second = detector.detections_from_outputs(probs, boxes, ids, descs)
    assert (first.phrase, first.valid) == ("uneven shape", True)
    assert is_valid_phrase("uneven shape [SEP]", descs) and not is_valid_phrase("uneven shape", descs)
    assert (second.phrase, second.valid) == ("uneven shape", False)


class _NoModel(torch.nn.Module):
    """Stands in for the Grounding DINO model where only the post-processing runs."""


# ------------------------------------------------------------------------------------------ post-processing


def _plain_select(probs: torch.Tensor, boxes: torch.Tensor, box_threshold: float, area_threshold: float) -> list[int]:
    """The previous ``select_queries``: one image, a host sync for the fallback."""
    best = probs.max(dim=1).values
    keep = (best > box_threshold) & (boxes[:, 2] * boxes[:, 3] < area_threshold)
    if not bool(keep.any()):
        keep = torch.zeros_like(keep)
        keep[torch.argmax(best)] = True
    return keep.nonzero(as_tuple=True)[0].tolist()


def _plain_phrase(token_probs: torch.Tensor, input_ids: list[int], tokenizer, threshold: float, keep: bool) -> str:
    """The released get_phrases_from_posmap per query (plus the shown phrase's special-token filter)."""
    posmap = token_probs > threshold
    posmap[0:1] = False
    posmap[255:] = False
    ids = [int(input_ids[i]) for i in posmap.nonzero(as_tuple=True)[0].tolist() if i < len(input_ids)]
    if not keep:
        drop = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        ids = [i for i in ids if i not in drop]
    return tokenizer.decode(ids)


def _plain_detections(detector, probs, boxes, input_ids, descriptions) -> list[Detection]:
    """The per-query loop the detector ran before: one query, one decode, one ``.item()`` at a time."""
    out = []
    for q in _plain_select(probs, boxes, detector.box_threshold, detector.area_threshold):
        shown = _plain_phrase(probs[q], input_ids, detector.tokenizer, detector.text_threshold, keep=False)
        released = _plain_phrase(probs[q], input_ids, detector.tokenizer, detector.text_threshold, keep=True)
        out.append(Detection(tuple(float(v) for v in boxes[q].tolist()), float(probs[q].max().item()), shown,
                             is_valid_phrase(released, descriptions)))
    return out


def _duplicated_outputs(seed: int, batch: int, nq: int, n_ids: int, width: int, patterns: int = 12):
    """(B, nq, T) probabilities where queries share a few token sets, with every edge of the phrase rule:
    values at exactly the threshold, positions 0 and >= 255 and past the caption on, one image where no
    query passes the box threshold (ties for the fallback), boxes too big to keep."""
    g = torch.Generator().manual_seed(seed)
    sets = torch.rand(patterns, width, generator=g) < 0.08
    sets[0] = False  # an empty phrase
    sets[1, 0] = sets[1, min(n_ids, width) - 1] = True  # [CLS] (never) and the last token, [SEP]
    sets[2, width - 3 :] = True  # positions >= 255 when width is 300; past the caption either way
    probs = torch.rand(batch, nq, width, generator=g) * 0.25  # all at or below the threshold
    pick = torch.randint(0, patterns, (batch, nq), generator=g)
    on = sets[pick]
    probs[on] = 0.25 + 0.75 * torch.rand(int(on.sum()), generator=g) + 1e-4
    probs[..., 5] = torch.where(torch.rand(batch, nq, generator=g) < 0.3, 0.25, probs[..., 5])  # exactly 0.25
    probs[-1] = torch.rand(nq, width, generator=g) * 0.2  # the last image keeps nothing: the fallback
    probs[-1, [3, 7], 4] = 0.24  # tied best: the first one wins
    boxes = torch.rand(batch, nq, 4, generator=g)
    boxes[..., 2:] = boxes[..., 2:] * 1.2  # some areas >= 0.7
    return probs, boxes


@pytest.mark.parametrize("n_ids, width", [(40, 256), (300, 300)])
@pytest.mark.parametrize("text_threshold", [0.25, 0.4])
def test_batched_post_processing_equals_the_plain_loop(tokenizer, n_ids: int, width: int,
                                                       text_threshold: float) -> None:
    descs = ["burn mark", "bent", "Uneven coating", "mark [SEP]"]
    caption_ids = tokenizer(build_caption(descs))["input_ids"]
    filler = ids_of(tokenizer, ["burn", "##s", "mark", ".", "bent", "[UNK]", "[MASK]", "[PAD]"])
    ids = (caption_ids[:-1] + [filler[i % len(filler)] for i in range(n_ids)])[: n_ids - 1] + [caption_ids[-1]]
    detector = GroundingDetector(_NoModel(), None, tokenizer, text_threshold=text_threshold)
    probs, boxes = _duplicated_outputs(0, 4, 300, n_ids, width)
    per_image = [descs, descs[:1], ["mark"], descs]
    batched = detector.detections_from_batch(probs, boxes, ids, per_image)
    plain = [_plain_detections(detector, probs[b], boxes[b], ids, per_image[b]) for b in range(4)]
    assert batched == plain  # boxes, confidences, phrases, validity and order, exactly
    assert [detector.detections_from_outputs(probs[b], boxes[b], ids, per_image[b]) for b in range(4)] == plain
    # the cases the data is built for did occur
    assert len(plain[-1]) == 1 and plain[-1][0].box_norm == tuple(boxes[-1, 3].tolist())
    phrases = {d.phrase for r in plain for d in r}
    assert "" in phrases
    if text_threshold == 0.25:  # (a higher one splits the token sets further)
        assert len(phrases) <= 12 + 1 < sum(len(r) for r in plain)  # the patterns and the fallback's
    assert any(d.valid for r in plain for d in r) and not all(d.valid for r in plain for d in r)
    assert not any("[SEP]" in d.phrase or "[PAD]" in d.phrase or "[MASK]" in d.phrase for r in plain for d in r)
    # keep_queries over the batch is select_queries image by image
    for thresholds in [(0.25, 0.7), (0.5, 0.3), (1.0, 0.7)]:
        mask = keep_queries(probs, boxes, *thresholds)
        assert [mask[b].nonzero().flatten().tolist() for b in range(4)] == [
            _plain_select(probs[b], boxes[b], *thresholds) for b in range(4)
        ]
        assert [select_queries(probs[b], boxes[b], *thresholds).tolist() for b in range(4)] == [
            _plain_select(probs[b], boxes[b], *thresholds) for b in range(4)
        ]


def test_phrases_decode_each_token_set_once(tokenizer) -> None:
    ids = tokenizer(build_caption(["burn mark", "bent"]))["input_ids"]
    probs, _ = _duplicated_outputs(1, 1, 200, len(ids), 256, patterns=5)
    calls = []

    class Counting:
        all_special_ids = tokenizer.all_special_ids
        unk_token_id = tokenizer.unk_token_id

        def decode(self, token_ids):
            calls.append(tuple(token_ids))
            return tokenizer.decode(token_ids)

    memo: dict = {}
    phrases = phrases_from_posmaps(probs[0], ids, Counting(), memo=memo)
    assert len(phrases) == 200 and len(set(calls)) == len(calls) <= 2 * 5
    assert [p.shown for p in phrases] == [phrase_from_posmap(q, ids, tokenizer) for q in probs[0]]
    assert [p.released for p in phrases] == [phrase_from_posmap(q, ids, tokenizer, keep_special=True) for q in probs[0]]
    before = len(calls)
    assert phrases_from_posmaps(probs[0], ids, Counting(), memo=memo) == phrases and len(calls) == before
    assert phrases_from_posmaps(probs[0, :0], ids, Counting()) == []


def test_phrase_memo_keeps_the_most_recent_token_sets() -> None:
    memo = LRUDict(maxsize=2)
    memo[(1,)], memo[(2,)] = "a", "b"
    assert memo.get((1,)) == "a"  # used: now the most recent
    memo[(3,)] = "c"
    assert list(memo) == [(1,), (3,)] and memo.get((2,)) is None and memo.get((2,), "x") == "x"


def test_detector_decodes_a_token_set_once_across_calls_and_captions() -> None:
    """The detector's memo outlives one detect call: the same images again decode nothing, and the results
    (a fresh detector's, which decodes everything) are equal."""
    memo_detector, fresh = GroundingDetector.tiny(seed=0), GroundingDetector.tiny(seed=0)
    calls = []
    decode = memo_detector.tokenizer.decode
    memo_detector.tokenizer.decode = lambda ids, **kw: calls.append(tuple(ids)) or decode(ids, **kw)
    imgs = [image(120, 160, s) for s in range(3)]
    first = memo_detector.detect(imgs, [DESCS] * 3)
    decoded = len(calls)
    assert decoded > 0 and len(memo_detector.phrase_memo) > 0
    again = memo_detector.detect(imgs, [DESCS] * 3)
    assert len(calls) == decoded and again == first == fresh.detect(imgs, [DESCS] * 3)
    other = memo_detector.detect(imgs[:1], [["scratch"]])  # another caption: its own token ids, decoded anew
    assert other == fresh.detect(imgs[:1], [["scratch"]])


def test_is_valid_phrase_is_case_sensitive_substring() -> None:
    assert is_valid_phrase("uneven coating", ["uneven coating"])
    assert not is_valid_phrase("uneven coating", ["Uneven coating"])  # released: never matches
    assert is_valid_phrase("damaged area", ["Uneven coating"])  # "damage" is a general word
    assert not is_valid_phrase("Damage", [])
    assert not is_valid_phrase("", ["scratches"])
    assert is_valid_phrase("scratches [SEP]", ["scratches"])


# ------------------------------------------------------------------------------------------ confidence


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.4567, 0.45),
        (1.0, 1.0),
        (0.25, 0.25),
        (0.1, 0.1),
        (0.999999, 0.99),
        (0.05, 0.05),
        (0.012345, 0.01),
        (float(np.float32(0.45)), 0.44),  # 0.4499999881 as the released code saw it
        (float(np.float32(0.3)), 0.3),  # 0.3000000119
        (9.999999747378752e-06, 9.99),  # scientific notation cut to "9.99": reproduced
        (1.2e-05, 0.0),  # "1.2e" would crash the released parse
    ],
)
def test_released_confidence(p: float, expected: float) -> None:
    assert released_confidence(p) == expected


def test_best_box_ties_go_to_the_later_box() -> None:
    assert best_valid_box([0.456, 0.459, 0.30], [True, True, True]) == 1  # both 0.45
    assert best_valid_box([0.459, 0.456], [True, True]) == 1  # still the later one
    assert best_valid_box([0.46, 0.459], [True, True]) == 0
    assert best_valid_box([0.456, 0.99, 0.30], [True, False, True]) == 0  # invalid boxes never count
    assert best_valid_box([0.0], [True]) == 0  # max_pred starts at 0 and compares with >=
    assert best_valid_box([0.9], [False]) is None
    assert best_valid_box(torch.tensor([0.3, 0.4]), torch.tensor([True, True])) == 1


# ------------------------------------------------------------------------------------------ position


def box_centred(x: float, y: float) -> list[float]:
    return [x - 1.0, y - 2.0, x + 1.0, y + 2.0]


@pytest.mark.parametrize(
    "value, cell",
    [(0, 0), (172, 0), (172.5, None), (173, 1), (344, 1), (344.5, None), (345, 2), (517, 2),
     (517.5, None), (-0.5, None), (600, None)],
)  # fmt: skip
def test_cell_boundaries(value: float, cell: int | None) -> None:
    expected_x = None if cell is None else POSITIONS[3 + cell]  # middle row
    expected_y = None if cell is None else POSITIONS[3 * cell + 1]  # middle column
    assert position_of_point(value, 259.0) == expected_x
    assert position_of_point(259.0, value) == expected_y
    assert choose_position([box_centred(value, 259.0)], [0.5], [True]) == expected_x


def test_all_nine_cells_row_major() -> None:
    centres = [173 * 0.5, 258.5, 431.0]
    got = [choose_position([box_centred(x, y)], [0.9], [True]) for y in centres for x in centres]
    assert got == list(POSITIONS)
    assert got == [
        "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
    ]  # fmt: skip


def test_centre_uses_both_corners() -> None:
    # centre ((100 + 245) / 2, (0 + 345) / 2) = (172.5, 172.5): between cells -> None (average all nine).
    assert choose_position([[100.0, 0.0, 245.0, 345.0]], [0.9], [True]) is None
    # centre (172, 173) -> column 0, row 1 -> "left".
    assert choose_position([[100.0, 1.0, 244.0, 345.0]], [0.9], [True]) == "left"


def test_best_box_decides_position() -> None:
    boxes = [box_centred(50, 50), box_centred(450, 450), box_centred(450, 50)]
    assert choose_position(boxes, [0.50, 0.51, 0.9], [True, True, False]) == "bottom right"
    assert choose_position(boxes, [0.512, 0.519, 0.9], [True, True, False]) == "bottom right"
    assert choose_position(boxes, [0.52, 0.519, 0.9], [True, True, False]) == "top left"


def test_no_valid_box_is_center() -> None:
    assert choose_position([box_centred(50, 50)], [0.9], [False]) == "center"
    assert choose_position(np.zeros((0, 4)), [], []) == "center"


def test_cell_bounds() -> None:
    assert cell_bounds() == ((0, 172), (173, 344), (345, 517))
    assert cell_bounds(518) == ((0, 172), (173, 344), (345, 517))
    assert cell_bounds(224) == ((0, 74), (75, 149), (150, 223))  # round(74.38), round(148.76), 223
    assert position_of_point(149.0, 0.0, size=224) == "top"
    assert position_of_point(149.5, 0.0, size=224) is None


# ------------------------------------------------------------------------------------------ suppression


def test_suppression_released_truncates_and_slices() -> None:
    keep = suppression_keep_mask([[10.7, 20.2, 30.9, 40.99]])
    assert keep.shape == (518, 518) and keep.dtype == torch.bool
    assert int(keep.sum()) == 20 * 20  # rows 20:40, cols 10:30
    assert keep[20, 10] and keep[39, 29]
    assert not keep[40, 29] and not keep[39, 30] and not keep[19, 10] and not keep[20, 9]


def test_suppression_released_negative_corner_wraps_to_empty() -> None:
    # int(-3.5) = -3, and cols[-3:50] = cols[515:50] is empty: the box keeps nothing.
    assert int(suppression_keep_mask([[-3.5, 10.0, 50.0, 60.0]]).sum()) == 0
    # int(-0.7) = 0: a slight overflow is harmless.
    assert int(suppression_keep_mask([[-0.7, 10.0, 50.0, 60.0]]).sum()) == 50 * 50
    # a negative start with a stop beyond it from the end keeps the wrapped strip: cols[-3:518] = 515..517.
    wrapped = suppression_keep_mask([[-3.5, 0.0, 600.0, 10.0]])
    assert int(wrapped.sum()) == 3 * 10 and wrapped[0, 515] and not wrapped[0, 0]
    # overflow on the right/bottom is clipped by slicing.
    assert int(suppression_keep_mask([[500.0, 0.0, 600.0, 10.0]]).sum()) == 18 * 10


def test_suppression_union_of_boxes() -> None:
    keep = suppression_keep_mask([[0, 0, 10, 10], [5, 5, 15, 15]])
    assert int(keep.sum()) == 100 + 100 - 25


def test_suppression_clamp() -> None:
    keep = suppression_keep_mask([[-3.5, 10.2, 50.0, 60.5]], semantics="clamp")
    # cols: 0 <= x < 50 -> 50 columns; rows: 10.2 <= y < 60.5 -> 11..60 -> 50 rows.
    assert int(keep.sum()) == 50 * 50
    assert keep[11, 0] and keep[60, 49]
    assert not keep[10, 0] and not keep[61, 0] and not keep[11, 50]
    assert int(suppression_keep_mask([[500.0, 510.0, 900.0, 900.0]], semantics="clamp").sum()) == 18 * 8


@pytest.mark.parametrize("empty", [[], np.zeros((0, 4)), torch.zeros(0, 4)])
def test_suppression_empty_suppresses_everything(empty) -> None:
    keep = suppression_keep_mask(empty)
    assert keep.shape == (518, 518) and not bool(keep.any())
    assert suppression_keep_mask(empty, size=37).shape == (37, 37)


def test_suppression_rejects_unknown_semantics() -> None:
    with pytest.raises(ValueError):
        suppression_keep_mask([[0, 0, 1, 1]], semantics="nearest")
    with pytest.raises(ValueError):
        suppression_keep_mask([], semantics="nearest")


def _keep_mask_box_by_box(boxes: np.ndarray, size: int, semantics: str) -> torch.Tensor:
    """The plain path: one slice assignment per box, as the released code (and this module before) did."""
    keep = torch.zeros(size, size, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        if semantics == "released":
            keep[int(y1) : int(y2), int(x1) : int(x2)] = True
        else:
            c0, c1 = (min(max(math.ceil(v), 0), size) for v in (x1, x2))
            r0, r1 = (min(max(math.ceil(v), 0), size) for v in (y1, y2))
            keep[r0:r1, c0:c1] = True
    return keep


@pytest.mark.parametrize("semantics", ["released", "clamp"])
@pytest.mark.parametrize("size", [518, 37])
def test_suppression_equals_box_by_box_slicing(semantics: str, size: int) -> None:
    """Hundreds of boxes (as stand-in weights keep) overflowing every edge, inverted, empty, on integer
    corners and exactly at -size: the one-pass union equals slicing box by box."""
    rng = np.random.default_rng(size)
    lo = rng.uniform(-1.3 * size, 1.2 * size, (400, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(-0.1 * size, 0.3 * size, (400, 2))], axis=1)
    boxes[::7] = np.round(boxes[::7])  # integer corners: trunc and ceil are the identity there
    boxes[1::11, 0] = -size  # a start of exactly -size wraps to 0
    kept = {}
    for n in (0, 1, 3, 40, 400):
        kept[n] = _keep_mask_box_by_box(boxes[:n], size, semantics)
        assert torch.equal(suppression_keep_mask(boxes[:n], size, semantics=semantics), kept[n])
    assert 0 < int(kept[40].sum()) < int(kept[400].sum()) < size * size  # overlapping, not covering


@pytest.mark.parametrize("corner", [float("nan"), float("inf")])
def test_suppression_refuses_corners_that_are_not_numbers(corner: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        suppression_keep_mask([[0.0, 0.0, corner, 10.0]])


# ------------------------------------------------------------------------------------------ box mapping


def test_boxes_norm_to_frame_square_is_released() -> None:
    got = boxes_norm_to_frame(torch.tensor([[0.5, 0.5, 0.2, 0.4]]), (400, 640), square=True)
    torch.testing.assert_close(got, torch.tensor([[207.2, 155.4, 310.8, 362.6]]))
    assert got.dtype == torch.float32


def test_boxes_norm_to_frame_through_the_crop() -> None:
    # 400 x 640 image: box [160, 100, 480, 300] in pixels; frame x = x * 828 / 640 - 155, y = y * 518 / 400.
    got = boxes_norm_to_frame(np.array([[0.5, 0.5, 0.5, 0.5]]), (400, 640))
    np.testing.assert_allclose(got.numpy(), [[52.0, 129.5, 466.0, 388.5]], rtol=1e-6)
    # square originals map identically either way.
    a = boxes_norm_to_frame([[0.3, 0.6, 0.2, 0.1]], (1000, 1000))
    b = boxes_norm_to_frame([[0.3, 0.6, 0.2, 0.1]], (1000, 1000), square=True)
    torch.testing.assert_close(a, b)


def test_localise() -> None:
    dets = [
        Detection((0.1, 0.1, 0.1, 0.1), 0.9, "dent", True),
        Detection((0.9, 0.9, 0.1, 0.1), 0.99, "x", False),
        Detection((0.5, 0.5, 0.2, 0.2), 0.8, "damage", True),
    ]
    position, frame, valid = localise(dets, (518, 518))
    assert position == "top left"  # 0.9 beats 0.8; the invalid 0.99 does not count
    assert valid.tolist() == [True, False, True] and frame.shape == (3, 4)
    torch.testing.assert_close(frame[valid], torch.tensor([[25.9, 25.9, 77.7, 77.7], [207.2, 207.2, 310.8, 310.8]]))
    assert localise([], (10, 10))[0] == "center"


# ------------------------------------------------------------------------------------------ detector


@pytest.fixture(scope="module")
def detector() -> GroundingDetector:
    return GroundingDetector.tiny()


def image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth pattern plus noise, so different seeds give different detections."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], axis=-1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


DESCS = ["burn mark", "bent"]


def test_detect_structure_and_thresholds(detector: GroundingDetector) -> None:
    img = image(120, 160, 0)
    (dets,) = detector.detect([img], [DESCS])
    assert dets and all(isinstance(d, Detection) for d in dets)

    encoding = detector.encode_caption(build_caption(DESCS))
    probs, boxes = detector.forward_batch(detector.preprocess(img), encoding)
    assert probs.shape == (1, 20, 256) and boxes.shape == (1, 20, 4)
    assert float(probs[0, :, len(encoding.ids) :].max()) == 0.0  # padding to 256 has probability 0
    kept = select_queries(probs[0], boxes[0], 0.25, 0.7).tolist()
    assert len(dets) == len(kept)
    for det, q in zip(dets, kept):
        assert det.confidence == pytest.approx(float(probs[0, q].max()), abs=1e-6)
        assert det.confidence > 0.25
        cx, cy, w, h = det.box_norm
        assert w * h < 0.7 and 0 <= cx <= 1 and 0 <= cy <= 1
        released = phrase_from_posmap(probs[0, q], encoding.ids, detector.tokenizer, keep_special=True)
        assert det.valid == is_valid_phrase(released, DESCS)
        assert det.phrase == phrase_from_posmap(probs[0, q], encoding.ids, detector.tokenizer)


def test_detect_fallback_when_thresholds_exclude_all() -> None:
    strict = GroundingDetector.tiny(box_threshold=1.0)
    img = image(120, 160, 1)
    (dets,) = strict.detect([img], [DESCS])
    probs, _ = strict.forward_batch(strict.preprocess(img), strict.encode_caption(build_caption(DESCS)))
    assert len(dets) == 1
    assert dets[0].confidence == pytest.approx(float(probs.max()), abs=1e-6)
    strict.box_threshold, strict.area_threshold = 0.25, 1e-4  # every tiny box is 0.1 x 0.1 = 0.01
    assert len(strict.detect([img], [DESCS])[0]) == 1


def test_batched_equals_single(detector: GroundingDetector) -> None:
    # two images share size and caption (one batch), one differs in size, one in caption
    images = [image(120, 160, 2), image(120, 160, 3), image(90, 90, 4), image(120, 160, 5)]
    descs = [DESCS, DESCS, DESCS, ["crack"]]
    batched = detector.detect(images, descs)
    singles = [detector.detect([img], [d])[0] for img, d in zip(images, descs)]
    assert [len(b) for b in batched] == [len(s) for s in singles]
    for got, want in zip(batched, singles):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.box_norm, b.box_norm, atol=1e-5)
            assert a.confidence == pytest.approx(b.confidence, abs=1e-5)
            assert (a.phrase, a.valid) == (b.phrase, b.valid)
    # the two seeds really differ, so the equality above is not trivial
    assert [d.box_norm for d in batched[0]] != [d.box_norm for d in batched[1]]

    enc = detector.encode_caption(build_caption(DESCS))
    pix = torch.cat([detector.preprocess(images[0]), detector.preprocess(images[1])])
    probs_b, boxes_b = detector.forward_batch(pix, enc)
    probs_1, boxes_1 = detector.forward_batch(pix[1:], enc)
    torch.testing.assert_close(probs_b[1:], probs_1, atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes_b[1:], boxes_1, atol=1e-5, rtol=0)


def test_small_batches_equal_one_big(detector: GroundingDetector) -> None:
    images = [image(90, 90, s) for s in range(7, 10)]
    big = detector.detect(images, [DESCS] * 3)
    detector.max_batch = 2
    try:
        small = detector.detect(images, [DESCS] * 3)
    finally:
        detector.max_batch = 8
    assert [[d.phrase for d in r] for r in big] == [[d.phrase for d in r] for r in small]


def test_caption_cache_and_special_ids(detector: GroundingDetector) -> None:
    caption = build_caption(DESCS)
    enc = detector.encode_caption(caption)
    assert detector.encode_caption(caption) is enc
    tokens = detector.tokenizer.convert_ids_to_tokens(enc.ids)
    assert tokens == ["[CLS]", "anomaly", ".", "damage", ".", "broken", ".", "defect", ".", "contamination",
                      ".", "burn", "mark", ".", "bent", ".", "[SEP]"]  # fmt: skip
    special = detector.model.model.special_tokens.tolist()
    assert special == detector.tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])


def test_tiny_is_seeded_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = GroundingDetector.tiny(seed=0), GroundingDetector.tiny(seed=0), GroundingDetector.tiny(seed=1)
    assert torch.equal(torch.rand(1), before)
    wa, wb, wc = (d.model.model.text_projection.weight for d in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_detect_rejects_bad_input(detector: GroundingDetector) -> None:
    with pytest.raises(ValueError):
        detector.detect([image(50, 50, 0)], [])
    with pytest.raises(ValueError):
        detector.detect([image(50, 50, 0).astype(np.float32)], [DESCS])
    with pytest.raises(ValueError):
        detector.detect([image(50, 50, 0)[..., :2]], [DESCS])


# ------------------------------------------------------------------------------------------ loading


def test_missing_weights_raise_with_instructions(tmp_path) -> None:
    with pytest.raises(GroundingWeightsNotFound) as info:
        GroundingDetector.from_pretrained(cache_dir=str(tmp_path), local_files_only=True)
    message = str(info.value)
    assert "IDEA-Research/grounding-dino-tiny" in message
    assert str(tmp_path) in message
    assert "hf download IDEA-Research/grounding-dino-tiny" in message
    assert isinstance(info.value, FileNotFoundError)

    with pytest.raises(GroundingWeightsNotFound, match="local directory"):
        GroundingDetector.from_pretrained(str(tmp_path), local_files_only=True)


def test_the_engine_loads_grounding_dino_as_the_settings_say(monkeypatch) -> None:
    """The engine hands `hub_offline` to the detector; the detector itself reads no environment."""
    from service.engine import pipeline
    from service.settings import FiloSettings

    class Loaded(Exception):
        pass

    asked: list[dict] = []

    def from_pretrained(cls, name_or_dir, **kwargs):
        asked.append(kwargs)
        raise Loaded

    monkeypatch.setattr(pipeline, "build_model", lambda spec, **kwargs: (None, {}))
    monkeypatch.setattr(GroundingDetector, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the settings, not the environment, decide
    for offline in (True, False):
        with pytest.raises(Loaded):
            pipeline.InspectionEngine.from_settings(FiloSettings(hub_offline=offline, device="cpu"))
    assert [a["local_files_only"] for a in asked] == [True, False]


def test_save_and_load_round_trip_and_incomplete_checkpoint(detector: GroundingDetector, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    detector.save_pretrained(tmp_path)
    loaded = GroundingDetector.from_pretrained(str(tmp_path), local_files_only=True)
    img = image(100, 120, 11)
    assert loaded.detect([img], [DESCS]) == detector.detect([img], [DESCS])

    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["model.text_projection.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(GroundingWeightsNotFound, match="lacks"):
        GroundingDetector.from_pretrained(str(tmp_path), local_files_only=True)


# ------------------------------------------------------------------------------------------ text pass cache


def _forward(detector: GroundingDetector, images: list[np.ndarray], descs: list[str], bf16: bool = False):
    pixels = torch.cat([detector.preprocess(im) for im in images])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return detector.forward_batch(pixels, detector.encode_caption(build_caption(descs)))


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_text_pass_cache_is_bit_identical(detector: GroundingDetector, bf16: bool) -> None:
    """First call, repeated call, another batch size, another caption: logits and boxes equal to the bit."""
    cached = GroundingDetector.tiny(text_cache=2)
    cache = cached.text_cache
    images = [image(90, 90, s) for s in (20, 21)]
    steps = [(images, DESCS, "miss"), (images, DESCS, "hit"), (images[1:], DESCS, "hit"),
             (images[:1], ["crack"], "miss")]
    for imgs, descs, expect in steps:
        hits, misses = cache.hits, cache.misses
        want, got = _forward(detector, imgs, descs, bf16), _forward(cached, imgs, descs, bf16)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (len(imgs), descs)
        assert (cache.hits - hits, cache.misses - misses) == ((1, 0) if expect == "hit" else (0, 1))
    assert len(cache) == 2
    _forward(cached, images[:1], DESCS, bf16)  # DESCS is now the most recently used
    _forward(cached, images[:1], ["dent"], bf16)  # a third caption evicts the least recently used ("crack")
    assert len(cache) == 2
    misses = cache.misses
    _forward(cached, images[:1], ["crack"], bf16)
    assert cache.misses == misses + 1


def test_text_pass_cache_keys_and_bypasses(detector: GroundingDetector) -> None:
    cached = GroundingDetector.tiny(text_cache=4)
    cache, backbone = cached.text_cache, cached.model.model.text_backbone
    img = [image(100, 100, 30)]
    _forward(cached, img, DESCS)
    _forward(cached, img, DESCS, bf16=True)  # autocast is part of the key
    assert (cache.misses, cache.hits) == (2, 0)
    # the plain model's state: same names, same tensors (save_pretrained and loading see no wrapper)
    assert cached.model.state_dict().keys() == detector.model.state_dict().keys()
    # weights changed in place: a miss, and the new weights' output
    with torch.no_grad():
        backbone.embeddings.word_embeddings.weight.mul_(1.5)
        detector_w = GroundingDetector.tiny()
        detector_w.model.model.text_backbone.embeddings.word_embeddings.weight.mul_(1.5)
    got, want = _forward(cached, img, DESCS), _forward(detector_w, img, DESCS)
    assert cache.misses == 3 and torch.equal(got[0], want[0])
    # rows that differ, and gradients on, go to the backbone's own forward; return_dict=False gives a tuple
    ids = torch.tensor([[101, 1037, 102], [101, 1029, 102]])
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    zeros = torch.zeros_like(ids)
    with torch.no_grad():
        mixed = backbone(ids, mask, zeros, zeros, return_dict=True).last_hidden_state
        plain = type(backbone).forward(backbone, ids, mask, zeros, zeros, return_dict=True).last_hidden_state
        assert torch.equal(mixed, plain) and cache.misses == 3
        same = backbone(ids[:1].expand(2, -1), mask, zeros, zeros, return_dict=False)
        assert isinstance(same, tuple) and same[0].shape == (2, 3, backbone.config.hidden_size)
    out = backbone(ids[:1], mask[:1], zeros[:1], zeros[:1], return_dict=True).last_hidden_state
    assert out.requires_grad and cache.misses == 4  # the no-grad call above was the miss; this one bypassed
    cache.uninstall()
    assert "forward" not in vars(backbone) and len(cache) == 0
    assert GroundingDetector.tiny().text_cache is None  # off by default
