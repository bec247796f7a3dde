"""causal_trace: the ROME protocol equals a plain per-cell hook loop; windows, modes, errors."""

from __future__ import annotations

import numpy as np
import pytest
from oculi_dsl.recipes import causal_trace, plot_recovery, recovery_matrix, summary, top_cells
from oculi_dsl.recipes.causal_trace import window_layers

import oculi_dsl as oculi
from oculi_dsl.errors import OculiError
from oculi_dsl.models import OculiModel

from ._loops import count_forwards, matrix_std, rome_loop

PROMPT = "The Eiffel Tower is in Paris"


def _ids(model: OculiModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


@pytest.mark.parametrize("kind", [None, "mlp", "attn"])
def test_noise_trace_equals_rome_loop(tiny: OculiModel, kind: str | None) -> None:
    ds = causal_trace(tiny, PROMPT, subject="Eiffel Tower", kind=kind, window=3, samples=3,
                      seed=1, chunk_size=5, progress=False)
    ids = _ids(tiny, PROMPT)
    subj = ds.attrs["subject_positions"]
    assert [tiny.tokenizer.decode([ids[i]]) for i in subj] == [" Eiffel", " Tower"]
    nu = 3.0 * matrix_std(tiny)
    assert abs(ds.attrs["nu"] - nu) < 1e-6 * nu
    site = {None: "resid_post", "mlp": "mlp.out", "attn": "attn.out"}[kind]
    n_layers = tiny.info.n_layers
    cells = [([lay] if kind is None else window_layers(lay, 3, n_layers), site, tok)
             for tok in range(len(ids)) for lay in range(n_layers)]
    ref = rome_loop(tiny, ids, subj, nu, 3, 1, cells, -1, ds.attrs["target_id"])
    np.testing.assert_allclose(ds["score"].values.reshape(-1), ref, atol=1e-5, rtol=0)
    base = rome_loop(tiny, ids, subj, nu, 3, 1, [([], site, 0)], -1, ds.attrs["target_id"])
    assert abs(float(ds["low"]) - base[0]) < 1e-5
    assert ds["score"].dims == ("token", "layer")
    assert list(ds["subject"].values) == [i in subj for i in range(len(ids))]


def test_counterfactual_trace_equals_loop(tiny: OculiModel) -> None:
    clean, corrupt = "The capital of France is", "The capital of Germany is"
    ds = causal_trace(tiny, clean, subject="France", corrupt=corrupt, kind=[None, "mlp", "attn"],
                      window=2, progress=False)
    assert ds["score"].dims == ("site", "token", "layer")
    ids, cids = _ids(tiny, clean), _ids(tiny, corrupt)
    n_layers = tiny.info.n_layers
    for site, kind in (("resid_post", None), ("mlp.out", "mlp"), ("attn.out", "attn")):
        cells = [([lay] if kind is None else window_layers(lay, 2, n_layers), site, tok)
                 for tok in range(len(ids)) for lay in range(n_layers)]
        ref = rome_loop(tiny, ids, [], 0.0, 1, 0, cells, -1, ds.attrs["target_id"], corrupt=cids)
        np.testing.assert_allclose(ds["score"].sel(site=site).values.reshape(-1), ref, atol=1e-5, rtol=0)
    # restoring the whole last hidden state at the last token is the clean run: its score is
    # the clean one, so recovery is 1 up to that float error over the (here tiny) clean-corrupt gap
    last = ds.sel(site="resid_post").isel(token=-1, layer=-1)
    assert abs(float(last["score"]) - float(ds["high"])) < 1e-8
    gap = abs(float(ds["high"]) - float(ds["low"]))
    assert abs(float(last["recovery"]) - 1.0) < max(1e-5, 1e-8 / gap)


def test_window_formula() -> None:
    assert window_layers(0, 10, 30) == list(range(0, 5))
    assert window_layers(15, 10, 30) == list(range(10, 20))
    assert window_layers(29, 10, 30) == list(range(24, 30))
    assert window_layers(5, 3, 30) == [4, 5, 6]
    assert window_layers(2, 1, 4) == [2]


def test_seeded_and_batched_in_few_passes() -> None:
    model = oculi.testing.tiny_model("llama")
    with count_forwards(model) as calls:
        a = causal_trace(model, PROMPT, subject="Eiffel Tower", samples=4, chunk_size=6, progress=False)
    assert len(calls) == a.attrs["forward_passes"] <= -(-a.attrs["cells"] // 6) + 1
    b = causal_trace(model, PROMPT, subject="Eiffel Tower", samples=4, progress=False)
    np.testing.assert_allclose(a["score"].values, b["score"].values, atol=1e-6)
    c = causal_trace(model, PROMPT, subject="Eiffel Tower", samples=4, seed=5, progress=False)
    assert not np.allclose(a["low"].values, c["low"].values)
    # tokens before the subject are provably unchanged: exactly `low`
    assert (a["score"].isel(token=slice(0, 2)).values == float(a["low"])).all()


def test_later_passes_resume_at_their_first_layer_and_position(tiny: OculiModel) -> None:
    """Each pass after the first runs only the layers and positions its cells can change, as
    planned; the scores still equal a plain per-cell loop."""
    from oculi_dsl.recipes._chunks import plan_chunks

    layers = tiny.hf.get_submodule(tiny.family.layers)
    calls: list[tuple[int, int]] = []  # (layer, positions run) per decoder-layer call
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: calls.append((i, (a[0] if a else k["hidden_states"]).shape[1])),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        ds = causal_trace(tiny, PROMPT, subject="Eiffel Tower", samples=2, chunk_size=7,
                          progress=False)
    finally:
        for h in handles:
            h.remove()
    ids = _ids(tiny, PROMPT)
    subj = ds.attrs["subject_positions"]
    cells_ = [(lay, tok) for tok in range(subj[0], len(ids)) for lay in range(4)]
    plan = plan_chunks([lay for lay, _ in cells_], [tok for _, tok in cells_], 7, 4, len(ids), 2, 1)
    assert ds.attrs["forward_passes"] == len(plan) + 1 <= -(-len(cells_) // 7) + 2
    expected = [(i, len(ids)) for i in range(4)]  # the baseline pass
    for chunk in plan:
        expected += [(i, len(ids) - chunk.position) for i in range(chunk.layer, 4)]
    assert calls == expected
    assert any(c.layer for c in plan) and any(c.position for c in plan)
    cells = [([lay], "resid_post", tok) for tok in range(len(ids)) for lay in range(4)]
    ref = rome_loop(tiny, ids, subj, ds.attrs["nu"], 2, 0, cells, -1, ds.attrs["target_id"])
    np.testing.assert_allclose(ds["score"].values.reshape(-1), ref, atol=1e-5, rtol=0)



def test_std_choices_and_position_zero() -> None:
    model = oculi.testing.tiny_model("gpt2")  # no BOS: 'The' is position 0
    with pytest.warns(UserWarning, match="position 0 is never noised"):
        ds = causal_trace(model, PROMPT, subject="The Eiffel", samples=2, progress=False)
    assert ds.attrs["subject_positions"] == [1]
    subj = causal_trace(model, PROMPT, subject=[1, 2], std="subject", samples=2, progress=False)
    fixed = causal_trace(model, PROMPT, subject=[1, 2], std=0.5, noise=2.0, samples=2, progress=False)
    assert subj.attrs["nu"] != ds.attrs["nu"] and fixed.attrs["nu"] == 1.0
    gemma = oculi.testing.tiny_model("gemma3")
    g = causal_trace(gemma, PROMPT, subject="Eiffel", samples=2, progress=False)
    assert abs(g.attrs["nu"] - 3 * matrix_std(gemma)) < 1e-5  # √d_model embedding scale


def test_helpers_and_netcdf(tmp_path) -> None:
    model = oculi.testing.tiny_model("llama")
    ds = causal_trace(model, PROMPT, subject="Eiffel Tower", kind=[None, "mlp"], window=2,
                      samples=2, progress=False)
    text = summary(ds)
    assert "Causal trace" in text and "Corrupted (low)" in text and "recovery=" in text
    cells = top_cells(ds, 4)
    assert len(cells) == 4 and {"site", "token", "layer", "token_str", "recovery"} <= set(cells[0])
    assert recovery_matrix(ds, site="mlp.out").dims == ("token", "layer")
    with pytest.raises(OculiError, match="several sites"):
        recovery_matrix(ds)
    fig = plot_recovery(ds, str(tmp_path / "trace.png"))
    assert len(fig.axes) == 4 and (tmp_path / "trace.png").stat().st_size > 2000
    back = oculi.open_dataset(oculi.to_netcdf(ds, tmp_path / "trace.nc"))
    np.testing.assert_array_equal(back["score"].values, ds["score"].values)
    assert back.attrs["subject_positions"] == ds.attrs["subject_positions"]


@pytest.mark.parametrize("kwargs, match", [
    ({"subject": "Big Ben"}, "does not occur in the prompt"),
    ({"subject": "Eiffel", "kind": "mlps"}, "kind='mlps' is not valid"),
    ({"subject": "Eiffel", "window": 0}, "window=0"),
    ({"subject": "Eiffel", "samples": 0}, "samples=0"),
    ({"subject": "Eiffel", "noise": -1.0}, "noise=-1.0"),
    ({"subject": "Eiffel", "std": "dataset"}, "std='dataset'"),
    ({"subject": "Eiffel", "corrupt": "The Colosseum is in Paris"}, "same length"),
    ({"subject": [0]}, "covers no position"),
    ({"subject": "Eiffel", "target": " Eiffel Tower"}, "encodes to 2 tokens"),
])
@pytest.mark.filterwarnings("ignore:The subject starts at position 0")
def test_errors(kwargs, match) -> None:
    model = oculi.testing.tiny_model("llama")
    with pytest.raises(OculiError, match=match):
        causal_trace(model, PROMPT, progress=False, **kwargs)
