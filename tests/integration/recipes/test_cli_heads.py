"""``oculi-dsl heads`` and ``oculi-dsl dla`` on a tiny model saved to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import oculi_dsl as oculi
import oculi_dsl._cli_heads  # noqa: F401  (registers the subcommands)
from oculi_dsl.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    model = oculi.testing.tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_heads_writes_table_netcdf_and_png(tiny_dir: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "heads.nc", tmp_path / "heads.png"
    code = main(["heads", "--model", tiny_dir, "--seq-len", "6", "--batch", "2",
                 "--threshold", "0.1", "--show", "2", "--circuits", "2",
                 "--out", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert code == 0
    assert "repeated random tokens: B=2, T=6" in text and "BOS prepended" in text
    assert "heads labelled (score >= 0.1)" in text
    assert "induction score per layer" in text and "induction circuits" in text
    ds = oculi.open_dataset(out)
    assert ds["label"].dims == ("layer", "head") and "loss_second_half" in ds
    width, height = _image_size(png)
    assert 600 <= width <= 3000 and 200 <= height <= 2000


def test_heads_on_text(tiny_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["heads", "--model", tiny_dir, "--text", "a b c a b c a b c"]) == 0
    assert "scores on the text 'a b c a b c a b c'" in capsys.readouterr().out


def test_dla_prints_top_components(tiny_dir: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "dla.nc", tmp_path / "dla.png"
    code = main(["dla", "The capital of France is", "--model", tiny_dir, "--target", " Paris",
                 "--wrong", " London", "--top", "4", "--out", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert code == 0
    assert "logit(' Paris') − logit(' London')" in text
    assert "top 4 components by |DLA|" in text
    ds = oculi.open_dataset(out)
    np.testing.assert_allclose(float(ds["total"]), float(ds["logit"]), atol=1e-4)
    model_line = next(line for line in text.splitlines() if line.startswith("logit("))
    assert f"model {float(ds['logit']):+.4f}" in model_line
    width, height = _image_size(png)
    assert 600 <= width <= 3000 and 200 <= height <= 2000


def test_dla_by_token_id_without_heads(tiny_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dla", "Once upon a", "--model", tiny_dir, "--target", "42", "--no-heads"]) == 0
    text = capsys.readouterr().out
    assert "top 9 components" in text  # embed + 4 × (attn, mlp), no heads


def test_user_errors_exit_2(tiny_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dla", "The capital", "--model", tiny_dir, "--target", "Paris London"]) == 2
    err = capsys.readouterr().err
    assert "oculi-dsl dla: error:" in err and "encodes to 2 tokens" in err
    assert main(["heads", "--model", tiny_dir, "--seq-len", "1"]) == 2
    assert "seq_len must be an int >= 2" in capsys.readouterr().err


def test_help_lists_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("heads", "dla"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "examples:" in capsys.readouterr().out
