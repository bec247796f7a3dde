"""Label: saved tensors + the plan's dim labels → one ``xarray.Dataset``.

Each saved value becomes a variable with the dims the compiler derived (``layer``, ``token`` …),
coords for the positions it holds (layer and head indices, token positions with their text in
``token_str``, prompt texts) and attrs with provenance. Values of different invokes whose dims
would disagree (e.g. prompts of different lengths) keep their own dim, suffixed with the
variable's name, so nothing is silently aligned or padded. bfloat16 is stored as float32 with
``oculi_dtype = "bfloat16"`` noted.
"""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
from typing import Any

import numpy as np
import torch
import xarray as xr

from .dims import TOKEN_LIKE, Axis
from .errors import ResultError
from .inputs import Segment
from .models import OculiModel
from .plan import Plan, Save

_INDEXED = ("layer", "head", "kv_head", "prompt", "step", "component")


def to_numpy(value: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """A saved value as numpy, plus attrs noting a dtype numpy cannot hold."""
    attrs: dict[str, Any] = {}
    if isinstance(value, torch.Tensor):
        value = value.detach()
        attrs["dtype"] = str(value.dtype).removeprefix("torch.")
        if value.dtype == torch.bfloat16:
            attrs["oculi_dtype"] = "bfloat16"
            value = value.float()
        return value.cpu().numpy(), attrs
    try:
        return np.asarray(value), attrs
    except Exception as err:
        raise ResultError(f"Saved value of type {type(value).__name__} cannot become an array.") from err


def _axis_coords(axis: Axis, dim: str, seg: Segment | None, axes: tuple[Axis, ...]) -> dict[str, Any]:
    coords: dict[str, Any] = {}
    if axis.index is None:
        return coords
    if axis.name in TOKEN_LIKE:
        coords[dim] = np.asarray(axis.index)
        if seg is not None:
            prompt_axis = next((a for a in axes if a.name == "prompt"), None)
            if seg.single:
                coords[f"{axis.name}_str"] = (dim, [seg.token_strs[0][i] for i in axis.index])
            elif prompt_axis is not None and prompt_axis.index is not None:
                pdim = "prompt"
                table = [[seg.token_strs[p][i] for i in axis.index] for p in prompt_axis.index]
                coords[f"{axis.name}_str"] = ((pdim, dim), table)
                # left padding: False where a prompt has no token at that position
                pad = [seg.length - len(seg.token_ids[p]) for p in prompt_axis.index]
                coords[f"{axis.name}_mask"] = ((pdim, dim), [[i >= n for i in axis.index] for n in pad])
    elif axis.name in _INDEXED or not _every_position(axis.index):
        coords[dim] = np.asarray(axis.index)
        if axis.name == "prompt" and seg is not None:
            coords["prompt_text"] = (dim, [seg.prompts[i] for i in axis.index])
    return coords


def _every_position(index: Any) -> bool:
    """True when an axis still holds positions 0..n-1 in order (no coord needed)."""
    if isinstance(index, range):
        return index.start == 0 and index.step == 1
    return list(index) == list(range(len(index)))


def _variable(save: Save, value: Any, plan: Plan) -> tuple[tuple[str, ...], np.ndarray, dict[str, Any], dict[str, Any]]:
    data, attrs = to_numpy(value)
    labels = save.labels
    if labels is None or len(labels) != data.ndim or any(
            a.index is not None and len(a.index) != n for a, n in zip(labels, data.shape, strict=False)):
        labels = tuple(Axis(f"{save.name}_dim{i}") for i in range(data.ndim))
    seg = plan.batch.segments[save.invoke] if save.invoke is not None else None
    dims = tuple(a.name if a.name != "new" else f"{save.name}_new{i}" for i, a in enumerate(labels))
    coords: dict[str, Any] = {}
    for axis, dim in zip(labels, dims, strict=False):
        coords.update(_axis_coords(axis, dim, seg, labels))
    attrs["sites"] = ", ".join(save.sites)
    attrs["invoke"] = -1 if save.invoke is None else save.invoke
    return dims, data, coords, attrs


def _signature(dim: str, size: int, coords: dict[str, Any]) -> tuple[Any, ...]:
    related = []
    for name, c in sorted(coords.items()):
        # a multi-dim coord (token_str over prompt, token) belongs to its last dim
        if _coord_dims(c, name)[-1] == dim:
            values = c[1] if isinstance(c, tuple) else c
            related.append((name, repr(np.asarray(values).tolist())))
    return (size, tuple(related))


def _coord_dims(c: Any, name: str) -> tuple[str, ...]:
    if isinstance(c, tuple):
        return (c[0],) if isinstance(c[0], str) else tuple(c[0])
    return (name,)


def _rename(dims: tuple[str, ...], coords: dict[str, Any], old: str, suffix: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Give dim ``old`` (and every coord on it) this variable's own name."""
    new = f"{old}_{suffix}"
    out: dict[str, Any] = {}
    for name, c in coords.items():
        cdims = _coord_dims(c, name)
        if old not in cdims:
            out[name] = c
            continue
        values = c[1] if isinstance(c, tuple) else c
        out[new if name == old else f"{name}_{suffix}"] = (
            tuple(new if d == old else d for d in cdims), values)
    return tuple(new if d == old else d for d in dims), out


def to_dataset(plan: Plan, saved: dict[str, Any], model: OculiModel, graph: str) -> xr.Dataset:
    """Build the result Dataset of a trace (see module docstring)."""
    seen: dict[str, tuple[Any, ...]] = {}
    variables, all_coords = {}, {}
    for save in plan.saves:
        dims, data, coords, attrs = _variable(save, saved[save.name], plan)
        for dim, size in zip(dims, data.shape, strict=False):
            sig = _signature(dim, size, coords)
            if seen.setdefault(dim, sig) != sig:
                dims, coords = _rename(dims, coords, dim, save.name)
        variables[save.name] = xr.Variable(dims, data, attrs)
        all_coords.update(coords)
    ds = xr.Dataset(variables, coords=all_coords)
    ds.attrs.update(_provenance(plan, model, graph))
    return ds


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("oculi-dsl", "torch", "transformers", "xarray", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _provenance(plan: Plan, model: OculiModel, graph: str) -> dict[str, Any]:
    info = model.info
    return {
        "model_id": info.model_id,
        "architecture": info.architecture,
        "family": info.family,
        "dtype": str(info.dtype).removeprefix("torch."),
        "n_layers": info.n_layers,
        "prompts": [p for seg in plan.batch.segments for p in seg.prompts],
        "invokes": [list(seg.prompts) for seg in plan.batch.segments],
        "graph": graph,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
