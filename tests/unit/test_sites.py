"""Unit tests of ``oculi_dsl.sites``: names, per-family tables, look-up errors and suggestions.

No forward pass runs here: tables are checked against the module tree of tiny models and
look-ups against the error messages users see.
"""

from __future__ import annotations

import pytest
import torch

from oculi_dsl.errors import ModelError, SiteError
from oculi_dsl.sites import FAMILIES, SiteRef, family_for, layer_site, model_site
from oculi_dsl.testing import tiny_model

BY_NAME = {f.name: f for f in FAMILIES}
CORE = ("resid_pre", "attn.out", "resid_mid", "mlp.act", "mlp.out", "resid_post")
GATED = {"llama": ("mlp.gate", "mlp.up"), "gemma3": ("mlp.gate", "mlp.up"), "gpt2": ("mlp.pre",)}
DIMS = {
    "resid_pre": ("token", "d_model"), "attn.out": ("token", "d_model"),
    "resid_mid": ("token", "d_model"), "resid_post": ("token", "d_model"),
    "mlp.out": ("token", "d_model"), "mlp.act": ("token", "neuron"),
    "mlp.gate": ("token", "neuron"), "mlp.up": ("token", "neuron"), "mlp.pre": ("token", "neuron"),
}


def test_families_present() -> None:
    assert set(BY_NAME) >= {"llama", "gemma3", "gpt2"}


# -- SiteRef ------------------------------------------------------------------------------------

def test_siteref_labels_and_var_names() -> None:
    site = SiteRef("layer", "mlp.out", 3)
    assert site.label == "layers[3].mlp.out"
    assert site.var_name == "l3_mlp_out"
    assert SiteRef("model", "logits").label == "logits"
    assert SiteRef("model", "logits").var_name == "logits"
    raw = SiteRef("module", "model.layers.3.mlp.down_proj", where="input")
    assert raw.label == "module('model.layers.3.mlp.down_proj').input"
    assert raw.var_name == "model_layers_3_mlp_down_proj_input"


def test_siteref_is_hashable_and_compares_by_value() -> None:
    assert SiteRef("layer", "resid_post", 1) == SiteRef("layer", "resid_post", 1)
    assert len({SiteRef("layer", "resid_post", 1), SiteRef("layer", "resid_post", 1),
                SiteRef("layer", "resid_post", 2)}) == 2


@pytest.mark.parametrize("name", sorted(DIMS))
def test_var_names_are_netcdf_safe(name: str) -> None:
    var = SiteRef("layer", name, 12).var_name
    assert var.replace("_", "").isalnum() and not var[0].isdigit()


# -- tables ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_core_sites_and_dims(family: str) -> None:
    table = BY_NAME[family]
    for name in (*CORE, *GATED[family]):
        spec = layer_site(table, name)
        assert spec.dims == DIMS[name], name
    for name in ("embed", "final_norm"):
        assert model_site(table, name).dims == ("token", "d_model")
    assert model_site(table, "logits").dims == ("token", "vocab")


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_site_order_follows_the_forward_pass(family: str) -> None:
    table = BY_NAME[family]
    order = [layer_site(table, n).order for n in ("resid_pre", "attn.out", "resid_mid", "mlp.out",
                                                  "resid_post")]
    assert order == sorted(order) and len(set(order)) == len(order)
    assert layer_site(table, "resid_mid").order < layer_site(table, "mlp.act").order \
        < layer_site(table, "mlp.out").order


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_every_table_entry_names_a_real_module(family: str) -> None:
    model = tiny_model(family, n_layers=2)
    table = BY_NAME[family]
    assert family_for(model.hf.config) is table
    modules = dict(model.hf.named_modules())
    assert table.layers in modules
    for name, spec in table.layer_sites.items():
        path = f"{table.layers}.1" + (f".{spec.module}" if spec.module else "")
        assert path in modules, f"{family}: {name} -> {path}"
        if name in CORE or name in GATED[family]:
            assert spec.where in ("input", "output")
    for name, spec in table.model_sites.items():
        assert spec.module in modules, f"{family}: {name} -> {spec.module!r}"


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_absent_sites_are_not_sites(family: str) -> None:
    table = BY_NAME[family]
    assert not set(table.absent) & set(table.layer_sites)


# -- look-up errors ---------------------------------------------------------------------------

def test_unknown_site_suggests_and_lists() -> None:
    with pytest.raises(SiteError) as info:
        layer_site(BY_NAME["llama"], "mlp.outt", 0)
    msg = str(info.value)
    assert "Did you mean 'mlp.out'?" in msg
    assert "layer 0" in msg
    for name in CORE:
        assert name in msg


@pytest.mark.parametrize("typo,fix", [("resid_psot", "resid_post"), ("resid_per", "resid_pre"),
                                      ("atn.out", "attn.out"), ("mlp.akt", "mlp.act")])
def test_suggestions(typo: str, fix: str) -> None:
    with pytest.raises(SiteError, match=f"Did you mean '{fix.replace('.', '[.]')}'"):
        layer_site(BY_NAME["llama"], typo)


def test_no_suggestion_for_nonsense() -> None:
    with pytest.raises(SiteError) as info:
        layer_site(BY_NAME["gpt2"], "zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Valid:" in str(info.value)


@pytest.mark.parametrize("name", ["mlp.gate", "mlp.up"])
def test_gpt2_is_not_gated(name: str) -> None:
    with pytest.raises(SiteError) as info:
        layer_site(BY_NAME["gpt2"], name, 2)
    msg = str(info.value)
    assert name in msg and "not gated" in msg and "mlp.pre" in msg


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gated_families_have_no_pre(family: str) -> None:
    with pytest.raises(SiteError, match="mlp.gate"):
        layer_site(BY_NAME[family], "mlp.pre")


def test_unknown_model_site() -> None:
    with pytest.raises(SiteError) as info:
        model_site(BY_NAME["llama"], "logit")
    msg = str(info.value)
    assert "Did you mean 'logits'" in msg and "embed" in msg and "final_norm" in msg


def test_unsupported_architecture() -> None:
    class Config:
        model_type = "bert"

    with pytest.raises(ModelError) as info:
        family_for(Config())
    msg = str(info.value)
    assert "bert" in msg and "llama" in msg and "gpt2" in msg and "gemma3_text" in msg


def test_site_errors_from_the_trace_surface() -> None:
    """The same look-up reached through ``t.layers[i].<group>.<site>`` (recording only)."""
    import oculi_dsl as oculi

    model = tiny_model("llama", n_layers=2)
    t = oculi.trace(model, "The capital")
    with pytest.raises(SiteError, match="Did you mean 'mlp.out'"):
        t.layers[0].mlp.outt  # noqa: B018
    with pytest.raises(SiteError, match="Did you mean 'resid_post'"):
        t.layers[0].resid_posst  # noqa: B018
    with pytest.raises(SiteError, match=r"0\.\.1"):
        t.layers[2]  # noqa: B018
    with pytest.raises(SiteError):
        t.layers[torch.tensor(0)]  # noqa: B018
    with pytest.raises(SiteError, match="empty"):
        t.layers[3:3]  # noqa: B018
    with pytest.raises(SiteError, match="Did you mean 'model.norm'"):
        t.module("model.nrom")
    with pytest.raises(AttributeError, match="Did you mean 'logits'"):
        t.logit  # noqa: B018
