"""What the serving layers (the embedded backend, the queue worker, start-up) may ask of an inspection engine.

A structural type, free of torch, so that the API process imports it cheaply and a stand-in engine in a test
is checked against the same surface as `service.engine.pipeline.InspectionEngine`. How the engine runs
(device, precision, compilation, CUDA graphs) is fixed when it is built (`EngineOptions`); nothing here
changes it between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from service.core.types import InspectError, InspectRequest, InspectResult
from service.settings import FiloSettings

if TYPE_CHECKING:
    from descriptions import CategoryCatalog
    from service.engine.references import EngineReferences


class Engine(Protocol):
    catalog: CategoryCatalog
    references: EngineReferences
    device: str

    def prepare(self, request: InspectRequest) -> InspectRequest:
        """Attach the model input (CPU work, any thread)."""
        ...

    def inspect_batch(self, requests: Sequence[InspectRequest]) -> list[InspectResult | InspectError]:
        """One batch on the engine's thread; a failed request fails in its own slot."""
        ...

    def model_info(self) -> dict[str, Any]: ...

    def prepare_category(self, name: str) -> Any: ...

    def cache_state(self) -> dict[str, bytes]: ...

    def load_cache_state(self, state: dict[str, bytes]) -> int: ...

    def warmup(self) -> None: ...

    def runtime(self) -> dict[str, Any]:
        """What each expensive part runs (service/engine/runtime.py); reported at start, in /readyz and metrics."""
        ...


EngineFactory = Callable[[FiloSettings], Engine]
