"""Recipes II on the real default model (SmolLM2-135M-Instruct): heads, DLA, composition, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from oculi_dsl.recipes import (
    attention_entropy,
    component_attribution,
    composition_scores,
    direct_logit_attribution,
    head_scores,
    induction_circuits,
)

import oculi_dsl as oculi
import oculi_dsl._cli_heads  # noqa: F401  (registers the subcommands)
from oculi_dsl.cli import main
from oculi_dsl.models import OculiModel

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def _random_init(model: OculiModel) -> OculiModel:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(model.hf.config)
    return oculi.wrap(hf.eval(), model.tokenizer)


def test_induction_heads_trained_vs_random(default_model: OculiModel) -> None:
    """Two forward passes (~10 s on an idle 2-core CPU): the protocol's B = 10, T = 50 on the
    trained model; B = 5, T = 25 on the random-init one (chance level is then ≈ 1/40)."""
    trained = head_scores(default_model)  # B = 10, T = 50, seed 0; SmolLM2 adds no BOS
    assert trained.attrs["bos"] == 0
    strong = int((trained["induction"] > 0.4).sum())
    assert strong >= 3, f"only {strong} heads with induction score > 0.4"
    first, second = float(trained["loss_first_half"]), float(trained["loss_second_half"])
    assert second < 0.5 * first, (first, second)
    random = head_scores(_random_init(default_model), seq_len=25, batch=5)
    assert float(random["induction"].max()) < 0.1
    assert float(random["loss_second_half"]) > 0.8 * float(random["loss_first_half"])


def test_dla_identity_on_default_model(default_model: OculiModel) -> None:
    ds = direct_logit_attribution(default_model, PROMPT, " Paris")
    assert abs(float(ds["total"]) - float(ds["logit"])) < 1e-4
    kinds = ds["component_kind"].values
    heads = ds["head_dla"].sum("head").values + ds["head_bias"].values
    np.testing.assert_allclose(heads, ds["dla"].values[kinds == "attn"], atol=1e-4)
    diff = direct_logit_attribution(default_model, PROMPT, " Paris", wrong=" London")
    assert abs(float(diff["total"]) - float(diff["logit"])) < 1e-4
    assert float(diff["logit"]) > 0  # the model prefers Paris
    comp = component_attribution(default_model, PROMPT, " Paris", wrong=" London")
    total = float(comp["attribution"].sum() + comp["embed"] + comp["bias"])
    assert abs(total - float(comp["logit"])) < 1e-4


def test_composition_and_circuits(default_model: OculiModel) -> None:
    ds = composition_scores(default_model, layers=range(14, 20), progress=False)
    for kind in "qkv":
        values = ds[f"{kind}_composition"].values
        assert ((values >= 0) & (values <= 1)).all()
    baseline = float(ds["k_baseline"])
    assert baseline == pytest.approx(576 ** -0.5, rel=0.1)
    scores = head_scores(default_model, seq_len=30, batch=4)
    circuits = induction_circuits(default_model, scores=scores, composition=ds)
    assert circuits.sizes["circuit"] > 0
    # the best previous-token → induction pair composes far above chance
    assert float(circuits["k_composition"][0]) > 2 * baseline


def test_entropy_on_default_model(default_model: OculiModel) -> None:
    ds = attention_entropy(default_model, PROMPT, skip_queries=1)
    assert ds["head_entropy"].shape == (30, 9)
    assert np.nanmax(ds["entropy_norm"].values) <= 1 + 1e-6


def test_cli_heads_and_dla_on_default_model(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    heads_nc, heads_png = tmp_path / "heads.nc", tmp_path / "heads.png"
    assert main(["heads", "--out", str(heads_nc), "--plot", str(heads_png)]) == 0
    text = capsys.readouterr().out
    assert "induction" in text and "loss first half" in text
    dla_nc, dla_png = tmp_path / "dla.nc", tmp_path / "dla.png"
    assert main(["dla", PROMPT, "--target", " Paris", "--wrong", " London",
                 "--out", str(dla_nc), "--plot", str(dla_png)]) == 0
    text = capsys.readouterr().out
    assert "top 10 components" in text
    heads = oculi.open_dataset(heads_nc)
    assert heads["label"].shape == (30, 9) and int((heads["label"] == "induction").sum()) >= 3
    dla = oculi.open_dataset(dla_nc)
    assert abs(float(dla["total"]) - float(dla["logit"])) < 1e-4
    for png in (heads_png, dla_png):
        with Image.open(png) as image:
            width, height = image.size
        assert 600 <= width <= 3000 and 300 <= height <= 2000
