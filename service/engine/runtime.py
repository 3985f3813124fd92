"""What an engine runs, said once at start: the implementation of each expensive part, and the rule that a
production engine on CUDA does not quietly run Grounding DINO's slow deformable-attention path.

The report is a flat dict of short strings (it goes into the start log, `/readyz` and the labels of
`filo_engine_info`): `device`, `precision`, `encoder` (compiled / eager), `cuda_graphs` (on / off / "off (needs
CUDA)"), `grounding` (compiled / eager / off), `deformable_attention` (triton / hub / pytorch / off), and
`warnings` (a list); "none" is a detector without deformable-attention layers. No torch here: the rule is tested
with device strings.
"""

from __future__ import annotations

from typing import Any

RUNTIME_KEYS = ("device", "precision", "encoder", "cuda_graphs", "grounding", "deformable_attention")
FAST_DEFORMABLE_ATTENTION = ("triton", "hub")


class SlowPathRefusedError(RuntimeError):
    """The engine would run a part on its slow fallback where that is not allowed; it does not start."""


def check_runtime(runtime: dict[str, Any], profile: str, allow_pytorch_deformable_attention: bool) -> list[str]:
    """The warnings to report for `runtime`; raises `SlowPathRefusedError` where it must not start.

    On CUDA, Grounding DINO's deformable attention on the PyTorch path (`grid_sample` per level) is the fallback
    no GPU run should take unnoticed: the production profile refuses it unless allowed, and every profile warns.
    """
    device = str(runtime.get("device", ""))
    attention = str(runtime.get("deformable_attention", "off"))
    if not device.startswith("cuda") or attention in ("off", "none") or attention in FAST_DEFORMABLE_ATTENTION:
        return []
    message = (f"Grounding DINO's deformable attention runs {attention!r} on {device}, not the Triton kernel: "
               "several times slower (docs/gpu.md)")
    if profile == "production" and not allow_pytorch_deformable_attention:
        raise SlowPathRefusedError(
            message + ". Set FILO_GROUNDING_DEFORMABLE_ATTENTION=auto (or triton) where triton is installed, or "
            "FILO_ALLOW_PYTORCH_DEFORMABLE_ATTENTION=true to start anyway")
    return [message]


def describe(runtime: dict[str, Any]) -> str:
    """One line for the start log."""
    parts = [f"{key} {runtime[key]}" for key in RUNTIME_KEYS if key in runtime]
    return ", ".join(parts) + "".join(f"; WARNING: {w}" for w in runtime.get("warnings", ()))
