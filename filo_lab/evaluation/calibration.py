"""Per-category decision thresholds from a labelled dataset: what `filo calibrate` computes.

Every image of the split goes through the inspection engine in batches (`runner.inspect_samples`, the lab's
one loop, as `filo eval`), with K normal references per category when asked (`runner.plan_categories`);
per category the service's own labelled rule (`service.catalog.thresholds`: the cut `score >= threshold`
with the highest F1 between good and defective images, what APRIL-GAN's authors recommend for a deployed
detector) chooses the threshold, so that it fits exactly what the deployed engine scores. The JSON document
holds the thresholds under `thresholds`, ready for FILO_THRESHOLDS, and per category the scores they were
chosen from.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from filo_lab.evaluation.runner import each_category, inspect_samples, plan_categories

if TYPE_CHECKING:
    from service.engine.pipeline import InspectionEngine


@dataclass
class CalibrationResult:
    """The thresholds per catalog name, and what kept an image or a category out of them."""

    categories: dict[str, dict[str, Any]]  # catalog name -> threshold, f1, n_good, n_defective, shots, scores
    model: dict[str, Any]  # the engine's model_info(): which model the thresholds hold for
    shots: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image path, message) the engine refused
    too_few: dict[str, tuple[int, int]] = field(default_factory=dict)  # category -> (good, defective) images

    @property
    def complete(self) -> bool:
        """Every image scored and every category calibrated."""
        return not (self.failures or self.too_few)

    def thresholds(self) -> dict[str, float]:
        return {name: entry["threshold"] for name, entry in self.categories.items()}

    def document(self) -> dict[str, Any]:
        """The JSON document `write` stores: the model, the shots, every category's entry and the thresholds."""
        return {"model": self.model, "shots": self.shots, "categories": self.categories,
                "thresholds": self.thresholds()}

    def table(self) -> str:
        """Markdown: per category the threshold, its F1 in % and the images it was chosen from."""
        lines = ["| category | threshold | F1 | good | defective |", "|---|---:|---:|---:|---:|"]
        for name, e in self.categories.items():
            lines.append(f"| {name} | {e['threshold']:.4f} | {100 * e['f1']:.1f} | {e['n_good']} | "
                         f"{e['n_defective']} |")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.document(), indent=1) + "\n", encoding="utf-8")


def calibrate_dataset(engine: InspectionEngine, root: str | Path, *, layout: str = "auto",
                      categories: list[str] | None = None, split: str = "test", batch_size: int = 8,
                      grounding: bool = True, shots: int = 0, shot_seed: int = 0,
                      progress: bool = True) -> CalibrationResult:
    """F1-max thresholds of a labelled split, per category; a category without both good and defective images
    is left out (`too_few`), an image the engine refuses is counted in `failures`. Problems of the dataset or
    the catalog are raised before any image is inspected (`plan_categories`)."""
    from service.catalog.thresholds import NotEnoughLabelled

    todo = plan_categories(engine, root, layout=layout, categories=categories, split=split, batch_size=batch_size,
                           shots=shots, shot_seed=shot_seed)
    result = CalibrationResult({}, engine.model_info(), shots)
    with tqdm(total=todo.images, desc="calibrate", unit="img", file=sys.stderr, disable=not progress) as bar:
        for cat, name, group in each_category(engine, todo):
            gathered = _labelled_scores(engine, name, group, batch_size, grounding, bar, result.failures)
            try:
                cal = gathered.threshold()  # the service's labelled rule
            except NotEnoughLabelled as exc:
                result.too_few[cat] = (exc.n_good, exc.n_defective)
                continue
            result.categories[name] = {"threshold": cal.threshold, "f1": cal.f1, "n_good": cal.n_good,
                                       "n_defective": cal.n_defective, "shots": shots, "scores": cal.scores()}
    return result


def _labelled_scores(engine: InspectionEngine, name: str, group: list, batch_size: int, grounding: bool, bar,
                     failures: list[tuple[str, str]]):
    """The labelled scores of one category's images; the images the engine refused go to `failures`."""
    from service.catalog.thresholds import LabelledScores
    from service.core.types import InspectError

    gathered = LabelledScores()
    for _, sample, _, _, res in inspect_samples(engine, name, group, batch_size, grounding):
        bar.update(1)
        if isinstance(res, InspectError):
            failures.append((str(sample.image_path), res.message))
            continue
        gathered.add(float(res.score), sample.label == 1)
    return gathered
