"""Recipes I on the real default model (SmolLM2-135M-Instruct): logit lens, patching, tracing, CLI.

Kept small (a few layers / tokens per check) so the whole file runs in well under 3 minutes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integration.recipes._loops import matrix_std, patch_loop, rome_loop
from oculi_dsl.recipes import activation_patching, causal_trace, logit_lens
from oculi_dsl.recipes.causal_trace import window_layers

from oculi_dsl.models import OculiModel

pytestmark = pytest.mark.slow

PROMPT, CORRUPT = "The capital of France is", "The capital of Poland is"


def _ids(model: OculiModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


def test_logit_lens_finds_paris(default_model: OculiModel) -> None:
    ds = logit_lens(default_model, PROMPT, target=" Paris", keep_logits=True, positions=[-1])
    last = ds.isel(layer=-1, token=-1)
    assert str(last["top_tokens"].values[0]) == " Paris"
    with torch.no_grad():
        logits = default_model.hf(input_ids=torch.tensor([_ids(default_model, PROMPT)])).logits[0, -1]
    np.testing.assert_allclose(last["logits"].values, logits.numpy(), atol=1e-5, rtol=0)
    traj = ds["target_prob"].isel(token=-1)
    assert traj.sizes["layer"] == 30
    assert float(traj.isel(layer=-1)) > 0.5 > float(traj.isel(layer=10))
    assert int(ds["target_rank"].isel(layer=-1, token=-1)) == 0


def test_patching_equals_hook_loop(default_model: OculiModel) -> None:
    sites, layers = ["resid_post", "attn.out", "mlp.out"], [0, 29]
    # 4 cells per pass: the passes after the first resume at their first layer and position
    ds = activation_patching(default_model, PROMPT, CORRUPT, sites=sites, layers=layers,
                             tokens=[-2, -1], target=" Paris", chunk_size=4, progress=False)
    assert ds.attrs["forward_passes"] <= 1 + 3 + 1
    cells = [(s, lay, None, tok) for s in sites for lay in layers for tok in (3, 4)]
    target = ds.attrs["target_id"]
    ref = patch_loop(default_model, _ids(default_model, PROMPT), _ids(default_model, CORRUPT), cells,
                     -1, lambda lg: lg.softmax(-1)[target])
    np.testing.assert_allclose(ds["metric"].values.reshape(-1), ref, atol=1e-5, rtol=0)
    assert abs(float(ds["recovery"].sel(site="resid_post", layer=29, token=4)) - 1.0) < 1e-5
    assert float(ds["metric_clean"]) > 0.5 > float(ds["metric_corrupt"])


def test_causal_trace_equals_rome_loop(default_model: OculiModel) -> None:
    ids = _ids(default_model, PROMPT)
    for kind, site in ((None, "resid_post"), ("mlp", "mlp.out")):
        ds = causal_trace(default_model, PROMPT, subject="France", kind=kind, samples=3,
                          layers=[0, 10, 20], chunk_size=2, progress=False)  # later passes resume
        nu = 3.0 * matrix_std(default_model)
        assert abs(ds.attrs["nu"] - nu) < 1e-6
        cells = [([lay] if kind is None else window_layers(lay, 10, 30), site, tok)
                 for tok in (3, 4) for lay in (0, 10, 20)]
        ref = rome_loop(default_model, ids, [3], nu, 3, 0, cells, -1, ds.attrs["target_id"])
        got = ds["score"].sel(token=[3, 4]).values.reshape(-1)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
        assert float(ds["high"]) > 0.5 and float(ds["low"]) < 0.1


def test_cli_end_to_end(default_model: OculiModel, tmp_path, capsys) -> None:
    from PIL import Image

    import oculi_dsl as oculi
    import oculi_dsl._cli_patching  # noqa: F401  (registers the subcommands)
    from oculi_dsl.cli import main

    runs = {
        "lens": ["logit-lens", PROMPT, "--every", "5", "--target", " Paris"],
        "trace": ["causal-trace", PROMPT, "--subject", "France", "--samples", "2", "--quiet"],
        "patch": ["patch", "--clean", PROMPT, "--corrupt", CORRUPT, "--quiet"],
    }
    printed = {}
    for name, argv in runs.items():
        nc, png = tmp_path / f"{name}.nc", tmp_path / f"{name}.png"
        assert main([*argv, "--out", str(nc), "--plot", str(png)]) == 0
        out = printed[name] = capsys.readouterr().out
        ds = oculi.open_dataset(nc)
        assert ds.attrs["model_id"] == "SmolLM2-135M-Instruct"
        with Image.open(png) as image:
            width, height = image.size
        assert width >= 400 and height >= 200, (name, image.size)
        assert f"wrote {png}" in out
    assert "Layer 29: [(' Paris'" in printed["lens"]
    assert "Corrupted (low):" in printed["trace"] and "Clean metric:" in printed["patch"]
    lens = oculi.open_dataset(tmp_path / "lens.nc")
    assert str(lens["top_tokens"].isel(layer=-1, token=-1, k=0).values) == " Paris"
    trace = oculi.open_dataset(tmp_path / "trace.nc")
    assert trace["score"].dims == ("token", "layer") and trace.sizes["layer"] == 30
    patch = oculi.open_dataset(tmp_path / "patch.nc")
    assert list(patch["site"].values) == ["resid_post", "attn.out", "mlp.out"]
    assert main(["patch", "--clean", PROMPT, "--corrupt", "The capital of the United Kingdom is"]) == 2
    assert "same length" in capsys.readouterr().err
