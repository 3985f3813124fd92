"""FiLo's HQ-Loc rules: where is the anomaly, given Grounding DINO's boxes? Pure functions, no model, no I/O.

FiLo asks Grounding DINO to find "anomaly . damage . broken . defect . contamination . <descriptions>" in
the image, keeps the boxes whose phrase names one of those words, and uses them twice (spec section 6):
the 3x3 cell of the best box picks the position words of the abnormal prompts, and every pixel outside
all boxes has its anomaly map multiplied by 0.7. The published numbers come from the released code, so
the pure functions below reproduce its quirks on purpose (string-truncated confidences, ties to the later
box, gaps between cells, Python slicing of negative box corners); each docstring says which and why.

Caption, query selection, phrases, validity, position, suppression mask, box mapping: tensors and numpy
in and out, pinned down by the tests against hand-computed numbers. One deliberate difference from the
released code: a box's shown phrase leaves out the tokenizer's special tokens ("scratches", not
"scratches [SEP]"), while its validity is still judged on the released phrase (``phrase_from_posmap``). The model that produces the boxes is
``models.grounding.detector``.

Frames: "frame" means the ``size`` x ``size`` (518) CLIP input frame of ``models.frame``; boxes from the
detector are normalised (cx, cy, w, h) relative to the whole original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from models.frame import FrameGeometry
from models.prompts import POSITIONS  # row-major 3x3: "top left", "top", ..., "bottom right"

GENERAL_WORDS: tuple[str, ...] = ("anomaly", "damage", "broken", "defect", "contamination")
RELEASED_FRAME = 518
RELEASED_CELL_ENDS = (172, 344, 517)  # inclusive last pixel of each column/row in the released code
PHRASE_RIGHT_IDX = 255  # get_phrases_from_posmap's right_idx: text positions >= 255 never form phrases

BoxesLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


def build_caption(descriptions: Sequence[str]) -> str:
    """The released grounding caption: general words then descriptions, " . "-joined, lowercased, with a final ".".

    Lowercasing here (not only in the uncased tokenizer) matters because ``is_valid_phrase`` compares the
    decoded, lowercase phrase against the descriptions case-sensitively, as the released code did.
    """
    caption = " . ".join(list(GENERAL_WORDS) + list(descriptions)).lower().strip()
    return caption if caption.endswith(".") else caption + "."


def keep_queries(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_threshold: float = 0.25,
    area_threshold: float = 0.7,
) -> torch.Tensor:
    """(..., nq) bool: the queries the released code keeps, for one image (nq, T) or a batch (B, nq, T).

    probs: (..., nq, T) sigmoid token probabilities; boxes: (..., nq, 4) normalised (cx, cy, w, h).
    A query is kept when its best token probability is > ``box_threshold`` and its normalised area w*h is
    < ``area_threshold`` (boxes covering most of the image are the object, not its defect). When an image
    keeps nothing, its single query with the best probability is kept (first one on ties, as
    ``torch.argmax``). Tensor operations only: no host sync, whatever the batch size.
    """
    probs = torch.as_tensor(probs)
    boxes = torch.as_tensor(boxes)
    best = probs.max(dim=-1).values
    keep = (best > box_threshold) & (boxes[..., 2] * boxes[..., 3] < area_threshold)
    fallback = torch.nn.functional.one_hot(best.argmax(dim=-1), best.shape[-1]).bool()
    return keep | (fallback & ~keep.any(dim=-1, keepdim=True))


def select_queries(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    box_threshold: float = 0.25,
    area_threshold: float = 0.7,
) -> torch.Tensor:
    """Indices (ascending, LongTensor) of the queries the released code keeps for one image.

    probs: (nq, T); boxes: (nq, 4); the rule is ``keep_queries``'s.
    """
    return keep_queries(probs, boxes, box_threshold, area_threshold).nonzero(as_tuple=True)[0].to(torch.long)


def phrase_posmap(token_probs: torch.Tensor, n_ids: int, text_threshold: float = 0.25) -> torch.Tensor:
    """(..., T) bool: the text positions that form a phrase, for one query (T,) or many (K, T).

    The released ``get_phrases_from_posmap`` rule: probability > ``text_threshold``, never position 0
    ([CLS]) nor positions >= 255; positions past the caption's ``n_ids`` tokens (probability 0 anyway) are
    off too. A new tensor: the caller's probabilities are not modified.
    """
    posmap = torch.as_tensor(token_probs) > text_threshold
    posmap[..., 0:1] = False
    posmap[..., min(PHRASE_RIGHT_IDX, n_ids) :] = False
    return posmap


def dropped_special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special ids that never appear in a shown phrase: ``all_special_ids`` less [UNK].

    [CLS], [SEP], [PAD], [MASK] (for BERT) are markup, not words of the caption. [UNK] stays: it stands
    for a caption word the vocabulary lacks, and dropping it would join the words around it.
    """
    return frozenset(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


class Phrase(NamedTuple):
    """One query's phrase: ``shown`` without special tokens, ``released`` exactly as the released code
    decoded it ([SEP] included), which is what ``is_valid_phrase`` judges (see ``phrase_from_posmap``)."""

    shown: str
    released: str


def _decode_phrase(token_ids: tuple[int, ...], tokenizer, drop: frozenset[int]) -> Phrase:
    released = tokenizer.decode(list(token_ids))
    shown_ids = [t for t in token_ids if t not in drop]
    shown = released if len(shown_ids) == len(token_ids) else tokenizer.decode(shown_ids)
    return Phrase(shown, released)


def phrase_from_posmap(
    token_probs: torch.Tensor,
    input_ids: Sequence[int],
    tokenizer,
    text_threshold: float = 0.25,
    keep_special: bool = False,
) -> str:
    """One query's phrase: decode the caption tokens whose probability is > threshold (``phrase_posmap``).

    token_probs: (T,) one query's probabilities over text positions (T = max_text_len = 256 for the HF model;
    position i is token i of the caption's own ``input_ids``). Decoding is the tokenizer's plain ``decode``:
    wordpieces join ("dent ##s" -> "dents").

    Deviation from the released ``get_phrases_from_posmap``: special tokens (``dropped_special_ids``: [SEP],
    [PAD], [MASK]; [CLS] is position 0, never used) are left out, so a box is labelled "scratches", not
    "scratches [SEP]". ``keep_special=True`` gives the released phrase. The released phrase is still the one
    whose validity counts (``Phrase``, ``GroundingDetector``): ``is_valid_phrase`` is a substring test, and a
    description may end where [SEP] begins: VisA macaroni1's released "uneven shape " (trailing space)
    occurs in "uneven shape [SEP]" but not in "uneven shape", so judging the shown phrase would change
    which boxes are valid, and with them the position and the suppression of published results.
    """
    positions = phrase_posmap(token_probs, len(input_ids), text_threshold).nonzero(as_tuple=True)[0].tolist()
    token_ids = [int(input_ids[i]) for i in positions]
    if not keep_special:
        drop = dropped_special_ids(tokenizer)
        token_ids = [t for t in token_ids if t not in drop]
    return tokenizer.decode(token_ids)


def phrases_from_posmaps(
    token_probs: torch.Tensor,
    input_ids: Sequence[int],
    tokenizer,
    text_threshold: float = 0.25,
    memo: dict[tuple[int, ...], Phrase] | None = None,
) -> list[Phrase]:
    """Every query's ``Phrase`` at once: (K, T) probabilities of K queries over one caption's positions.

    Equal, query by query, to ``phrase_from_posmap`` (shown) and ``phrase_from_posmap(keep_special=True)``
    (released). The posmaps are one tensor operation; the distinct ones are found by one ``np.unique`` over
    their packed bits (a sort of K short byte strings, where ``torch.unique(dim=0)`` sorts whole rows), and
    each distinct set of token ids is decoded once (queries share token sets far more often than not).
    ``memo`` (token ids -> Phrase; a ``models.lru.LRUDict`` bounds it) carries decodings across calls for the
    same tokenizer: decoding depends on the token ids and the tokenizer alone.
    """
    probs = torch.as_tensor(token_probs)
    if probs.shape[0] == 0:
        return []
    memo = {} if memo is None else memo
    posmap = phrase_posmap(probs, len(input_ids), text_threshold).cpu().numpy()
    packed = np.packbits(posmap, axis=1)
    _, first, inverse = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))).ravel(),
                                  return_index=True, return_inverse=True)
    row_of, position_of = np.nonzero(posmap[first])  # row-major: each distinct row's positions in order
    token_sets = np.split(np.asarray(input_ids, dtype=np.int64)[position_of],
                          np.searchsorted(row_of, np.arange(1, len(first))))
    drop = None
    phrases = []
    for token_ids in token_sets:
        key = tuple(token_ids.tolist())
        phrase = memo.get(key)
        if phrase is None:
            drop = dropped_special_ids(tokenizer) if drop is None else drop
            phrase = memo[key] = _decode_phrase(key, tokenizer, drop)
        phrases.append(phrase)
    return [phrases[i] for i in inverse.ravel().tolist()]


def is_valid_phrase(phrase: str, descriptions: Sequence[str]) -> bool:
    """True when a description or a general word occurs in the phrase (released ``elem in phrase``).

    Case-sensitive on purpose: the phrase is lowercase, so a description written with a capital letter
    ("Uneven coating") never matches, as in the released code.
    """
    return any(word in phrase for word in list(descriptions) + list(GENERAL_WORDS))


def released_confidence(p: float) -> float:
    """The confidence the released code ranks boxes by: ``float(str(p)[:4])``.

    The released code printed ``str(logit.max().item())[:4]`` into the phrase and parsed it back, so the
    ranking sees the float32 probability (as a Python float) cut to four characters: 0.4567 -> 0.45,
    float32(0.45) = 0.4499999881 -> 0.44, 1.0 -> 1.0. For p >= 0.1 that is truncation to two decimals.
    Below 1e-4 Python prints scientific notation and the cut is nonsense (9.9999e-06 -> 9.99), reproduced
    as is; where the released parse would raise ("1.2e"), this returns 0.0. Such values only occur for the
    lone fallback box of ``select_queries``, which is chosen whatever its value.
    """
    try:
        return float(str(float(p))[:4])
    except ValueError:
        return 0.0


def cell_bounds(size: int = RELEASED_FRAME) -> tuple[tuple[int, int], ...]:
    """Inclusive (first, last) pixel of the three columns (= rows) of the position grid.

    For 518 these are the released constants (0, 172), (173, 344), (345, 517); the half-integers between
    them (172.5, 344.5) belong to no cell. For another frame size S the two inner ends are scaled,
    ``round(172 * S / 518)`` and ``round(344 * S / 518)``, the last is S - 1 and each cell starts one pixel
    after the previous ends, which keeps the same one-pixel gaps.
    """
    if size == RELEASED_FRAME:
        ends = RELEASED_CELL_ENDS
    else:
        ends = (round(172 * size / RELEASED_FRAME), round(344 * size / RELEASED_FRAME), size - 1)
    return (0, ends[0]), (ends[0] + 1, ends[1]), (ends[1] + 1, ends[2])


def _cell_index(value: float, bounds: tuple[tuple[int, int], ...]) -> int | None:
    for index, (first, last) in enumerate(bounds):
        if first <= value <= last:
            return index
    return None


def position_of_point(x: float, y: float, size: int = RELEASED_FRAME) -> str | None:
    """Position word of the cell holding frame point (x, y); None in a gap between cells or off the frame."""
    bounds = cell_bounds(size)
    col, row = _cell_index(x, bounds), _cell_index(y, bounds)
    if col is None or row is None:
        return None
    return POSITIONS[row * 3 + col]


def best_valid_box(
    confidences: Sequence[float] | torch.Tensor, valid: Sequence[bool] | torch.Tensor
) -> int | None:
    """Index of the box the released loop picks: highest ``released_confidence`` among valid boxes.

    The loop starts from max_pred = 0 and replaces on ``>=``, so ties go to the later box. None when no
    box is valid.
    """
    confs = confidences.tolist() if isinstance(confidences, torch.Tensor) else confidences
    flags = valid.tolist() if isinstance(valid, torch.Tensor) else valid
    best, max_pred = None, 0.0
    for index, (conf, ok) in enumerate(zip(confs, flags)):
        if not ok:
            continue
        score = released_confidence(float(conf))
        if score >= max_pred:
            best, max_pred = index, score
    return best


def choose_position(
    frame_boxes: BoxesLike,
    confidences: Sequence[float] | torch.Tensor,
    valid: Sequence[bool] | torch.Tensor,
    size: int = RELEASED_FRAME,
) -> str | None:
    """Position word for the abnormal prompts, or None meaning "average all nine positions".

    frame_boxes: (n, 4) x1, y1, x2, y2 in the ``size`` frame; confidences: (n,) max token probabilities
    (the float32 values, see ``released_confidence``); valid: (n,) phrase validity. The centre of the best
    valid box (see ``best_valid_box``) picks the cell; no valid box gives the frame centre, "center".
    """
    index = best_valid_box(confidences, valid)
    if index is None:
        return "center"
    x1, y1, x2, y2 = _as_boxes(frame_boxes)[index].tolist()
    return position_of_point((x1 + x2) / 2, (y1 + y2) / 2, size)


def _as_boxes(frame_boxes: BoxesLike) -> torch.Tensor:
    """(n, 4) float64 tensor from a tensor, array or nested list; an empty input gives (0, 4)."""
    if isinstance(frame_boxes, torch.Tensor):
        boxes = frame_boxes.detach().cpu().to(torch.float64)
    else:
        boxes = torch.as_tensor(np.asarray(frame_boxes, dtype=np.float64))
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {tuple(boxes.shape)}")
    return boxes


def suppression_keep_mask(
    frame_boxes: BoxesLike,
    size: int = RELEASED_FRAME,
    semantics: Literal["released", "clamp"] = "released",
) -> torch.Tensor:
    """(size, size) bool: True where the anomaly map is kept, False where it is multiplied by 0.7.

    "released" reproduces ``mask[int(y1):int(y2), int(x1):int(x2)] = True`` per box: ``int`` truncates toward
    zero (-0.4 -> 0, so a slight overflow is harmless) and a negative start is a Python/torch slice index
    counted from the END (-3 -> size - 3), which for a box overflowing the top or left edge by a pixel or
    more usually makes its region empty: that box keeps nothing (other boxes still keep theirs). Published
    numbers were made this way. "clamp" (for user-given boxes) covers integer pixel x with x1 <= x < x2, clamped to the
    frame. No box at all gives all False: the whole map is multiplied by 0.7 (released).
    """
    if semantics not in ("released", "clamp"):
        raise ValueError(f"semantics must be 'released' or 'clamp', got {semantics!r}")
    boxes = _as_boxes(frame_boxes)
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError("boxes must be finite")  # what int()/math.ceil() of a NaN or inf corner raised
    corners = boxes.trunc() if semantics == "released" else boxes.ceil()
    if semantics == "released":  # a Python slice index: a negative one counts from the end
        corners = torch.where(corners < 0, corners + size, corners)
    c0, r0, c1, r1 = corners.clamp(0, size).to(torch.long).unbind(dim=1)
    return _union_of_rectangles(r0, r1, c0, c1, size)


def _union_of_rectangles(r0: torch.Tensor, r1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor,
                         size: int) -> torch.Tensor:
    """(size, size) bool: pixels in any rectangle rows r0 <= r < r1, columns c0 <= c < c1 (bounds in 0..size).

    A two-dimensional difference array, summed: one pass over the boxes and one over the frame, however
    many boxes overlap, instead of one slice assignment per box (stand-in weights keep hundreds).
    """
    some = (r0 < r1) & (c0 < c1)
    r0, r1, c0, c1 = r0[some], r1[some], c0[some], c1[some]
    edges = torch.zeros(size + 1, size + 1, dtype=torch.int32)
    ones = torch.ones(len(r0), dtype=torch.int32)
    for rows, cols, sign in ((r0, c0, 1), (r0, c1, -1), (r1, c0, -1), (r1, c1, 1)):
        edges.index_put_((rows, cols), sign * ones, accumulate=True)
    return edges.cumsum(0).cumsum(1)[:size, :size] > 0


def boxes_norm_to_frame(
    boxes_cxcywh_norm: BoxesLike,
    orig_hw: tuple[int, int],
    size: int = RELEASED_FRAME,
    square: bool = False,
) -> torch.Tensor:
    """(n, 4) normalised (cx, cy, w, h) -> (n, 4) x1, y1, x2, y2 in the ``size`` frame (not clipped).

    ``square=True`` is the released mapping: scale by ``size`` as if the image were square (same float
    operations and order: scale, then ``xy -= wh / 2``, then ``wh += xy``), wrong for non-square images.
    The default scales by the original (W, H) the same way and then applies the CLIP resize + centre crop
    (``FrameGeometry``), so boxes land where their pixels land in the frame. Float dtype is kept.
    """
    boxes = torch.as_tensor(boxes_cxcywh_norm)
    boxes = (boxes if boxes.is_floating_point() else boxes.to(torch.float32)).clone().reshape(-1, 4)
    height, width = (size, size) if square else orig_hw
    boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    if square:
        return boxes
    return FrameGeometry(int(orig_hw[0]), int(orig_hw[1]), size).boxes_to_frame(boxes)


@dataclass(frozen=True)
class Detection:
    """One kept Grounding DINO query.

    box_norm: (cx, cy, w, h) relative to the whole original image; confidence: max token probability
    (float32 value as a Python float); phrase: decoded tokens above the text threshold; valid: whether
    the phrase names a description or a general word.
    """

    box_norm: tuple[float, float, float, float]
    confidence: float
    phrase: str
    valid: bool


@dataclass(frozen=True)
class CaptionEncoding:
    """A tokenised caption: (1, L) tensors for the model and the plain id list for phrase decoding."""

    caption: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    @property
    def ids(self) -> list[int]:
        return self.input_ids[0].tolist()


def localise(
    detections: Sequence[Detection],
    orig_hw: tuple[int, int],
    size: int = RELEASED_FRAME,
    square: bool = False,
) -> tuple[str | None, torch.Tensor, torch.Tensor]:
    """HQ-Loc for one image: (position word or None, (n, 4) frame boxes of all detections, (n,) valid mask).

    Glue over the pure functions, in the released code's float32 arithmetic: map boxes into the frame
    and choose the position; ``frame[valid]`` is what ``suppression_keep_mask`` takes.
    """
    flags = [d.valid for d in detections]
    valid = torch.from_numpy(np.array(flags, dtype=bool))
    if not detections:
        return "center", torch.zeros(0, 4), valid
    # through numpy: a fifth of torch.tensor's time on a list of hundreds of tuples, same float32 values
    boxes = torch.from_numpy(np.array([d.box_norm for d in detections], dtype=np.float32))
    frame = boxes_norm_to_frame(boxes, orig_hw, size, square)
    position = choose_position(frame, [d.confidence for d in detections], flags, size)
    return position, frame, valid
