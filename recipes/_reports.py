"""Reading patching and causal-trace results: the guide's summary, top cells, matrix, heatmap.

These take the Dataset returned by :func:`activation_patching` or :func:`causal_trace`
(recognised by ``ds.attrs["recipe"]``) and never recompute anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ._errors import RecipeError

__all__ = ["plot_recovery", "recovery_matrix", "summary", "top_cells"]


def _kind(ds: xr.Dataset) -> str:
    recipe = str(ds.attrs.get("recipe", ""))
    if recipe.endswith("activation_patching"):
        return "patching"
    if recipe.endswith("causal_trace"):
        return "causal"
    raise RecipeError(f"This Dataset comes from {recipe or 'an unknown recipe'!r}; summary, "
                      "top_cells, recovery_matrix and plot_recovery read the results of "
                      "activation_patching() or causal_trace().")


def _label(cell: dict[str, Any]) -> str:
    parts = []
    if "layer" in cell:
        parts.append(f"L{cell['layer']}")
    if "site" in cell:
        parts.append(str(cell["site"]))
    if "head" in cell:
        parts.append(f"head {cell['head']}")
    if "token" in cell:
        parts.append(f"@{cell['token']} {cell.get('token_str', '')!r}")
    return " ".join(parts)


def top_cells(ds: xr.Dataset, k: int = 5, by: str = "recovery") -> list[dict[str, Any]]:
    """The ``k`` cells with the largest ``by`` (default recovery), best first.

    Each cell is a dict of its coordinates (``site``, ``layer``, ``head``, ``token``,
    ``token_str`` where present) plus ``recovery``, the metric (``metric`` / ``score``) and a
    readable ``label`` such as ``"L22 mlp.out"``.
    """
    _kind(ds)
    if by not in ds.data_vars or not ds[by].dims:
        raise RecipeError(f"by={by!r} is not a gridded variable of this result; valid: "
                          f"{[v for v in ds.data_vars if ds[v].dims]}.")
    var = ds[by]
    values = var.values.reshape(-1)
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:k]
    cells = []
    for flat in order:
        idx = dict(zip(var.dims, np.unravel_index(flat, var.shape), strict=False))
        point = ds.isel(idx)
        cell: dict[str, Any] = {}
        for dim in var.dims:
            cell[str(dim)] = point[dim].item()
        if "token" in var.dims and "token_str" in point.coords:
            cell["token_str"] = str(point["token_str"].values)
        for name in ("recovery", "metric", "score"):
            if name in point.data_vars and point[name].dims == ():
                cell[name] = float(point[name])
        cell["label"] = _label(cell)
        cells.append(cell)
    return cells


def recovery_matrix(ds: xr.Dataset, site: str | None = None) -> xr.DataArray:
    """The recovery table to plot.

    activation_patching: (layer, site) when there is no token/head dim; with ``site=`` (or a
    single site) the (layer, token) or (layer, head) table of that site; other extra dims
    are reduced by max (documented in ``attrs["reduced"]``). causal_trace: (token, layer)
    (of ``site=`` when several kinds were traced).
    """
    kind = _kind(ds)
    rec = ds["recovery"]
    if "site" in rec.dims and (site is not None or rec.sizes["site"] == 1 or kind == "causal"):
        if site is None and rec.sizes["site"] > 1:
            raise RecipeError(f"This result traced several sites {list(ds['site'].values)}; pick "
                              "one with site='mlp.out'.")
        chosen = site if site is not None else str(ds["site"].values[0])
        if chosen not in list(ds["site"].values):
            raise RecipeError(f"site={site!r} is not in this result: {list(ds['site'].values)}.")
        rec = rec.sel(site=chosen)
    if kind == "causal":
        return rec.transpose("token", "layer")
    extra = [d for d in rec.dims if d not in ("layer", "site")]
    if "site" in rec.dims and extra:
        rec = rec.max(extra)
        rec.attrs["reduced"] = f"max over {extra}"
        extra = []
    if "site" in rec.dims:
        return rec.transpose("layer", "site")
    keep = extra[-1:] if extra else []
    if len(extra) > 1:
        rec = rec.max(extra[:-1])
        rec.attrs["reduced"] = f"max over {extra[:-1]}"
    return rec.transpose("layer", *keep)


def summary(ds: xr.Dataset, k: int = 5) -> str:
    """A readable report: the unpatched metrics and the top ``k`` cells (guide chapter 10)."""
    kind = _kind(ds)
    a = ds.attrs
    if kind == "patching":
        clean, corr = float(ds["metric_clean"]), float(ds["metric_corrupt"])
        lines = [f"Activation patching ({a.get('direction')}), metric {a.get('metric')} of "
                 f"{a.get('target_token')!r} at position {a.get('position')}",
                 f"Clean metric: {clean:.4f}", f"Corrupted metric: {corr:.4f}",
                 f"Difference: {clean - corr:.4f}"]
    else:
        high, low = float(ds["high"]), float(ds["low"])
        how = (f"noise ν={float(a.get('nu', float('nan'))):.3g} on {a.get('subject')!r} "
               f"(positions {a.get('subject_positions')}), {a.get('samples')} samples"
               if a.get("mode") == "noise" else f"counterfactual prompt {a.get('corrupt')!r}")
        lines = [f"Causal trace ({a.get('kind')}) of P({a.get('target_token')!r}) for "
                 f"{a.get('prompt')!r}", f"Corruption: {how}",
                 f"Clean (high): {high:.4f}", f"Corrupted (low): {low:.4f}",
                 f"Difference: {high - low:.4f}"]
    lines.append(f"Cells: {a.get('cells')} run in {a.get('forward_passes')} forward passes "
                 f"({a.get('skipped_cells')} provably unchanged, not run)")
    lines.append(f"Top {k} cells by recovery:")
    for cell in top_cells(ds, k):
        lines.append(f"  {cell['label']}: recovery={cell['recovery']:.2f}")
    return "\n".join(lines)


_CMAPS = {"resid_post": "Purples", "mlp.out": "Greens", "attn.out": "Reds"}


def plot_recovery(ds: xr.Dataset, path: str | None = None, *, value: str | None = None) -> Any:
    """Heatmap(s) of a result; returns the matplotlib Figure (saved to ``path`` if given).

    causal_trace: ROME's figure — tokens down, layers across, one panel per traced site,
    subject tokens marked with ``*``, colour = restored probability (``value="score"``,
    default) or ``"recovery"``. activation_patching: recovery per (layer, site), or per
    (layer, token) panels per site for token-level sweeps.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kind = _kind(ds)
    if kind == "causal":
        name = value or "score"
        var = ds[name] if "site" in ds[name].dims else ds[name].expand_dims(site=["resid_post"])
        n = var.sizes["site"]
        fig, axes = plt.subplots(1, n, figsize=(1.5 + 4.2 * n, 1.2 + 0.32 * var.sizes["token"]),
                                 squeeze=False)
        marks = [f"{s}*" if subj else s for s, subj in
                 zip((repr(str(t)) for t in ds["token_str"].values), ds["subject"].values, strict=False)]
        for ax, site in zip(axes[0], var["site"].values, strict=False):
            grid = var.sel(site=site).transpose("token", "layer")
            low = float(ds["low"]) if name == "score" else None
            im = ax.imshow(grid.values, aspect="auto", cmap=_CMAPS.get(str(site), "Purples"),
                           vmin=low, interpolation="nearest")
            ax.set_yticks(range(len(marks)), marks)
            ax.set_xticks(range(grid.sizes["layer"]), [str(v) for v in grid["layer"].values])
            ax.tick_params(axis="x", labelsize=7)
            ax.set(xlabel=f"restored {site} at layer", title=f"{site}")
            fig.colorbar(im, ax=ax, label=f"p({ds.attrs.get('target_token')!r})"
                         if name == "score" else name)
        fig.suptitle(f"Causal trace: {ds.attrs.get('prompt')!r}")
    else:
        rec = ds["recovery"]
        panels = list(ds["site"].values) if any(d in rec.dims for d in ("token", "head")) else [None]
        fig, axes = plt.subplots(1, len(panels), squeeze=False,
                                 figsize=(1.5 + 4.0 * len(panels), 2.2 + 0.25 * rec.sizes["layer"]))
        for ax, site in zip(axes[0], panels, strict=False):
            grid = recovery_matrix(ds, site=site)
            cols = grid.dims[1] if grid.ndim == 2 else None
            data = grid.values if grid.ndim == 2 else grid.values[:, None]
            im = ax.imshow(data, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, origin="lower",
                           interpolation="nearest")
            ax.set_yticks(range(grid.sizes["layer"]), [str(v) for v in grid["layer"].values])
            if cols is not None:
                labels = (ds["token_str"].values if cols == "token" and "token_str" in ds.coords
                          else grid[cols].values)
                ax.set_xticks(range(grid.sizes[cols]), [repr(str(x)) if cols == "token" else str(x)
                                                        for x in labels], rotation=45, ha="right")
            ax.set(ylabel="Layer", xlabel=cols or "", title=site or "Causal importance")
            fig.colorbar(im, ax=ax, label="Recovery Score")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
