"""Grounding DINO through Hugging Face transformers: loading (never random weights for real ones), batching,
and turning its outputs into ``hqloc.Detection`` records. The localisation rules themselves are ``hqloc``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.constants import DEFAULT_GROUNDING_MODEL
from models.errors import WeightsNotFoundError
from models.grounding import deformable_attention as msda
from models.grounding.hqloc import (
    RELEASED_FRAME,
    CaptionEncoding,
    Detection,
    Phrase,
    build_caption,
    is_valid_phrase,
    keep_queries,
    phrases_from_posmaps,
)
from models.grounding.text_cache import TextPassCache
from models.lru import LRUDict
from models.standin import STANDIN_BANNER, STANDIN_KEY

log = logging.getLogger(__name__)

# Grounding DINO's image processor at FiLo's scale (`make_image_processor`; the engine's GPU path mirrors it)
PROCESSOR_SHORTEST_EDGE = RELEASED_FRAME
PROCESSOR_LONGEST_EDGE = 1333
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TINY_CONFIG = CONFIG_DIR / "grounding-dino-tiny.json"
TINY_VOCAB = CONFIG_DIR / "bert-tiny-vocab.txt"
PHRASE_MEMO_SIZE = 4096  # decoded token sets kept per detector (a few hundred bytes each)

class GroundingWeightsNotFound(WeightsNotFoundError):
    """Grounding DINO weights (or tokenizer) are not available locally and could not be fetched.

    A ``FileNotFoundError`` (through ``models.errors.WeightsNotFoundError``) so the service handles it like
    every other missing-weights case. Never answered by substituting random weights.
    """


# Grounding DINO ties its box/class heads across decoder layers (stored once in the checkpoint) and
# carries non-learned buffers; transformers may list those as "missing" although nothing is random.
_TIED_OR_BUFFER = re.compile(r"(bbox_embed|class_embed)\.\d+\.|position_ids$|num_batches_tracked$")


def _missing_weights_message(name_or_dir: str, cache_dir: str | None, reason: str) -> str:
    from huggingface_hub import constants

    if Path(name_or_dir).is_dir():
        looked = f"Looked in the local directory {name_or_dir}."
    else:
        cache = cache_dir or constants.HF_HUB_CACHE
        looked = f"Looked in the Hugging Face cache at {cache} (set HF_HOME or HF_HUB_CACHE to move it)."
    return (
        f"Grounding DINO weights {name_or_dir!r} are not available: {reason}\n"
        f"{looked}\n"
        f"Fetch them on a machine with internet access with `hf download {DEFAULT_GROUNDING_MODEL}` "
        f"(older clients: `huggingface-cli download {DEFAULT_GROUNDING_MODEL}`) and copy the cache over, "
        "or pass a local directory holding config.json, the weights and the tokenizer files. "
        "FiLo Inspect never runs with random grounding weights."
    )


def make_image_processor(shortest_edge: int = PROCESSOR_SHORTEST_EDGE, longest_edge: int = PROCESSOR_LONGEST_EDGE):
    """Grounding DINO's image processor at FiLo's scale: shorter side 518 (longest <= 1333), ImageNet mean/std.

    Built here rather than read from the hub, whose preprocessor_config says shortest edge 800.
    """
    from transformers import GroundingDinoImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return GroundingDinoImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def load_tiny_config():
    """The tiny test ``GroundingDinoConfig`` from ``models/configs`` (keys starting with "_" are notes)."""
    from transformers import GroundingDinoConfig

    data = {k: v for k, v in json.loads(TINY_CONFIG.read_text()).items() if not k.startswith("_")}
    return GroundingDinoConfig.from_dict(data)


def load_tiny_tokenizer():
    """Lowercasing BERT WordPiece tokenizer over the in-repo vocab (ids of the specials as in bert-base-uncased).

    Note: transformers 5's ``BertTokenizer`` takes the file as ``vocab=``; ``vocab_file=`` is silently
    ignored there and leaves a 5-token vocabulary.
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=str(TINY_VOCAB), do_lower_case=True)
    if tokenizer.vocab_size < 100:
        raise RuntimeError(f"tiny vocab {TINY_VOCAB} did not load ({tokenizer.vocab_size} tokens)")
    return tokenizer


# Dynamo settings the whole-model compile runs under. transformers checks each deformable-attention layer's
# spatial shapes against the sequence length with `torch._check_tensor_all`, an `.item()` that breaks the graph
# unless scalar outputs are captured (then it is one runtime assert inside the graph). Each image size and batch
# size compiles once (static shapes); past the recompile limit dynamo would quietly run the frame eagerly, so
# the limit is far above the batch sizes and image sizes one process sees.
COMPILE_CONFIG = {"capture_scalar_outputs": True, "recompile_limit": 256}


def compile_whole(model: torch.nn.Module, backend: str = "inductor"):
    """``torch.compile`` of the whole Grounding DINO model, static shapes, called under ``COMPILE_CONFIG`` (one
    graph on the tiny test model: tests/test_grounding_compile.py counts its graph breaks with
    ``torch._dynamo.explain``)."""
    compiled = torch.compile(model, backend=backend, dynamic=False)

    def run(**inputs):
        with torch._dynamo.config.patch(**COMPILE_CONFIG):
            return compiled(**inputs)

    return run


class GroundingDetector:
    """Grounding DINO for HQ-Loc: images + descriptions in, ``Detection`` lists out.

    Holds the ``GroundingDinoForObjectDetection`` model, its image processor and BERT tokenizer, the device
    and the thresholds (``box_threshold``, ``text_threshold``, ``area_threshold``, all settable attributes).
    Images go through the image processor one by one and are batched only with others of the same resized
    size and the same caption, so no padding ever enters a batch and batched results equal single ones.
    ``text_cache`` > 0 keeps the BERT text pass of that many captions (``text_cache.TextPassCache``) instead
    of running it again for every batch; 0 (the default) runs the plain model.

    ``deformable_attention`` ("auto", "triton", "hub", "pytorch": ``deformable_attention.choose``) is chosen
    after the model is on ``device``, for that device; ``self.deformable_attention`` says what its layers run.
    ``compile`` runs the whole model through ``torch.compile`` (``compiled_view`` makes a compiled view of an
    eager detector).
    """

    def __init__(
        self,
        model,
        image_processor,
        tokenizer,
        device: str | torch.device = "cpu",
        box_threshold: float = 0.25,
        text_threshold: float = 0.25,
        area_threshold: float = 0.7,
        max_batch: int = 8,
        caption_cache_size: int = 256,
        text_cache: int = 0,
        deformable_attention: str = "auto",
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # after the move: transformers chose the layers' forward for the device the model was loaded on
        self.deformable_attention = msda.install(self.model, deformable_attention)
        log.info("Grounding DINO on %s: deformable attention %s", self.device, self.deformable_attention)
        self.compiled: str | None = None  # the torch.compile backend of the whole model, None: eager
        self._run = self.model
        if compile:
            self.compiled, self._run = "inductor", compile_whole(self.model)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.area_threshold = area_threshold
        self.max_batch = max_batch
        # decoded token sets, for every caption and batch of this tokenizer: with trained weights a category
        # yields a handful of phrases, decoded once
        self.phrase_memo: LRUDict[tuple[int, ...], Phrase] = LRUDict(PHRASE_MEMO_SIZE)
        self._caption_cache: LRUDict[str, CaptionEncoding] = LRUDict(caption_cache_size)
        self.standin = False  # loaded from stand-in weights (models/standin.py): reported, never a real result
        self.text_cache: TextPassCache | None = None
        if text_cache > 0:
            self.text_cache = TextPassCache(self.model.model.text_backbone, text_cache).install()

    # ----- construction -----

    def compiled_view(self, backend: str = "inductor") -> GroundingDetector:
        """This detector with the whole model run through ``torch.compile`` (``compile_whole``; the model, its
        weights, memos and caches shared; the first batch of each shape compiles). ``backend`` other than
        inductor is for tests: "aot_eager" captures the same graph without generating code."""
        if self.compiled == backend:
            return self
        view = copy.copy(self)
        view.compiled, view._run = backend, compile_whole(self.model, backend)
        return view

    def use_deformable_attention(self, choice: str) -> str | None:
        """Give the model's deformable-attention layers another implementation (``deformable_attention.choose``)
        for the device the model is on; returns what they run now. Benchmarks compare them on one set of weights;
        a compiled view made earlier keeps what it traced."""
        self.deformable_attention = msda.install(self.model, choice)
        return self.deformable_attention

    def runtime(self) -> dict[str, str]:
        """What runs: the deformable attention on the device the model is on now, compiled or eager."""
        compiled = "eager" if not self.compiled else "compiled" if self.compiled == "inductor" \
            else f"compiled ({self.compiled})"
        return {"deformable_attention": msda.implementation(self.model) or "none", "grounding": compiled}

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str = DEFAULT_GROUNDING_MODEL,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        cache_dir: str | None = None,
        **kwargs,
    ) -> GroundingDetector:
        """Load real weights (hub id or local directory); with ``local_files_only`` the hub is never asked. The
        caller decides that from its configuration: this module reads no environment.

        Raises ``GroundingWeightsNotFound`` when the files are missing or the checkpoint lacks weights the
        model needs (transformers would otherwise fill them randomly). ``kwargs`` go to ``__init__``
        (thresholds, max_batch, text_cache, deformable_attention, compile).
        """
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        name_or_dir = str(name_or_dir)
        try:
            model, info = GroundingDinoForObjectDetection.from_pretrained(
                name_or_dir, local_files_only=local_files_only, cache_dir=cache_dir, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_dir, local_files_only=local_files_only, cache_dir=cache_dir
            )
        except OSError as exc:
            raise GroundingWeightsNotFound(
                _missing_weights_message(name_or_dir, cache_dir, f"{type(exc).__name__}: {exc}")
            ) from exc
        missing = [k for k in (info.get("missing_keys") or []) if not _TIED_OR_BUFFER.search(k)]
        if missing:
            raise GroundingWeightsNotFound(
                _missing_weights_message(
                    name_or_dir, cache_dir, f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}"
                )
            )
        detector = cls(model, make_image_processor(), tokenizer, device=device, **kwargs)
        detector.standin = getattr(model.config, STANDIN_KEY, None) is not None
        if detector.standin:
            log.warning("%s (Grounding DINO %s)", STANDIN_BANNER, name_or_dir)
        return detector

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", seed: int = 0, **kwargs) -> GroundingDetector:
        """Randomly initialised tiny model from ``models/configs`` for tests and demos (no download).

        The global torch RNG is left as it was: the init runs under ``torch.random.fork_rng``.
        """
        from transformers import GroundingDinoForObjectDetection

        config = load_tiny_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GroundingDinoForObjectDetection(config)
        return cls(model, make_image_processor(), load_tiny_tokenizer(), device=device, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model and tokenizer so that ``from_pretrained(directory)`` loads them back."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    # ----- text side -----

    def encode_caption(self, caption: str) -> CaptionEncoding:
        """Tokenise a caption, cached by caption (LRU).

        Only the tokenisation is cached here. ``GroundingDinoModel.forward`` always runs ``text_backbone``
        on ``input_ids`` and has no argument for precomputed text features (``encoder_outputs`` is the
        image-text fused encoder, image dependent); the BERT pass is kept by ``TextPassCache`` when the
        detector is built with ``text_cache`` > 0.
        Captions are truncated to the model's ``max_text_len`` (256): the detection head's text mask is
        not cut by the model, so a longer caption would fail there.
        """
        cached = self._caption_cache.get(caption)
        if cached is not None:
            return cached
        max_len = int(self.model.config.max_text_len)
        enc = self.tokenizer(caption, return_tensors="pt", truncation=True, max_length=max_len)
        token_type_ids = enc.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(enc["input_ids"])
        encoding = CaptionEncoding(caption, enc["input_ids"], enc["attention_mask"], token_type_ids)
        self._caption_cache[caption] = encoding
        return encoding

    # ----- image side -----

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, h, w) normalised pixels of one HxWx3 uint8 RGB image, shorter side 518."""
        if (
            not isinstance(image, np.ndarray)
            or image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
        ):
            raise ValueError("images must be HxWx3 uint8 RGB numpy arrays")
        out = self.image_processor(images=image, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"]

    # ----- detection -----

    @torch.no_grad()
    def forward_batch(
        self, pixel_values: torch.Tensor, caption: CaptionEncoding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, h, w) pixels, one caption -> (probs (B, nq, T), boxes (B, nq, 4) normalised cx, cy, w, h).

        T is ``max_text_len``; position i < L is caption token i, positions >= L have probability 0.
        """
        batch = pixel_values.shape[0]
        outputs = self._run(
            pixel_values=pixel_values.to(self.device),
            input_ids=caption.input_ids.expand(batch, -1).to(self.device),
            attention_mask=caption.attention_mask.expand(batch, -1).to(self.device),
            token_type_ids=caption.token_type_ids.expand(batch, -1).to(self.device),
        )
        return outputs.logits.sigmoid().float().cpu(), outputs.pred_boxes.float().cpu()

    def detections_from_outputs(
        self, probs: torch.Tensor, boxes: torch.Tensor, input_ids: Sequence[int], descriptions: Sequence[str]
    ) -> list[Detection]:
        """One image's (nq, T) probs and (nq, 4) boxes -> its kept, decoded, checked detections."""
        return self.detections_from_batch(probs[None], boxes[None], input_ids, [descriptions])[0]

    def detections_from_batch(
        self,
        probs: torch.Tensor,
        boxes: torch.Tensor,
        input_ids: Sequence[int],
        descriptions: Sequence[Sequence[str]],
        memo: dict[tuple[int, ...], Phrase] | None = None,
    ) -> list[list[Detection]]:
        """(B, nq, T) probs and (B, nq, 4) boxes of B images of one caption -> each image's detections.

        Per image, the same as the plain loop over ``select_queries`` with ``phrase_from_posmap`` and
        ``is_valid_phrase`` for each kept query (kept order, float32 confidences as Python floats), but as
        whole-batch tensor operations with one host transfer each for the kept confidences and boxes, and
        each distinct token set decoded once (``phrases_from_posmaps``). A detection's ``phrase`` is the
        shown phrase (no [SEP]); its ``valid`` is judged on the released phrase (``hqloc.Phrase``), so
        validity, position and suppression are the released ones. ``memo`` (see ``phrases_from_posmaps``)
        carries decoded phrases over batches and captions.
        """
        if len(descriptions) != probs.shape[0]:
            raise ValueError(f"{probs.shape[0]} images but {len(descriptions)} description lists")
        image_of, query_of = keep_queries(probs, boxes, self.box_threshold, self.area_threshold).nonzero(
            as_tuple=True
        )
        kept = probs[image_of, query_of]
        phrases = phrases_from_posmaps(kept, input_ids, self.tokenizer, self.text_threshold, memo)
        confidences = kept.max(dim=1).values.tolist()
        kept_boxes = boxes[image_of, query_of].tolist()
        valid: dict[tuple[int, Phrase], bool] = {}
        results: list[list[Detection]] = [[] for _ in range(probs.shape[0])]
        for image, box, confidence, phrase in zip(image_of.tolist(), kept_boxes, confidences, phrases, strict=True):
            ok = valid.get((image, phrase))
            if ok is None:
                ok = valid[(image, phrase)] = is_valid_phrase(phrase.released, descriptions[image])
            results[image].append(Detection(tuple(box), confidence, phrase.shown, ok))
        return results

    def detect(
        self, images: Sequence[np.ndarray], descriptions: Sequence[Sequence[str]],
        pixels: Sequence[torch.Tensor | None] | None = None,
    ) -> list[list[Detection]]:
        """Detections per image; ``descriptions[i]`` are image i's category descriptions (caption words).

        Images sharing resized size and caption run together (up to ``max_batch``); the order of the
        result follows ``images``. ``pixels[i]``, when given, is ``preprocess(images[i])`` done
        ahead (a worker does it in other threads while the previous batch runs).
        """
        if len(images) != len(descriptions):
            raise ValueError(f"{len(images)} images but {len(descriptions)} description lists")
        given = list(pixels) if pixels is not None else [None] * len(images)
        pixels = [self.preprocess(image) if pix is None else pix for image, pix in zip(images, given, strict=True)]
        captions = [build_caption(list(d)) for d in descriptions]
        groups: dict[tuple[int, int, str], list[int]] = {}
        for index, (pix, caption) in enumerate(zip(pixels, captions)):
            groups.setdefault((pix.shape[-2], pix.shape[-1], caption), []).append(index)

        results: list[list[Detection]] = [[] for _ in images]
        for (_, _, caption), members in groups.items():
            encoding = self.encode_caption(caption)
            ids = encoding.ids
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                probs, boxes = self.forward_batch(torch.cat([pixels[i] for i in chunk]), encoding)
                chunk_results = self.detections_from_batch(probs, boxes, ids, [descriptions[i] for i in chunk],
                                                           self.phrase_memo)
                for index, dets in zip(chunk, chunk_results, strict=True):
                    results[index] = dets
        return results
