"""Canonical site names and the per-family tables that place them in real models.

The vocabulary (``layers[i].mlp.out``, ``embed``, ``logits`` …) is the same for every model;
each family file (``llama.py``, ``gemma3.py``, ``gpt2.py``) is one declarative table mapping it
onto the modules of that architecture. This package only names and resolves; it runs nothing.

>>> from oculi_dsl.sites import SiteRef
>>> SiteRef.at_layer("mlp.out", 3).label
'layers[3].mlp.out'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, SiteError, did_you_mean
from ._spec import Family, SiteSpec, WeightLayout
from .gemma3 import GEMMA3
from .gpt2 import GPT2
from .llama import LLAMA

FAMILIES: tuple[Family, ...] = (LLAMA, GEMMA3, GPT2)

__all__ = ["FAMILIES", "Family", "SiteRef", "SiteSpec", "WeightLayout", "family_for", "layer_site",
           "model_site"]


def family_for(config: Any) -> Family:
    """The site table for a HF config, chosen by ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ModelError(
        f"Unsupported architecture model_type={model_type!r}. Supported model types: "
        f"{', '.join(supported)}. A new family is one table in oculi_dsl/sites/."
    )


@dataclass(frozen=True)
class SiteRef:
    """A resolved place in the forward pass: a layer site, a model site or a raw module.

    ``kind`` is ``"layer"`` (``name`` on decoder layer ``layer``), ``"model"`` (``embed``,
    ``final_norm``, ``logits``) or ``"module"`` (``name`` is a dotted module path and ``where``
    says input or output).
    """

    kind: str
    name: str
    layer: int | None = None
    where: str = "output"

    @classmethod
    def at_layer(cls, name: str, layer: int) -> SiteRef:
        return cls("layer", name, layer)

    @property
    def label(self) -> str:
        if self.kind == "layer":
            return f"layers[{self.layer}].{self.name}"
        if self.kind == "module":
            return f"module({self.name!r}).{self.where}"
        return self.name

    @property
    def var_name(self) -> str:
        """A netCDF-safe variable name for this site (``layers[3].mlp.out`` → ``l3_mlp_out``)."""
        if self.kind == "layer":
            return f"l{self.layer}_{self.name.replace('.', '_')}"
        if self.kind == "module":
            return f"{self.name.replace('.', '_')}_{self.where}"
        return self.name


def layer_site(family: Family, name: str, layer: int | None = None) -> SiteSpec:
    """Look up a layer site, with a message that lists the valid names and the closest one."""
    spec = family.layer_sites.get(name)
    if spec is not None:
        return spec
    where = f" on layer {layer}" if layer is not None else ""
    if name in family.absent:
        raise SiteError(f"Site '{name}' does not exist{where} ({family.name}): {family.absent[name]}.")
    valid = sorted(family.layer_sites)
    raise SiteError(
        f"Unknown site '{name}'{where} ({family.name}).{did_you_mean(name, valid)} "
        f"Valid: {', '.join(valid)}."
    )


def model_site(family: Family, name: str) -> SiteSpec:
    """Look up a model-level site (``embed``, ``final_norm``, ``logits``)."""
    spec = family.model_sites.get(name)
    if spec is None:
        valid = sorted(family.model_sites)
        raise SiteError(
            f"Unknown model site '{name}' ({family.name}).{did_you_mean(name, valid)} "
            f"Valid: {', '.join(valid)}, layers[i].<site>, module('dotted.path')."
        )
    return spec
