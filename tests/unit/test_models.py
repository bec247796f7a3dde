"""Fast tests of model loading and wrapping: no download, no network, tiny models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl import _default_model as dm
from oculi_dsl.errors import ModelError
from oculi_dsl.testing import tiny_model

ALIASES = ("smollm2-135m", "gemma3-270m")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make hub look-ups fail at once instead of after the hub client's network retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- cache location -------------------------------------------------------------------------


def test_cache_dir_prefers_oculi_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OCULI_DSL_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "mine"


def test_cache_dir_uses_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OCULI_DSL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "xdg" / "oculi-dsl"


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OCULI_DSL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dm.cache_dir() == tmp_path / ".cache" / "oculi-dsl"


def test_model_cache_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OCULI_DSL_CACHE", str(tmp_path))
    assert dm.model_cache_path("smollm2-135m") == tmp_path / "models" / "smollm2-135m-instruct"
    assert dm.model_cache_path("gemma3-270m") == tmp_path / "models" / "gemma3-270m"
    assert set(dm.BUILTINS) == set(ALIASES)
    assert dm.DEFAULT_ALIAS == "smollm2-135m"


def test_cache_needs_the_marker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OCULI_DSL_CACHE", str(tmp_path))
    folder = dm.model_cache_path("smollm2-135m")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not dm.is_cached("smollm2-135m")  # a half-written folder is not a cache
    (folder / dm.MARKER).write_text(json.dumps({"format": dm.CACHE_FORMAT + 1}))
    assert not dm.is_cached("smollm2-135m")  # an older or newer layout is rebuilt
    (folder / dm.MARKER).write_text(json.dumps({"format": dm.CACHE_FORMAT}))
    assert dm.is_cached("smollm2-135m")


# --- building the cache, without the real download --------------------------------------------


def _fake_builtin(fetch: object) -> dm.BuiltinModel:
    return dm.BuiltinModel(
        alias="fake", model_id="fake-llama", cache_name="fake-llama", packages=("fake==1",),
        gguf_name="fake.gguf", approx_mb=1, dequantize_s=1,
        expected={"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64},
        fetch=fetch,  # type: ignore[arg-type]
    )


def test_build_cache_then_load_from_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OCULI_DSL_CACHE", str(tmp_path))
    source = tiny_model("llama", n_layers=2)

    def fetch(model: dm.BuiltinModel, work: Path, progress: bool) -> Path:
        (work / model.gguf_name).write_bytes(b"gguf")
        return work / model.gguf_name

    monkeypatch.setitem(dm.BUILTINS, "fake", _fake_builtin(fetch))
    monkeypatch.setattr(dm, "_dequantize", lambda m, g, p: (source.hf, source.tokenizer))
    hf_model, tokenizer, model_id = dm.load_builtin("fake", progress=True)
    assert model_id == "fake-llama"
    assert "cached fake-llama at" in capsys.readouterr().err
    assert dm.is_cached("fake")
    # Only the finished folder is left: no scratch folders, no GGUF.
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fake-llama"]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, source.hf(ids).logits)

    # The second load reads the cache: building again would fail.
    monkeypatch.setattr(dm, "_dequantize", lambda m, g, p: pytest.fail("cache not used"))
    dm.load_builtin("fake", progress=False)
    assert capsys.readouterr().err == ""


def test_interrupted_build_leaves_no_cache(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("OCULI_DSL_CACHE", str(tmp_path))

    def fetch(model: dm.BuiltinModel, work: Path, progress: bool) -> Path:
        (work / "partial.whl").write_bytes(b"x" * 100)
        raise ModelError("network went away")

    monkeypatch.setitem(dm.BUILTINS, "fake", _fake_builtin(fetch))
    with pytest.raises(ModelError, match="network went away"):
        dm.load_builtin("fake", progress=False)
    assert not dm.is_cached("fake")
    assert list((tmp_path / "models").iterdir()) == []


def test_load_dispatches_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    source = tiny_model("gemma3")
    calls: list[str] = []

    def fake_load_builtin(alias: str, *, progress: bool = True, **kw: object) -> tuple:
        calls.append(alias)
        return source.hf, source.tokenizer, dm.BUILTINS[alias].model_id

    monkeypatch.setattr(dm, "load_builtin", fake_load_builtin)
    assert oculi.load().info.model_id == "SmolLM2-135M-Instruct"
    assert oculi.load("GEMMA3-270M").info.model_id == "gemma-3-270m"
    assert calls == ["smollm2-135m", "gemma3-270m"]


# --- errors ---------------------------------------------------------------------------------


def test_unknown_alias_suggests_the_close_one() -> None:
    with pytest.raises(ModelError) as info:
        oculi.load("smollm2-13m")
    message = str(info.value)
    assert "Did you mean 'smollm2-135m'?" in message
    assert all(alias in message for alias in ALIASES)


def test_missing_path_lists_aliases(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        oculi.load(str(tmp_path / "no" / "such" / "model"))
    message = str(info.value)
    assert "does not exist" in message
    assert all(alias in message for alias in ALIASES)


def test_unreachable_hub_id_is_chained(no_hub: None) -> None:
    with pytest.raises(ModelError) as info:
        oculi.load("no-such-org/no-such-model")
    assert info.value.__cause__ is not None
    assert all(alias in str(info.value) for alias in ALIASES)


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    tiny_model("llama", n_layers=1).hf.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="oculi.wrap"):
        oculi.load(str(tmp_path))


def test_bad_argument_types_and_dtypes(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="wrap"):
        oculi.load(123)  # type: ignore[arg-type]
    saved = _save_tiny("gpt2", tmp_path)
    with pytest.raises(ModelError, match="bfloat16"):
        oculi.load(str(saved), dtype="bfloat17")
    with pytest.raises(ModelError, match="cpu"):
        oculi.load(str(saved), device="no-such-device")


# --- loading local folders ------------------------------------------------------------------


def _save_tiny(family: str, folder: Path) -> Path:
    model = tiny_model(family, n_layers=2)
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_load_local_folder(family: str, tmp_path: Path) -> None:
    _save_tiny(family, tmp_path)
    model = oculi.load(str(tmp_path))
    source = tiny_model(family, n_layers=2)
    assert model.info.model_id == str(tmp_path)
    assert model.info.family == source.info.family
    assert not model.hf.training
    enc = model.tokenizer("The capital of France is", return_tensors="pt")
    assert enc.input_ids.tolist() == [source.tokenizer("The capital of France is").input_ids]
    with torch.no_grad():
        assert torch.allclose(model.hf(**enc).logits, source.hf(**enc).logits, atol=1e-6)


def test_load_applies_dtype_and_device(tmp_path: Path) -> None:
    _save_tiny("llama", tmp_path)
    model = oculi.load(tmp_path, dtype="bfloat16", device="cpu")
    assert model.info.dtype == torch.bfloat16
    assert model.info.device == torch.device("cpu")
    assert oculi.load(tmp_path, dtype=torch.float16).info.dtype == torch.float16


# --- wrap -----------------------------------------------------------------------------------

EXPECTED_INFO = {
    # family: (architecture, n_heads, n_kv_heads, d_head, n_neurons)
    "llama": ("LlamaForCausalLM", 4, 2, 16, 128),
    "gemma3": ("Gemma3ForCausalLM", 4, 1, 32, 128),
    "gpt2": ("GPT2LMHeadModel", 4, 4, 16, 256),
}


def test_wrap_reads_model_info(tiny: oculi.OculiModel) -> None:
    wrapped = oculi.wrap(tiny.hf, tiny.tokenizer, model_id="mine")
    info = wrapped.info
    architecture, heads, kv_heads, d_head, neurons = EXPECTED_INFO[info.family]
    assert (info.model_id, info.architecture, info.n_layers) == ("mine", architecture, 4)
    assert (info.n_heads, info.n_kv_heads, info.d_head, info.n_neurons) == (
        heads, kv_heads, d_head, neurons)
    assert (info.d_model, info.vocab) == (64, len(tiny.tokenizer))
    assert (info.dtype, info.device) == (torch.float32, torch.device("cpu"))
    assert len(wrapped.layers) == 4
    assert oculi.wrap(wrapped) is wrapped


def test_wrap_rejects_non_models() -> None:
    with pytest.raises(ModelError, match="AutoModelForCausalLM"):
        oculi.wrap(torch.nn.Linear(2, 2))
