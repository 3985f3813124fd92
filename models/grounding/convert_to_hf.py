"""Convert Grounding DINO checkpoints of the original implementation (or MMDetection's) into transformers'.

FiLo's released ``test.py`` loads its fine-tuned Grounding DINO (``grounding_train_on_mvtec.pth``, ...) into the
IDEA-Research implementation; this project runs ``transformers``' ``GroundingDinoForObjectDetection``. This
module turns such a checkpoint into that model's state dict: it recognises the file's layout, renames every
tensor through the rule tables of ``models.grounding.convert_rules`` (data, meant to be read), splits fused
q/k/v projections, resolves the box head that the original stores under many names, and checks that every
weight of the target model is filled with a tensor of the right shape. It never guesses: anything missing,
mis-shaped or left over is reported by name, and the caller refuses to write a model.

Tensors in, tensors out, but for three steps at the edges: reading the checkpoint (``read_checkpoint``, with
``torch.load(weights_only=True)``), reading the base's config and processor (``load_base``), and writing the
converted directory (``save_verified``: written beside its place, reloaded and compared, then moved in).
``filo convert-grounding`` runs the steps in order (``read_checkpoint``, ``load_base``, ``convert_checkpoint``,
``save_verified``) and prints what each found.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.grounding import convert_rules as rules

# --------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)(?:(\+|-|//|\*)(\w+))?\}")
_KIND_REGEX = {"wb": r"(?:weight|bias)", "rest": r".+"}
_INT_REGEX = r"\d+"
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "//": lambda a, b: a // b}
_SOLVE = {"+": lambda v, b: v - b, "-": lambda v, b: v + b, "*": lambda v, b: v // b, "//": lambda v, b: v * b}


class Template:
    """One key pattern of the rule tables: matches keys (solving computed indices) and formats them.

    ``constants`` are the upper-case names (``D``, ``B``) of the model being converted; in a pattern they
    stand for their literal value, in an expression (``{e+B}``) for the operand.
    """

    def __init__(self, pattern: str, constants: Mapping[str, int]):
        self.pattern = pattern
        self.constants = dict(constants)
        parts, self._groups, pos = [], [], 0
        for index, m in enumerate(_PLACEHOLDER.finditer(pattern)):
            parts.append(re.escape(pattern[pos : m.start()]))
            name, op, operand = m.groups()
            if name in self.constants and op is None:
                parts.append(re.escape(str(self.constants[name])))
            else:
                group = f"g{index}"
                parts.append(f"(?P<{group}>{_KIND_REGEX.get(name, _INT_REGEX)})")
                self._groups.append((group, name, op, operand))
            pos = m.end()
        parts.append(re.escape(pattern[pos:]))
        self._regex = re.compile("".join(parts))

    def _operand(self, operand: str) -> int:
        return int(self.constants[operand]) if operand in self.constants else int(operand)

    def match(self, key: str) -> dict[str, str] | None:
        """The placeholder values that make this pattern produce ``key`` (computed ones solved), or None."""
        m = self._regex.fullmatch(key)
        if m is None:
            return None
        values: dict[str, str] = {}
        for group, name, op, operand in self._groups:
            raw = m.group(group)
            value = raw if op is None else str(_SOLVE[op](int(raw), self._operand(operand)))
            if values.setdefault(name, value) != value:
                return None
        return values

    def format(self, values: Mapping[str, str]) -> str:
        def replace(m: re.Match) -> str:
            name, op, operand = m.groups()
            if op is None:
                return str(values[name]) if name in values else str(self.constants[name])
            return str(_APPLY[op](int(values[name]), self._operand(operand)))

        return _PLACEHOLDER.sub(replace, self.pattern)


@dataclass(frozen=True)
class CompiledRule:
    source: Template
    targets: tuple[Template, ...]
    op: str


def compile_rules(table, constants: Mapping[str, int]) -> tuple[CompiledRule, ...]:
    compiled = []
    for source, targets, op in table:
        targets = (targets,) if isinstance(targets, str) else targets
        compiled.append(CompiledRule(Template(source, constants), tuple(Template(t, constants) for t in targets), op))
    return tuple(compiled)


def first_match(compiled: tuple[CompiledRule, ...], key: str) -> tuple[CompiledRule, dict[str, str]] | None:
    for rule in compiled:
        values = rule.source.match(key)
        if values is not None:
            return rule, values
    return None


# --------------------------------------------------------------------------------------------------
# Tensor operations named by the rules
# --------------------------------------------------------------------------------------------------


def split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [q; k; v] of a fused in-projection (weight (3C, C) or bias (3C,)) -> three contiguous tensors."""
    if tensor.ndim == 0 or tensor.shape[0] % 3:
        raise ValueError(f"a fused q/k/v tensor needs a first dimension divisible by 3, got {tuple(tensor.shape)}")
    return tuple(chunk.clone().contiguous() for chunk in torch.chunk(tensor, 3, dim=0))


_UNFOLD_TO_ORIGINAL = [0, 2, 1, 3]  # MMDetection's nn.Unfold slot s holds the original's neighbour _UNFOLD[s]


def unfold_reduction_to_original(weight: torch.Tensor) -> torch.Tensor:
    """Patch-merging reduction (out, 4C) from MMDetection's unfold channel order (c*4+s) to the original's (s*C+c)."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        raise ValueError(f"a patch-merging reduction needs shape (out, 4C), got {tuple(weight.shape)}")
    out_ch, in_ch = weight.shape
    return weight.reshape(out_ch, in_ch // 4, 4).transpose(1, 2)[:, _UNFOLD_TO_ORIGINAL, :].reshape(out_ch, in_ch).contiguous()


def unfold_norm_to_original(vector: torch.Tensor) -> torch.Tensor:
    """Patch-merging LayerNorm weight/bias (4C,) from MMDetection's unfold channel order to the original's."""
    if vector.ndim != 1 or vector.shape[0] % 4:
        raise ValueError(f"a patch-merging norm needs shape (4C,), got {tuple(vector.shape)}")
    (in_ch,) = vector.shape
    return vector.reshape(in_ch // 4, 4).transpose(0, 1)[_UNFOLD_TO_ORIGINAL, :].reshape(in_ch).contiguous()


_OPS = {
    "copy": lambda t: (t,),
    "qkv": split_qkv,
    "unfold_reduction": lambda t: (unfold_reduction_to_original(t),),
    "unfold_norm": lambda t: (unfold_norm_to_original(t),),
}

# --------------------------------------------------------------------------------------------------
# Reading a checkpoint and recognising its layout
# --------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """The file cannot be read as a Grounding DINO checkpoint (missing, damaged, or of an unknown layout)."""


class _Inert:
    """Stand-in for a class pickled beside the weights (an MMEngine checkpoint's meta, message hub, numpy).

    ``torch.load(weights_only=True)`` refuses unknown classes. Rather than loading them unsafely, each one the
    file names is replaced by a subclass of this, which accepts and discards whatever it is given, so no
    code from the file ever runs; the tensors load as usual.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _inert_stub(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


def load_checkpoint(path: str | Path) -> tuple[object, list[str]]:
    """(loaded object, names of the non-tensor classes replaced by inert stand-ins) with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as exc:
        first_error = exc
    except Exception as exc:  # damaged archive, truncated file, not a torch file at all
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        names = []
    if not names:
        raise CheckpointError(f"{path} cannot be read with weights_only=True: {first_error}") from first_error
    try:
        with torch.serialization.safe_globals([_inert_stub(n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True), names
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read with weights_only=True: {type(exc).__name__}: {exc}") from exc


CONTAINERS = {
    "flat": "a flat state dict (what FiLo's test.py loads)",
    "model": "{'model': state_dict} (the original repository's release layout)",
    "state_dict": "{'state_dict': state_dict} (an MMDetection / MMEngine checkpoint)",
}
NAMINGS = {
    "original": "original IDEA-Research GroundingDINO key names",
    "mmdet": "MMDetection GroundingDINO key names",
}
LAYOUT_LETTERS = {("flat", "original"): "a", ("model", "original"): "b", ("state_dict", "mmdet"): "c"}


def _tensor_dict(obj) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping) or not obj:
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors if len(tensors) * 2 > len(obj) else None


def unwrap(obj) -> tuple[str, dict[str, torch.Tensor]]:
    """(container name, state dict with any leading ``module.`` stripped) of a loaded checkpoint."""
    if isinstance(obj, Mapping):
        for container in ("model", "state_dict"):
            inner = _tensor_dict(obj.get(container)) if container in obj else None
            if inner is not None:
                return container, strip_module_prefix(inner)
        flat = _tensor_dict(obj)
        if flat is not None:
            return "flat", strip_module_prefix(flat)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(
            f"no state dict found: expected a dict of tensors, or one under 'model' or 'state_dict'; top-level keys: {keys}"
        )
    raise CheckpointError(f"no state dict found: the file holds a {type(obj).__name__}, not a dict of tensors")


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the leading ``module.`` that (Distributed)DataParallel adds to every key."""
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def detect_naming(keys) -> str:
    """"original" or "mmdet", by the prefixes only one of the two namings has."""
    keys = list(keys)
    original = sum(k.startswith(("transformer.", "backbone.0.", "bert.", "feat_map.", "input_proj.")) for k in keys)
    mmdet = sum(
        k.startswith(("backbone.stages.", "language_model.", "text_feat_map.", "neck.", "bbox_head.", "memory_trans_"))
        for k in keys
    )
    if original == 0 and mmdet == 0:
        raise CheckpointError(
            "the keys are neither Grounding DINO's original names nor MMDetection's (e.g. "
            + ", ".join(keys[:3])
            + ")"
        )
    return "original" if original >= mmdet else "mmdet"


def describe_layout(container: str, naming: str) -> str:
    letter = LAYOUT_LETTERS.get((container, naming))
    head = f"layout ({letter})" if letter else "layout"
    return f"{head}: {CONTAINERS[container]}, {NAMINGS[naming]}"


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def model_constants(config) -> dict[str, int]:
    """The constants the rule patterns use: D (decoder layers) and B (backbone feature levels)."""
    backbone = config.backbone_config
    out_indices = getattr(backbone, "out_indices", None) or [2, 3, 4]
    return {"D": int(config.decoder_layers), "B": len(out_indices)}


@dataclass
class Conversion:
    """What ``convert_state_dict`` made of a checkpoint; ``ok`` when a model may be written from ``tensors``."""

    naming: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # transformers key -> tensor
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, reason)
    filled: list[tuple[str, str]] = field(default_factory=list)  # (transformers key, reason)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint-side name, transformers key)
    mismatched: list[str] = field(default_factory=list)  # "source -> target: shape a vs b"
    unused: list[str] = field(default_factory=list)  # checkpoint keys no rule takes or the model lacks
    refused_values: list[str] = field(default_factory=list)  # keys whose value transformers cannot express
    notes: list[str] = field(default_factory=list)
    share_decoder_box_head: bool = True

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unused or self.refused_values)


def mmdet_to_original(
    state_dict: Mapping[str, torch.Tensor], constants: Mapping[str, int], conversion: Conversion
) -> dict[str, torch.Tensor]:
    """Rename MMDetection keys to the original's (``MMDET_TO_ORIGINAL``), dropping ``MMDET_DROPPED`` ones."""
    compiled = compile_rules(rules.MMDET_TO_ORIGINAL, constants)
    drops = [(Template(p, constants), reason, value) for p, reason, value in rules.MMDET_DROPPED]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        drop = next(((reason, value) for t, reason, value in drops if t.match(key) is not None), None)
        if drop is not None:
            reason, required = drop
            if required is not None and not bool(torch.all(tensor.float() == required)):
                conversion.refused_values.append(
                    f"{key} = {tensor.flatten()[:4].tolist()}: {reason}; any other value changes the logits "
                    "and has no counterpart in transformers' GroundingDinoForObjectDetection"
                )
            else:
                conversion.dropped.append((key, reason))
            continue
        found = first_match(compiled, key)
        if found is None:
            conversion.unused.append(key)
            continue
        rule, values = found
        try:
            (converted,) = _OPS[rule.op](tensor)
        except ValueError as exc:
            conversion.mismatched.append(f"{key}: {exc}")
            continue
        out[rule.targets[0].format(values)] = converted
    return out


def _resolve_box_head(
    state_dict: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    constants: Mapping[str, int],
    conversion: Conversion,
    one_module: bool,
) -> None:
    """Move the decoder box head out of ``state_dict`` into ``conversion.tensors`` (see ``DECODER_BOX_HEAD``).

    ``one_module`` (the original's dec_pred_bbox_embed_share=True): one tensor per (layer k, weight|bias),
    the last copy present in load order, written to every decoder layer. Otherwise (MMDetection, or an
    original model built without sharing): per decoder layer n, the last of its names present.
    """
    spec = rules.DECODER_BOX_HEAD
    sources = [Template(p, constants) for p in spec["sources_in_load_order"]]
    targets = [Template(p, constants) for p in spec["targets"]]
    depth = constants["D"]
    present: dict[str, torch.Tensor] = {}
    for key in list(state_dict):
        for template in sources:
            values = template.match(key)
            if values is not None:
                if int(values["n"]) >= depth:
                    conversion.unused.append(key)
                    state_dict.pop(key)
                else:
                    present[key] = state_dict.pop(key)
                break
    wanted = sorted({(v["k"], v["wb"]) for key in expected for t in targets if (v := t.match(key)) is not None})
    considered = {s.format({"n": n, "k": k, "wb": wb}) for k, wb in wanted for s in sources for n in range(depth)}
    conversion.unused.extend(key for key in present if key not in considered)  # e.g. a 4th MLP layer
    for k, wb in wanted:
        if one_module:
            ordered = [s.format({"n": n, "k": k, "wb": wb}) for s in sources for n in range(depth)]
            groups = [ordered] * depth
        else:
            groups = [[s.format({"n": n, "k": k, "wb": wb}) for s in sources] for n in range(depth)]
        for n, candidates in enumerate(groups):
            have = [c for c in candidates if c in present]
            target_keys = [t.format({"n": n, "k": k, "wb": wb}) for t in targets]
            if not have:
                continue  # reported as missing, by name, with the other unfilled weights
            chosen = present[have[-1]]
            if n == 0 or not one_module:
                differing = [c for c in have[:-1] if not _same(present[c], chosen)]
                if differing:
                    conversion.notes.append(
                        f"box head copies differ: {', '.join(differing[:3])} vs {have[-1]}; using {have[-1]}, "
                        "the copy the original implementation ends up with (the last one it loads)"
                    )
            for target in target_keys:
                conversion.tensors[target] = chosen


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def decoder_heads_differ(state_dict: Mapping[str, torch.Tensor], constants: Mapping[str, int]) -> bool:
    """True when per-layer decoder box heads (original names ``bbox_embed.{n}``) are not all equal."""
    template = Template("bbox_embed.{n}.layers.{k}.{wb}", constants)
    by_param: dict[tuple[str, str], list[torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        values = template.match(key)
        if values is not None:
            by_param.setdefault((values["k"], values["wb"]), []).append(tensor)
    return any(not _same(t, group[0]) for group in by_param.values() for t in group[1:])


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    naming: str,
    expected: Mapping[str, torch.Size],
    constants: Mapping[str, int],
    share_decoder_box_head: bool = True,
) -> Conversion:
    """Map a checkpoint's state dict (``naming`` "original" or "mmdet") onto the target model's keys.

    ``expected``: the target model's state-dict shapes (``target_shapes``). For MMDetection checkpoints,
    whose decoder heads are independent, ``share_decoder_box_head`` is switched off when they differ, and the
    caller must write the config with ``decoder_bbox_embed_share=False``.
    """
    conversion = Conversion(naming=naming, share_decoder_box_head=share_decoder_box_head)
    source = _in_original_names(state_dict, naming, constants, conversion)
    _drop_on_purpose(source, constants, conversion)
    one_module = naming == "original" and share_decoder_box_head
    _resolve_box_head(source, expected, constants, conversion, one_module=one_module)
    _map_by_rules(source, expected, constants, conversion)
    _fill_without_source(expected, conversion)
    _check_against_target(expected, naming, constants, conversion)
    return conversion


def _in_original_names(
    state_dict: Mapping[str, torch.Tensor], naming: str, constants: Mapping[str, int], conversion: Conversion
) -> dict[str, torch.Tensor]:
    """The checkpoint under the original implementation's names (a copy); for MMDetection, whose per-layer
    decoder box heads are trained independently, head sharing is switched off where they differ."""
    if naming != "mmdet":
        return dict(state_dict)
    source = mmdet_to_original(state_dict, constants, conversion)
    if conversion.share_decoder_box_head and decoder_heads_differ(source, constants):
        conversion.share_decoder_box_head = False
        conversion.notes.append(
            "the checkpoint's per-layer decoder box heads differ (MMDetection trains them independently): "
            "the model is written with decoder_bbox_embed_share=false"
        )
    return source


def _drop_on_purpose(source: dict[str, torch.Tensor], constants: Mapping[str, int], conversion: Conversion) -> None:
    """Remove the keys ``rules.DROPPED`` names (each with the reason it is safe) from ``source``."""
    drops = [(Template(p, constants), reason) for p, reason in rules.DROPPED]
    for key in list(source):
        reason = next((r for t, r in drops if t.match(key) is not None), None)
        if reason is not None:
            source.pop(key)
            conversion.dropped.append((key, reason))


def _map_by_rules(
    source: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    constants: Mapping[str, int],
    conversion: Conversion,
) -> None:
    """Every remaining key through its ``rules.ORIGINAL_TO_HF`` rule into ``conversion.tensors``; a key without
    a rule or a target in the model is unused, one whose tensor the rule cannot split is mismatched."""
    compiled = compile_rules(rules.ORIGINAL_TO_HF, constants)
    for key, tensor in source.items():
        found = first_match(compiled, key)
        if found is None:
            conversion.unused.append(key)
            continue
        rule, values = found
        target_keys = [t.format(values) for t in rule.targets]
        if any(t not in expected for t in target_keys):
            conversion.unused.append(key)
            continue
        try:
            pieces = _OPS[rule.op](tensor)
        except ValueError as exc:
            conversion.mismatched.append(f"{key} -> {', '.join(target_keys)}: {exc}")
            continue
        for target, piece in zip(target_keys, pieces, strict=True):
            conversion.tensors[target] = piece


def _fill_without_source(expected: Mapping[str, torch.Size], conversion: Conversion) -> None:
    """The target weights ``rules.FILLED_WITHOUT_SOURCE`` fills (ones or zeros) where nothing mapped onto them."""
    for pattern, fill, reason in rules.FILLED_WITHOUT_SOURCE:
        if pattern in expected and pattern not in conversion.tensors:
            maker = torch.ones if fill == "ones" else torch.zeros
            conversion.tensors[pattern] = maker(expected[pattern])
            conversion.filled.append((pattern, reason))


def _check_against_target(
    expected: Mapping[str, torch.Size], naming: str, constants: Mapping[str, int], conversion: Conversion
) -> None:
    """Every weight of the target model filled, and with its shape: the rest is missing or mismatched."""
    for target, shape in expected.items():
        if target not in conversion.tensors:
            conversion.missing.append((source_name_for(target, naming, constants), target))
        elif tuple(conversion.tensors[target].shape) != tuple(shape):
            conversion.mismatched.append(
                f"{source_name_for(target, naming, constants)} -> {target}: checkpoint "
                f"{tuple(conversion.tensors[target].shape)} vs model {tuple(shape)}"
            )


def source_name_for(target: str, naming: str, constants: Mapping[str, int]) -> str:
    """The checkpoint key that fills ``target`` (for messages), or ``(no rule for <target>)``."""
    name = _invert(compile_rules(rules.ORIGINAL_TO_HF, constants), target)
    if name is None:
        for pattern in rules.DECODER_BOX_HEAD["targets"]:
            values = Template(pattern, constants).match(target)
            if values is not None:
                name = Template(rules.DECODER_BOX_HEAD["sources_in_load_order"][-1], constants).format(values)
                break
    if name is None:
        return f"(no rule for {target})"
    if naming == "mmdet":
        mm = _invert(compile_rules(rules.MMDET_TO_ORIGINAL, constants), name)
        return f"{mm} (original name {name})" if mm else name
    return name


def _invert(compiled: tuple[CompiledRule, ...], target: str) -> str | None:
    for rule in compiled:
        for template in rule.targets:
            values = template.match(target)
            if values is not None:
                return rule.source.format(values)
    return None


# --------------------------------------------------------------------------------------------------
# The target model
# --------------------------------------------------------------------------------------------------


def build_model(config):
    """A ``GroundingDinoForObjectDetection`` of ``config`` (random weights, replaced by ``load_converted``)."""
    from transformers import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection(config).eval()


def target_shapes(model) -> dict[str, torch.Size]:
    """Every persistent tensor of the model's state dict (what a converted checkpoint must fill) and its shape."""
    return {k: v.shape for k, v in model.state_dict().items()}


def load_converted(model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy the converted tensors into ``model`` (strict: every key, no extra) and re-tie shared heads."""
    result = model.load_state_dict(dict(tensors), strict=True)
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"load_state_dict: {result}")
    model.tie_weights()


def verify_saved(directory: str | Path, tensors: Mapping[str, torch.Tensor]) -> int:
    """Reload ``directory`` with plain ``from_pretrained`` and check every tensor; returns how many were compared.

    Raises RuntimeError on missing/unexpected/mismatched keys or on any tensor that differs from ``tensors``.
    """
    from transformers import GroundingDinoForObjectDetection

    model, info = GroundingDinoForObjectDetection.from_pretrained(str(directory), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"reloading {directory} reported {problems}")
    state = model.state_dict()
    differing = [k for k, v in tensors.items() if k not in state or not torch.equal(state[k], v.to(state[k].dtype))]
    if differing:
        raise RuntimeError(f"reloaded tensors differ from the converted ones: {differing[:5]} ({len(differing)})")
    return len(tensors)


# --------------------------------------------------------------------------------------------------
# The whole conversion, step by step (what ``filo convert-grounding`` runs)
# --------------------------------------------------------------------------------------------------

REFUSAL_LISTED = 20  # names listed per problem in a refusal, then a count


@dataclass
class Source:
    """A checkpoint as read: its container and key naming (its layout), its state dict, and the names of the
    non-tensor classes stored beside the weights that were read as inert stand-ins."""

    container: str
    naming: str
    state_dict: dict[str, torch.Tensor]
    stubbed: list[str]

    @property
    def layout(self) -> str:
        return describe_layout(self.container, self.naming)


def read_checkpoint(path: str | Path) -> Source:
    """The checkpoint at ``path``; ``CheckpointError`` when it cannot be read or its layout is unknown."""
    loaded, stubbed = load_checkpoint(path)
    container, state_dict = unwrap(loaded)
    return Source(container, detect_naming(state_dict), state_dict, stubbed)


def load_base(base: str, local_files_only: bool = False) -> tuple[Any, Any]:
    """(config, processor) of the base model (hub id or local directory) whose architecture the weights fill.

    Raises OSError (transformers' message) when it is not available, ValueError when it is not Grounding DINO.
    """
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(base, local_files_only=local_files_only)
    if getattr(config, "model_type", None) != "grounding-dino":
        raise ValueError(f"base {base} is a {getattr(config, 'model_type', '?')!r} config, not grounding-dino")
    processor = AutoProcessor.from_pretrained(base, local_files_only=local_files_only)
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ValueError(f"base {base} has no Grounding DINO processor (tokenizer + image processor files)")
    return config, processor


def convert_checkpoint(source: Source, config) -> tuple[Conversion, Any]:
    """(conversion, model of ``config`` holding the converted weights); the model is None when the conversion is
    incomplete (``refusal_text`` says why): no model may be written from it then.

    A checkpoint whose decoder layers keep box heads of their own switches ``config`` to unshared heads.
    """
    with torch.random.fork_rng(devices=[]):
        model = build_model(config)
    conversion = convert_state_dict(
        source.state_dict, source.naming, target_shapes(model), model_constants(config),
        share_decoder_box_head=bool(config.decoder_bbox_embed_share),
    )
    if not conversion.ok:
        return conversion, None
    if not conversion.share_decoder_box_head and config.decoder_bbox_embed_share:
        config.decoder_bbox_embed_share = False
        with torch.random.fork_rng(devices=[]):
            model = build_model(config)
    load_converted(model, conversion.tensors)
    return conversion, model


def refusal_text(conversion: Conversion, listed: int = REFUSAL_LISTED) -> str:
    """Why no model may be written from an incomplete conversion: every problem, its keys named."""
    parts = []
    if conversion.missing:
        by_source: dict[str, list[str]] = {}
        for source, target in conversion.missing:
            by_source.setdefault(source, []).append(target)
        items = [f"{source}  (-> {', '.join(targets)})" for source, targets in by_source.items()]
        parts.append(
            f"{len(items)} tensor(s) missing from the checkpoint, leaving {len(conversion.missing)} weight(s) of the "
            f"target model unfilled:\n{_listing(items, listed)}"
        )
    if conversion.mismatched:
        parts.append(f"{len(conversion.mismatched)} tensor(s) do not fit the target model:\n"
                     f"{_listing(conversion.mismatched, listed)}")
    if conversion.unused:
        parts.append(
            f"{len(conversion.unused)} checkpoint key(s) have no place in the target model (another architecture "
            f"or config than the base?):\n{_listing(conversion.unused, listed)}"
        )
    if conversion.refused_values:
        parts.append(f"{len(conversion.refused_values)} value(s) cannot be expressed:\n"
                     f"{_listing(conversion.refused_values, listed)}")
    return "\n".join(parts)


def _listing(items: list[str], listed: int) -> str:
    shown = "\n".join(f"  {item}" for item in items[:listed])
    more = f"\n  ... and {len(items) - listed} more" if len(items) > listed else ""
    return f"{shown}{more}"


def save_verified(model, processor, tensors: Mapping[str, torch.Tensor], out: str | Path) -> int:
    """Write the model and processor to ``out`` (replacing it); returns how many tensors compared equal.

    They are written into a folder beside ``out``, reloaded with plain ``from_pretrained`` and compared with
    ``tensors`` (``verify_saved``) before that folder takes ``out``'s place, so a failed step leaves nothing
    behind and never half a model.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        compared = verify_saved(staging, tensors)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        umask = os.umask(0)
        os.umask(umask)
        out.chmod(0o777 & ~umask)  # mkdtemp made it private
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return compared
