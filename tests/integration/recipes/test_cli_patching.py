"""The logit-lens / causal-trace / patch subcommands on a tiny model saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest

import oculi_dsl as oculi
import oculi_dsl._cli_patching as cli_patching
from oculi_dsl.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = oculi.testing.tiny_model("llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_logit_lens_command(model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nc, png = tmp_path / "lens.nc", tmp_path / "lens.png"
    code = main(["logit-lens", "The capital of France is", "--model", model_dir, "--top-k", "4",
                 "--every", "2", "--out", str(nc), "--plot", str(png), "--plot-kind", "trajectory"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Layer  0: [(" in out and "Layer  3: [(" in out and "Layer  1:" not in out
    assert "by layer: L0 " in out
    ds = oculi.open_dataset(nc)
    assert ds["top_probs"].dims == ("layer", "token", "k") and ds.sizes["k"] == 4
    width, height = _png_size(png)
    assert width > 300 and height > 200


def test_causal_trace_and_patch_commands(model_dir: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["causal-trace", "The Eiffel Tower is in Paris", "--subject", "Eiffel Tower",
                 "--model", model_dir, "--samples", "2", "--kind", "all", "--window", "2",
                 "--quiet", "--out", str(tmp_path / "t.nc"), "--plot", str(tmp_path / "t.png")])
    out = capsys.readouterr().out
    assert code == 0 and "Causal trace" in out and "Top 5 cells by recovery:" in out
    assert oculi.open_dataset(tmp_path / "t.nc")["score"].dims == ("site", "token", "layer")
    assert _png_size(tmp_path / "t.png")[0] > 600
    code = main(["patch", "--clean", "The capital of France is", "--corrupt",
                 "The capital of Germany is", "--model", model_dir, "--sites", "attn_out,mlp_out",
                 "--tokens", "all", "--layers", "1:4", "--target", " France", "--wrong", " Germany",
                 "--quiet", "--out", str(tmp_path / "p.nc"), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert code == 0 and "metric logit_diff of ' France'" in out
    ds = oculi.open_dataset(tmp_path / "p.nc")
    assert list(ds["layer"].values) == [1, 2, 3] and ds["recovery"].dims == ("site", "layer", "token")
    assert _png_size(tmp_path / "p.png")[1] > 200


@pytest.mark.parametrize("argv, message", [
    (["patch", "--clean", "The capital of France is", "--corrupt", "The capital of Italy is"],
     "same length"),
    (["patch", "--clean", "a b", "--corrupt", "a c", "--layers", "x"], "--layers 'x' is not understood"),
    (["causal-trace", "The Eiffel Tower is in Paris", "--subject", "Big Ben"], "does not occur"),
    (["logit-lens", "hello", "--target", " Paris", "--target-id", "3"], "not both"),
    (["logit-lens", "hello", "--target", "Paris France"], "encodes to"),
])
def test_user_mistakes_are_one_line_errors(model_dir: str, argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # above it: transformers' weight-loading progress bar
    assert last.startswith(f"oculi-dsl {argv[0]}: error:") and message in last


def test_help_has_examples() -> None:
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("logit-lens", "causal-trace", "patch"):
        text = subs[name].format_help()
        assert "examples:" in text and f"oculi-dsl {name}" in text and "--out" in text


def test_parse_index() -> None:
    assert cli_patching.parse_index("3", "layers") == 3
    assert cli_patching.parse_index("0,5,-1", "layers") == [0, 5, -1]
    assert cli_patching.parse_index("10:20", "layers") == slice(10, 20)
    assert cli_patching.parse_index("all", "tokens") == "all"
    assert cli_patching.parse_index(None, "tokens") is None


def test_demo_extras(tmp_path: Path) -> None:
    model = oculi.testing.tiny_model("gpt2")
    text = cli_patching.run_demo_extras(model, str(tmp_path / "demo"), progress=False)
    assert "Layer  3: [(" in text and "Causal trace" in text
    for name in ("logit-lens", "causal-trace"):
        assert (tmp_path / f"demo-{name}.png").stat().st_size > 2000
        assert oculi.open_dataset(tmp_path / f"demo-{name}.nc").attrs["recipe"].endswith(
            name.replace("-", "_"))
