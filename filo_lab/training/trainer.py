"""Training FiLo's heads on an auxiliary dataset (spec section 8, the released recipe).

FiLo is zero-shot at test time because everything it learns is category-agnostic: linear and MMCI
heads that map CLIP patch features into the text space, CoCoOp prompt contexts, and an adapter on
the global image feature. They are learned on one benchmark's *test* split (the released recipe:
MVTec AD to test on VisA and vice versa) and then used on categories never seen.

Two phases, as the released code runs them:
- Phase 1 (segmentation): prompt learners (lr 1e-3) and decoder_linear + decoder_cov (lr 1e-4),
  AdamW betas (0.5, 0.999), batch 1, all nine positions averaged, adapter not applied. Loss, summed
  over the 7 two-channel softmax maps at S x S before smoothing: focal + dice(abnormal, mask) +
  dice(normal, 1 - mask).
- Phase 2 (image level): the adapter alone (lr 1e-5), cross-entropy of text_probs / 0.07 against the
  image label. Text features are computed without gradient, so only the adapter's image feature learns.

The CLIP backbone stays frozen throughout (its forward runs under no_grad; on CUDA in bf16 autocast).
After every epoch the heads are saved in the project's checkpoint format (`epoch_N.safetensors`,
`last.safetensors`) together with a resume state (`train_state.json` + `train_state.pt` holding the
optimizer's tensors, read back with `weights_only=True`), and a line is appended to `loss_log.jsonl`
(plus a redrawn `loss.png`). Epochs are numbered globally: 1..E1 are phase 1, E1+1..E1+E2 phase 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from descriptions import CategoryCatalog, bundled_version, category_fingerprint
from filo_lab.data import (
    DEFAULT_MASK_INTERPOLATION,
    MASK_INTERPOLATIONS,
    Sample,
    catalog_name,
    detect_layout,
    limit_per_category,
    load_sample,
    read_dataset,
    resize_crop_mask,
)
from filo_lab.training.losses import ADAPTER_TEMPERATURE, adapter_loss, segmentation_loss
from models.checkpoint import apply_head_state, load_checkpoint, save_checkpoint
from models.clip_backbone import make_preprocess
from models.dual_path import EncoderOutput
from models.filo import FiLoModel

log = logging.getLogger(__name__)

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.pt"
LOSS_LOG = "loss_log.jsonl"
LOSS_PLOT = "loss.png"
LAST = "last.safetensors"
PHASE1_PREFIXES = ("normal_prompt_learner.", "abnormal_prompt_learner.", "decoder_linear.", "decoder_cov.")
PHASE2_PREFIXES = ("adapter.",)


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in train_state.json and checkpoint metadata."""

    data: str
    out: str
    layout: str = "auto"
    categories: list[str] | None = None
    split: str = "test"  # the released recipe trains on the auxiliary dataset's test split
    epochs_phase1: int = 15
    epochs_phase2: int = 5
    lr_prompt: float = 1e-3
    lr_decoder: float = 1e-4
    lr_adapter: float = 1e-5
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.01  # torch's AdamW default, which the released code keeps
    batch_size: int = 1
    max_images: int | None = None  # per category, evenly spaced (see limit_per_category)
    seed: int = 0
    temperature: float = ADAPTER_TEMPERATURE
    mask_interpolation: str = DEFAULT_MASK_INTERPOLATION
    workers: int = 0
    keep_last: int | None = None  # keep only the newest K epoch_N files (None: keep all)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON round trips give lists
        for name in ("epochs_phase1", "epochs_phase2", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.mask_interpolation not in MASK_INTERPOLATIONS:
            raise ValueError(f"mask_interpolation must be one of {MASK_INTERPOLATIONS}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be at least 1")

    @property
    def total_epochs(self) -> int:
        return self.epochs_phase1 + self.epochs_phase2

    def phase_of(self, epoch: int) -> int:
        """Phase (1 or 2) of a global epoch number (1-based)."""
        return 1 if epoch <= self.epochs_phase1 else 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class EpochRecord:
    epoch: int
    phase: int
    loss: float
    parts: dict[str, float]
    images: int
    seconds: float
    lr: dict[str, float]


@dataclass
class TrainResult:
    out: Path
    last_checkpoint: Path | None
    history: list[EpochRecord] = field(default_factory=list)  # epochs run by this call
    start_epoch: int = 0  # epochs already done before this call (resume)


class TrainingImages(Dataset):
    """Samples decoded to the model's input: the engine's own preprocessing and the mask in its frame.

    Items: pixels (3, S, S) float; mask (S, S) float 0/1 (zeros for normal images); label; category
    (the catalog's name). The mask goes through the image's resize + center crop and is binarised at
    0.5, so its pixels line up with the maps the loss compares it to.
    """

    def __init__(self, samples: list[Sample], names: dict[str, str], image_size: int,
                 mask_interpolation: str = DEFAULT_MASK_INTERPOLATION):
        self.samples = samples
        self.names = names
        self.size = image_size
        self.mask_interpolation = mask_interpolation
        self.preprocess = make_preprocess(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        image, mask = load_sample(sample)
        pixels = self.preprocess(Image.fromarray(image))
        if mask is None:
            frame_mask = np.zeros((self.size, self.size), np.float32)
        else:
            frame_mask = resize_crop_mask(mask, self.size, self.mask_interpolation).astype(np.float32)
        return {
            "pixels": pixels,
            "mask": torch.from_numpy(frame_mask),
            "label": int(sample.label),
            "category": self.names[sample.category],
        }


def training_samples(config: TrainConfig) -> list[Sample]:
    """The run's samples: the dataset split, the chosen categories, at most max_images per category."""
    samples = read_dataset(config.data, config.layout, config.categories, config.split)
    return limit_per_category(samples, config.max_images)


def build_training_model(clip_model: str, clip_weights: str | None, image_size: int, tap_layout: str = "released",
                         checkpoint: str | None = None, seed: int = 0, device: str | torch.device = "cpu",
                         cache_dir: str | None = None) -> FiLoModel:
    """A FiLo model whose heads start from scratch (PyTorch init seeded by `seed`) or from a checkpoint.

    Serving refuses heads without a checkpoint; training is the one place where real weights and
    fresh heads meet (`fresh_heads`). `clip_weights=None` gives the demo's random backbone, built
    with the factory's seed so that it is the backbone `filo inspect --profile demo` rebuilds.
    """
    from models.factory import ModelSpec, build_model

    spec = ModelSpec(clip_model=clip_model, clip_weights=clip_weights, image_size=image_size,
                     checkpoint=checkpoint, tap_layout=tap_layout, demo=clip_weights is None,
                     fresh_heads=True, head_seed=seed)
    model, _ = build_model(spec, device=device, cache_dir=cache_dir)
    return model


def parameter_groups(model: FiLoModel, config: TrainConfig, phase: int) -> list[dict[str, Any]]:
    """The optimizer's parameter groups of a phase, named for the loss log."""
    h = model.heads
    if phase == 1:
        prompt = [*h.normal_prompt_learner.parameters(), *h.abnormal_prompt_learner.parameters()]
        decoder = [*h.decoder_linear.parameters(), *h.decoder_cov.parameters()]
        return [{"name": "prompt", "params": prompt, "lr": config.lr_prompt},
                {"name": "decoder", "params": decoder, "lr": config.lr_decoder}]
    return [{"name": "adapter", "params": list(h.adapter.parameters()), "lr": config.lr_adapter}]


def make_optimizer(model: FiLoModel, config: TrainConfig, phase: int) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, config, phase), betas=config.betas,
                             weight_decay=config.weight_decay)


class Trainer:
    """Runs (or resumes) the two phases over a dataset, writing checkpoints and logs to config.out.

    model_meta: what a checkpoint needs to be loaded again without flags: clip_model, clip_weights,
    image_size, tap_layout (and anything else worth recording, e.g. profile).
    """

    def __init__(self, model: FiLoModel, catalog: CategoryCatalog, config: TrainConfig,
                 model_meta: dict[str, Any], progress: bool = True, bf16: bool | None = None):
        self.model = model
        self.catalog = catalog
        self.config = config
        self.model_meta = {**model_meta, "image_size": model.image_size, "tap_layout": model.tap_layout}
        self.out = Path(config.out)
        self.progress = progress
        self.device = model.device
        self.bf16 = (self.device.type == "cuda") if bf16 is None else (bf16 and self.device.type == "cuda")
        self.samples = training_samples(config)
        self.names = {cat: catalog_name(catalog, cat) for cat in dict.fromkeys(s.category for s in self.samples)}
        self.banks = {name: model.prompt_bank(catalog.get(name).noun, catalog.get(name).descriptions)
                      for name in self.names.values()}
        segmentable = [s for s in self.samples if s.label == 0 or s.mask_path is not None]
        if len(segmentable) < len(self.samples):
            log.warning("%d anomalous images have no mask: phase 1 skips them, phase 2 uses them",
                        len(self.samples) - len(segmentable))
        self.phase_samples = {1: segmentable, 2: self.samples}

    # --- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        """Train the remaining epochs; with resume, continue after the last completed one in config.out."""
        cfg = self.config
        if not resume and (self.out / STATE_JSON).exists():
            raise FileExistsError(f"{self.out} already holds a training run; resume it or choose another output")
        self.out.mkdir(parents=True, exist_ok=True)
        done, opt_state = self._restore() if resume else (0, None)
        result = TrainResult(self.out, self.out / LAST if done else None, start_epoch=done)
        optimizer, opt_phase = None, None
        for epoch in range(done + 1, cfg.total_epochs + 1):
            phase = cfg.phase_of(epoch)
            if opt_phase != phase:
                optimizer = make_optimizer(self.model, cfg, phase)
                if opt_state is not None and opt_state["phase"] == phase:
                    optimizer.load_state_dict(opt_state["optimizer"])
                opt_phase = phase
            record = self._epoch(epoch, phase, optimizer)
            result.history.append(record)
            result.last_checkpoint = self._save(epoch, phase, optimizer, record)
        if done >= cfg.total_epochs:
            log.info("%s: all %d epochs were already done", self.out, cfg.total_epochs)
        return result

    def _epoch(self, epoch: int, phase: int, optimizer: torch.optim.Optimizer) -> EpochRecord:
        cfg = self.config
        samples = self.phase_samples[phase]
        if not samples:
            raise ValueError(f"phase {phase} has no usable images in {cfg.data}")
        loader = DataLoader(
            TrainingImages(samples, self.names, self.model.image_size, cfg.mask_interpolation),
            batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),  # same order on resume
        )
        trainable = PHASE1_PREFIXES if phase == 1 else PHASE2_PREFIXES
        for name, p in self.model.heads.named_parameters():
            p.requires_grad_(name.startswith(trainable))
        self.model.eval()
        self.model.heads.train()
        sums: dict[str, float] = {}
        seen = 0
        t0 = time.perf_counter()
        desc = f"phase {phase} epoch {epoch}/{cfg.total_epochs}"
        with tqdm(loader, desc=desc, unit="img", unit_scale=cfg.batch_size, file=sys.stderr,
                  disable=not self.progress, leave=False) as bar:
            for batch in bar:
                loss, parts = (self._step_phase1 if phase == 1 else self._step_phase2)(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = batch["pixels"].shape[0]
                seen += n
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
        self.model.heads.eval()
        mean = {k: v / seen for k, v in sums.items()}
        record = EpochRecord(epoch=epoch, phase=phase, loss=mean.pop("loss"), parts=mean, images=seen,
                             seconds=round(time.perf_counter() - t0, 3),
                             lr={g["name"]: g["lr"] for g in optimizer.param_groups})
        log.info("epoch %d (phase %d): loss %.5f %s, %d images, %.1fs", epoch, phase, record.loss,
                 {k: round(v, 5) for k, v in record.parts.items()}, seen, record.seconds)
        return record

    def _encode(self, pixels: torch.Tensor) -> EncoderOutput:
        """The frozen CLIP image forward (no grad; bf16 autocast on CUDA), returned in float32."""
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            enc = self.model.encode_images(pixels.to(self.device))
        return EncoderOutput(enc.global_feature.float(), [t.float() for t in enc.qkv], [t.float() for t in enc.vv])

    def _step_phase1(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        enc = self._encode(batch["pixels"])
        banks = [self.banks[c] for c in batch["category"]]
        image = self.model.image_features(enc, with_adapter=False)
        text, _ = self.model.text_features(image, banks, [None] * len(banks))
        _, layer_maps = self.model.maps(enc, text, return_layer_maps=True)
        return segmentation_loss(layer_maps, batch["mask"].to(self.device))

    def _step_phase2(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        enc = self._encode(batch["pixels"])
        banks = [self.banks[c] for c in batch["category"]]
        image = self.model.image_features(enc, with_adapter=True)  # the only path with gradient
        with torch.no_grad():
            text, _ = self.model.text_features(image.detach(), banks, [None] * len(banks))
        text_probs = (image[:, None, :] @ text.transpose(1, 2))[:, 0]
        labels = torch.as_tensor(batch["label"], device=self.device)
        loss = adapter_loss(text_probs, labels, self.config.temperature)
        accuracy = float((text_probs.argmax(dim=1) == labels).float().mean())
        return loss, {"accuracy": accuracy}

    # --- persistence -----------------------------------------------------------------------------
    def checkpoint_metadata(self, epoch: int, phase: int) -> dict[str, Any]:
        cfg = self.config
        hyper = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "out", "layout", "categories", "split")}
        return {
            **self.model_meta,
            "descriptions_version": bundled_version(),
            "category_fingerprints": {n: category_fingerprint(self.catalog.get(n)) for n in self.names.values()},
            "epoch": epoch,
            "phase": phase,
            "dataset": {
                "root": str(cfg.data),
                "layout": detect_layout(Path(cfg.data)) if cfg.layout == "auto" else cfg.layout,
                "split": cfg.split,
                "categories": list(self.names.values()),
                "images": len(self.samples),
            },
            "hyperparameters": hyper,
        }

    def _save(self, epoch: int, phase: int, optimizer: torch.optim.Optimizer, record: EpochRecord) -> Path:
        """Checkpoint, resume state, log line; train_state.json is written last (the commit point)."""
        path = save_checkpoint(self.out / f"epoch_{epoch}.safetensors", self.model.heads,
                               self.checkpoint_metadata(epoch, phase))
        _link_or_copy(path, self.out / LAST)
        _atomic_torch_save({"phase": phase, "epoch": epoch, "optimizer": optimizer.state_dict()},
                           self.out / STATE_TENSORS)
        with (self.out / LOSS_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(record)) + "\n")
        state = {"epoch": epoch, "phase": phase, "checkpoint": path.name, "config": self.config.to_dict(),
                 "model": self.model_meta}
        _atomic_write_text(self.out / STATE_JSON, json.dumps(state, indent=1) + "\n")
        self._prune(epoch)
        try:
            plot_losses(read_loss_log(self.out / LOSS_LOG), self.out / LOSS_PLOT)
        except Exception:  # a plotting problem must never cost a training run
            log.exception("could not draw %s", self.out / LOSS_PLOT)
        return self.out / LAST

    def _prune(self, epoch: int) -> None:
        if self.config.keep_last is None:
            return
        for old in range(1, epoch - self.config.keep_last + 1):
            (self.out / f"epoch_{old}.safetensors").unlink(missing_ok=True)

    def _restore(self) -> tuple[int, dict[str, Any] | None]:
        """Load the last completed epoch's heads and optimizer; trim log lines written after it."""
        state = read_train_state(self.out)
        done = int(state["epoch"])
        heads_state, meta = load_checkpoint(self.out / LAST)
        if meta.get("epoch") != done:
            raise ValueError(f"{self.out / LAST} is epoch {meta.get('epoch')} but {STATE_JSON} says {done}")
        for key in ("clip_model", "image_size", "tap_layout"):
            if key in self.model_meta and meta.get(key) != self.model_meta[key]:
                raise ValueError(f"{self.out} was trained with {key}={meta.get(key)!r}, "
                                 f"not {self.model_meta[key]!r}; resume it with the same backbone")
        apply_head_state(self.model.heads, heads_state, source=str(self.out / LAST))
        tensors = torch.load(self.out / STATE_TENSORS, map_location=self.device, weights_only=True)
        if int(tensors["epoch"]) != done:
            raise ValueError(f"{self.out / STATE_TENSORS} is for epoch {tensors['epoch']}, not {done}")
        records = [r for r in read_loss_log(self.out / LOSS_LOG) if r["epoch"] <= done]
        _atomic_write_text(self.out / LOSS_LOG, "".join(json.dumps(r) + "\n" for r in records))
        log.info("resuming %s after epoch %d of %d", self.out, done, self.config.total_epochs)
        return done, tensors


def read_train_state(out: str | Path) -> dict[str, Any]:
    """train_state.json of a run directory (what `--resume` reads)."""
    path = Path(out) / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not a training run directory (or no epoch finished)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_loss_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-epoch loss curves, one panel per phase (their losses have unrelated scales)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 3.5), dpi=100, layout="constrained")
    for axes, phase in zip(figure.subplots(1, 2), (1, 2)):
        rows = [r for r in records if r["phase"] == phase]
        if rows:
            epochs = [r["epoch"] for r in rows]
            axes.plot(epochs, [r["loss"] for r in rows], marker="o", label="loss")
            for key in rows[0]["parts"]:
                if key != "accuracy":
                    axes.plot(epochs, [r["parts"][key] for r in rows], marker=".", ls="--", label=key)
            axes.legend()
        else:
            axes.text(0.5, 0.5, "not run", ha="center", va="center", transform=axes.transAxes)
        axes.set_title("phase 1: focal + dice (7 maps)" if phase == 1 else "phase 2: adapter cross-entropy")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("mean loss")
    path = Path(path)
    figure.savefig(path)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link: no second GB-sized write), atomically."""
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


__all__ = [
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingImages",
    "build_training_model",
    "make_optimizer",
    "parameter_groups",
    "plot_losses",
    "read_loss_log",
    "read_train_state",
    "training_samples",
]
