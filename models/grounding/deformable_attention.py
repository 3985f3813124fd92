"""Which multi-scale deformable attention the layers of a Grounding DINO model run, chosen for the device the
model runs on, and said out loud.

transformers 5 decorates `MultiScaleDeformableAttention` with `use_kernel_forward_from_hub`: when a model is
loaded, the `kernels` library sets each layer's forward for the device the model is on *at load time*. The
detector loads on the CPU (the PyTorch path) and is moved with `.to(device)` afterwards, so on CUDA it kept
the PyTorch `grid_sample` path, and nothing said so. Here the choice is made again after the move, from the
device of the model's parameters, and every layer can be asked which path it takes:

- "triton": the project's kernel (`deformable_attention_triton`), as the custom op
  `torch.ops.filo.ms_deform_attn` on CUDA (compiles on the machine itself: no nvcc, no Hub);
- "hub": the `kernels-community/deformable-detr` kernel from the Hugging Face Hub (`kernels` library), only
  where the Hub or its cache is reachable;
- "pytorch": transformers' own `grid_sample` path, the reference, and what the CPU always runs.

The Triton forward also checks the device of each call: a layer whose inputs are not on CUDA runs the PyTorch
path (under `TRITON_INTERPRET=1` the kernel itself runs on the CPU, which is how it is tested without a GPU).
"""

from __future__ import annotations

import logging
import os
from types import MethodType

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "triton", "hub", "pytorch")
IMPLEMENTATIONS = ("triton", "hub", "pytorch")
_HUB_MARK = "_kernel_repo"  # set by the `kernels` library on a layer whose forward it replaced


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}


def triton_available() -> bool:
    """Triton importable (it ships with the CUDA build of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device_type: str) -> bool:
    """Where the kernel runs: CUDA, and the CPU while Triton's interpreter is on."""
    return device_type == "cuda" or (device_type == "cpu" and _interpreting())


def choose(choice: str, device_type: str, triton_ok: bool | None = None) -> str:
    """The implementation the layers of a model running on `device_type` ("cuda", "cpu", "meta", ...) take
    for the setting `choice`.

    "auto" is "triton" where the kernel runs (CUDA), else "pytorch"; "pytorch" is always honoured; "triton"
    where it cannot run is an error, never a quiet substitute; "hub" off CUDA is "pytorch" (the Hub's kernel
    is built for CUDA only; transformers' mapping has no other device).
    """
    if choice not in CHOICES:
        raise ValueError(f"deformable attention must be one of {', '.join(CHOICES)}, got {choice!r}")
    if triton_ok is None:
        triton_ok = triton_available()
    if choice == "pytorch":
        return "pytorch"
    if choice == "auto":
        return "triton" if triton_ok and device_type == "cuda" else "pytorch"
    if choice == "triton":
        if not triton_ok:
            raise RuntimeError("deformable attention 'triton' was asked for, but triton is not installed")
        if not triton_runs_on(device_type):
            raise RuntimeError(f"deformable attention 'triton' runs on CUDA, not on {device_type!r} "
                               "(or on the CPU under TRITON_INTERPRET=1, for tests)")
        return "triton"
    return "hub" if device_type == "cuda" else "pytorch"


def deformable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every `MultiScaleDeformableAttention` of the model (the kernel-replaceable core of each layer)."""
    return [m for m in model.modules() if getattr(type(m), "kernel_layer_name", None) == "MultiScaleDeformableAttention"
            or type(m).__name__ == "MultiScaleDeformableAttention"]


def layer_implementation(layer: torch.nn.Module, device_type: str) -> str:
    """What one layer runs for inputs on `device_type`, read from the forward it has now."""
    if getattr(layer.__dict__.get("forward"), "__func__", None) is _triton_forward:
        return "triton" if triton_runs_on(device_type) else "pytorch"
    if _HUB_MARK in layer.__dict__ and "forward" in layer.__dict__:
        return "hub"
    return "pytorch"


def model_device_type(model: torch.nn.Module) -> str:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def implementation(model: torch.nn.Module, device_type: str | None = None) -> str | None:
    """What the model's deformable attention runs on the device its parameters are on now (or `device_type`):
    one of `IMPLEMENTATIONS`, "mixed: ..." when layers differ, None when it has no such layer."""
    layers = deformable_layers(model)
    if not layers:
        return None
    device_type = device_type or model_device_type(model)
    kinds = sorted({layer_implementation(m, device_type) for m in layers})
    return kinds[0] if len(kinds) == 1 else "mixed: " + "+".join(kinds)


def _reset(layer: torch.nn.Module) -> None:
    """The class's own forward (transformers' PyTorch path), whatever was installed before."""
    for key in ("forward", _HUB_MARK):
        layer.__dict__.pop(key, None)


def _triton_forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                    sampling_locations, attention_weights, im2col_step):
    """`MultiScaleDeformableAttention.forward` with the project's kernel (the custom op `filo::ms_deform_attn`,
    registered by `install`) where the inputs are on a device it runs on, else the PyTorch path."""
    if triton_runs_on(value.device.type):
        return torch.ops.filo.ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights)
    return type(self).forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                              sampling_locations, attention_weights, im2col_step)


def _from_hub(model: torch.nn.Module) -> None:
    """transformers' kernelisation for the device the model is on now (fetches from the Hub or its cache)."""
    try:
        model.set_use_kernels(True)
    except Exception as exc:  # reported by the caller through `implementation`, which then says "pytorch"
        log.warning("the Hub's deformable-attention kernel could not be loaded (%s: %s)", type(exc).__name__, exc)


def install(model: torch.nn.Module, choice: str = "auto") -> str | None:
    """Give every deformable-attention layer of `model` the implementation `choice` selects for the device the
    model's parameters are on NOW (call it after `.to(device)`); returns what the layers then run
    (`implementation`), which is what to report: a Hub kernel that could not be fetched shows as "pytorch"."""
    layers = deformable_layers(model)
    if not layers:
        return None
    device_type = model_device_type(model)
    chosen = choose(choice, device_type)
    for layer in layers:
        _reset(layer)
    if hasattr(model, "_use_kernels"):
        # transformers re-kernelises a kernels-enabled model when it switches between train() and eval(), for
        # the device it is on, and would replace these layers' forward again: the choice here owns them
        model._use_kernels, model._kernels_mode = False, None
    if chosen == "triton":
        from models.grounding.deformable_attention_triton import custom_op

        custom_op()  # registers torch.ops.filo.ms_deform_attn
        for layer in layers:
            layer.forward = MethodType(_triton_forward, layer)
    elif chosen == "hub":
        _from_hub(model)
    return implementation(model, device_type)
