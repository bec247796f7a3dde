"""Round-trip tests for ``oculi_dsl.io``: dtypes, strings, attrs, atomic writes and errors.

Every test writes into pytest's ``tmp_path`` and reads the file back with
``open_dataset``; a few open the file with plain netCDF4 / xarray to pin the on-disk
conventions the results layer relies on.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pytest
import xarray as xr

from oculi_dsl.errors import StorageError
from oculi_dsl.io import JSON_PREFIX, STORED_DTYPE_ATTR, open_dataset, to_netcdf

TOKENS = [" Pär", "日本", "▁", "Ġ", "😀", "", "\n", "Ġthe", "<|endoftext|>", "naïve"]
NUMERIC_DTYPES = [
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
]  # fmt: skip


def roundtrip(ds: xr.Dataset, tmp_path: Path, **kwargs: Any) -> xr.Dataset:
    return open_dataset(to_netcdf(ds, tmp_path / "result.nc", **kwargs))


def sample_values(dtype: np.dtype) -> np.ndarray:
    """Values that probe the edges of ``dtype``: extremes, zero, and NaN/inf for floats."""
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return np.array([0.0, -1.5, info.max, info.min, info.tiny, np.nan, np.inf, -np.inf], dtype)
    info = np.iinfo(dtype)
    return np.array([0, 1, info.max, info.min, info.max - 1], dtype)


def assert_attrs_equal(got: Any, want: Any) -> None:
    """Exact comparison that also checks container types and treats NaN as equal to NaN."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_attrs_equal(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_attrs_equal(got[key], want[key])
    else:
        assert got == want and type(got) is type(want), (got, want)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_numeric_dtype_and_values_survive(tmp_path: Path, dtype: str) -> None:
    values = sample_values(np.dtype(dtype))
    ds = xr.Dataset({"v": ("x", values), "grid": (("a", "b"), values[:4].reshape(2, 2))})
    back = roundtrip(ds, tmp_path)
    for name in ("v", "grid"):
        assert back[name].dtype == np.dtype(dtype) and back[name].attrs == {}
        np.testing.assert_array_equal(back[name].values, ds[name].values)


def test_bfloat16_stays_float32_with_its_attr(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    # What the results layer does: float32 numpy data plus an attr naming the real dtype.
    data = tensor.float().numpy()
    ds = xr.Dataset({"resid": (("layer", "token", "hidden"), data, {"oculi_dtype": "bfloat16"})})
    back = roundtrip(ds, tmp_path)
    assert back["resid"].dtype == np.dtype("float32")
    assert back["resid"].attrs == {"oculi_dtype": "bfloat16"}
    np.testing.assert_array_equal(back["resid"].values, data)
    restored = torch.from_numpy(back["resid"].values).to(torch.bfloat16)
    assert torch.equal(restored, tensor)


def assert_strings(got: xr.DataArray, want: np.ndarray) -> None:
    assert got.dtype.kind in "UO"
    assert all(type(s) is str for s in got.values.ravel().tolist())
    assert got.values.shape == want.shape and got.values.tolist() == want.tolist()


@pytest.mark.parametrize("dtype", [object, str], ids=["object", "unicode"])
def test_unicode_token_strings_survive(tmp_path: Path, dtype: type) -> None:
    tokens = np.array(TOKENS, dtype=dtype)
    grid = np.array([TOKENS[:5], TOKENS[5:]], dtype=dtype)
    ds = xr.Dataset(
        {"text": ("token", tokens), "resid": (("prompt", "token"), np.zeros((2, 10)))},
        coords={
            "token": np.arange(10),
            "token_str": (("prompt", "token"), np.concatenate([grid, grid[::-1]], axis=1)),
            "prompt": np.array(["The capital of France is", "日本の首都は"], dtype=dtype),
        },
    )
    back = roundtrip(ds, tmp_path)
    assert "token_str" in back.coords and back["token_str"].dims == ("prompt", "token")
    assert_strings(back["text"], tokens)
    assert_strings(back["token_str"], ds["token_str"].values)
    assert_strings(back["prompt"], ds["prompt"].values)
    assert back.indexes["prompt"].tolist() == ds["prompt"].values.tolist()
    # A string variable holding nothing but "" is the case most easily lost.
    empty = xr.Dataset(coords={"token_str": (("p", "t"), np.full((2, 3), "", dtype))})
    assert_strings(roundtrip(empty, tmp_path)["token_str"], empty["token_str"].values)


# fmt: off
ATTR_VALUES: dict[str, Any] = {
    "true": True, "false": False, "none": None, "zero": 0, "negative": -5,
    "int64_max": 2**63 - 1, "huge_int": 2**70, "float": 1.5, "nan": float("nan"),
    "inf": float("-inf"), "empty_str": "", "unicode": "日本 Pär ▁Ġ 😀",
    "multiline": "graph:\n  %0 = resid_post[10]\n", "prefix_lookalike": JSON_PREFIX + "x",
    "list": [1, "a", None, True, 2.5], "empty_list": [], "empty_tuple": (), "one_tuple": (7,),
    "tuple": (1, "two", (3, 4)),
    "nested": {"model": {"id": "SmolLM2", "layers": [0, 1, (2, 3)], "ok": False}},
    "int_keys": {1: "x", (1, 2): "y", "s": None}, "tag_lookalike": {"__tuple__": [1, 2]},
    "array": np.array([1, 2, 3]), "one_element_array": np.array([7.0]),
    "empty_array": np.array([], dtype=np.float32), "str_array": np.array(["a", "日本", ""]),
    "matrix": np.arange(6, dtype=np.int16).reshape(2, 3),
    "list_of_arrays": [np.array([True, False])],
}
# fmt: on


@pytest.mark.parametrize("owner", ["dataset", "data_var", "coord"])
def test_attrs_survive_exactly(tmp_path: Path, owner: str) -> None:
    ds = xr.Dataset({"v": ("layer", [1.0, 2.0])}, coords={"layer": [0, 1]})
    target = {"dataset": ds, "data_var": ds["v"], "coord": ds["layer"]}[owner]
    target.attrs.update(ATTR_VALUES)
    back = roundtrip(ds, tmp_path)
    got = {"dataset": back, "data_var": back["v"], "coord": back["layer"]}[owner].attrs
    assert list(got) == list(ATTR_VALUES)
    for key, want in ATTR_VALUES.items():
        assert_attrs_equal(got[key], want)


def test_numpy_scalar_and_datetime_attrs_are_normalised(tmp_path: Path) -> None:
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    attrs = {"f32": np.float32(0.25), "i8": np.int8(-3), "u64": np.uint64(2**64 - 1)}
    attrs |= {"b": np.bool_(True), "time": when, "day": dt.date(2025, 1, 2)}
    got = roundtrip(xr.Dataset(attrs=attrs), tmp_path).attrs
    want = {"f32": 0.25, "i8": -3, "u64": 2**64 - 1, "b": True}
    assert_attrs_equal(got, {**want, "time": "2025-01-02T03:04:05+00:00", "day": "2025-01-02"})
    assert dt.datetime.fromisoformat(got["time"]) == when


def test_on_disk_conventions(tmp_path: Path) -> None:
    ds = xr.Dataset(
        {"hit": ("x", [True, False]), "h": ("x", np.array([0.5, 2], np.float16))},
        attrs={"flag": True, "none": None, "prompts": ["a", "b"], "n": 3, "s": "plain"},
    )
    path = to_netcdf(ds, tmp_path / "c.nc")
    with xr.open_dataset(path, engine="netcdf4") as plain:
        assert plain["hit"].dtype == np.dtype("uint8")
        assert plain["hit"].attrs == {STORED_DTYPE_ATTR: "bool"}
        assert plain["h"].dtype == np.dtype("float32")
        assert plain["h"].attrs == {STORED_DTYPE_ATTR: "float16"}
    with netCDF4.Dataset(path) as raw:
        got = {key: raw.getncattr(key) for key in ds.attrs}
    want = {"flag": "json:true", "none": "json:null", "prompts": 'json:["a", "b"]', "n": 3}
    assert got == {**want, "s": "plain"}
    back = open_dataset(path)
    assert back["hit"].attrs == {} and back["h"].attrs == {}


def test_realistic_result_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prompts = ["The Eiffel Tower is in Paris", "The Eiffel Tower is in London"]
    # fmt: off
    ds = xr.Dataset(
        {
            "resid": (("layer", "prompt", "token", "hidden"), rng.random((3, 2, 4, 8), np.float32)),
            "pattern": (("head", "query", "key"), rng.random((2, 4, 4)), {"site": "attn.pattern"}),
            "hit": ("prompt", [True, False]), "mask": (("query", "key"), np.tri(4, dtype=bool)),
            "when": ("prompt", np.array(["2024-01-01T12:00", "2025-06-30T00:00:01"], "M8[ns]")),
            "loss": ((), 3.25), "empty": ("none", np.zeros(0)),
        },
        coords={
            "layer": np.array([0, 5, 29]), "head": np.array([0, 3], np.int32),
            "query": np.arange(4, dtype=np.uint8), "key": np.arange(4), "token": np.arange(4),
            "prompt": prompts, "component": ("layer", ["attn", "mlp", "resid"]),
            "is_clean": ("prompt", [True, False]),
            "token_str": (("prompt", "token"), [["The", "ĠE", "iff", "el"], ["The", "ĠE", "", "😀"]]),
        },
        attrs={
            "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "architecture": "LlamaForCausalLM",
            "dtype": "bfloat16", "prompts": prompts, "n_layers": 30,
            "graph": "%0 = layers[20].mlp.out\n%1 = set(layers[20].mlp.out, %0)",
            "versions": {"oculi_dsl": "0.1.0", "torch": "2.13"}, "time": "2025-01-02T03:04:05Z",
        },
    )
    # fmt: on
    # Encoding left over from some earlier file must not make the write lossy.
    ds["pattern"].encoding = {"dtype": "int16", "scale_factor": 0.1}
    back = roundtrip(ds, tmp_path, compress=9)
    xr.testing.assert_identical(back, ds)
    for name in ("resid", "pattern", "hit", "mask", "is_clean", "when", "layer", "head", "query"):
        assert back[name].dtype == ds[name].dtype, name
    assert set(back.indexes) == {"layer", "head", "query", "key", "token", "prompt"}
    # A file read back can be written again without stale encoding getting in the way.
    xr.testing.assert_identical(open_dataset(to_netcdf(back, tmp_path / "again.nc")), ds)


def test_accepts_str_returns_absolute_path_and_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    written = to_netcdf(xr.Dataset({"v": ("x", [1, 2])}), "run.nc")
    assert written == tmp_path / "run.nc" and written.is_absolute()
    to_netcdf(xr.Dataset({"w": ("y", [3.0])}), "run.nc")
    assert list(open_dataset("run.nc").data_vars) == ["w"]
    assert os.listdir(tmp_path) == ["run.nc"]


def test_open_dataset_loads_everything_and_closes_the_file(tmp_path: Path) -> None:
    path = to_netcdf(xr.Dataset({"v": ("x", np.arange(5.0))}), tmp_path / "r.nc")
    back = open_dataset(path)
    # Overwriting and then deleting the file must not disturb the dataset already read.
    to_netcdf(back * 2, path)
    path.unlink()
    np.testing.assert_array_equal(back["v"].values, np.arange(5.0))


def test_compression_reduces_size(tmp_path: Path) -> None:
    ds = xr.Dataset(
        {"resid": (("token", "hidden"), np.tile(np.arange(64, dtype=np.float32), (512, 1)))}
    )
    plain = to_netcdf(ds, tmp_path / "plain.nc", compress=0)
    packed = to_netcdf(ds, tmp_path / "packed.nc", compress=4)
    assert packed.stat().st_size * 5 < plain.stat().st_size
    for path, level in ((plain, 0), (packed, 4)):
        with netCDF4.Dataset(path) as raw:
            filters = raw["resid"].filters()
        assert (filters["zlib"], filters["complevel"]) == (level > 0, level)
    xr.testing.assert_identical(open_dataset(packed), ds)


def test_failed_write_leaves_previous_file_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = to_netcdf(xr.Dataset({"v": ("x", [1, 2, 3])}), tmp_path / "r.nc")
    before = path.read_bytes()
    real_write = xr.Dataset.to_netcdf

    def write_then_fail(self: xr.Dataset, target: Any, *args: Any, **kwargs: Any) -> None:
        real_write(self, target, *args, **kwargs)
        Path(target).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", write_then_fail)
    with pytest.raises(StorageError, match="disk full") as info:
        to_netcdf(xr.Dataset({"w": ("x", [9.0])}), path)
    assert isinstance(info.value.__cause__, OSError) and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.nc"]


def _refuse_rename(src: Any, dst: Any) -> None:
    raise PermissionError("read-only")


def _interrupt_write(self: xr.Dataset, target: Any, *args: Any, **kwargs: Any) -> None:
    Path(target).write_bytes(b"partial")
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("owner", "attr", "fake", "raised"),
    [
        (os, "replace", _refuse_rename, StorageError),
        (xr.Dataset, "to_netcdf", _interrupt_write, KeyboardInterrupt),
    ],
    ids=["rename_fails", "interrupted"],
)
def test_failure_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, fake: Any, raised: type
) -> None:
    monkeypatch.setattr(owner, attr, fake)
    # An interrupt must reach the caller as itself, not wrapped in a StorageError.
    with pytest.raises(raised) as info:
        to_netcdf(xr.Dataset({"v": ("x", [1])}), tmp_path / "r.nc")
    assert type(info.value) is raised
    assert os.listdir(tmp_path) == []


def test_netcdf_failure_is_wrapped_and_cleaned_up(tmp_path: Path) -> None:
    ds = xr.Dataset({"mixed": ("x", np.array([1, "a"], dtype=object))})
    with pytest.raises(StorageError, match="mixed") as info:
        to_netcdf(ds, tmp_path / "r.nc")
    assert info.value.__cause__ is not None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["a/b", " lead", "trail ", "", "-dash", "tab\there", "e\u0301"])
def test_bad_variable_name_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(StorageError, match=r"ds = ds\.rename") as info:
        to_netcdf(xr.Dataset({bad: ("x", [1])}), tmp_path / "r.nc")
    assert repr(bad) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_suggested_rename_is_valid(tmp_path: Path) -> None:
    ds = xr.Dataset({"layers/10": ("x", [1])})
    with pytest.raises(StorageError, match=r"ds\.rename\(\{'layers/10': 'layers_10'\}\)"):
        to_netcdf(ds, tmp_path / "r.nc")
    nfc = unicodedata.normalize("NFC", "café_日本")
    renamed = roundtrip(
        ds.rename({"layers/10": "layers_10"}).assign({nfc: ds["layers/10"]}), tmp_path
    )
    assert list(renamed.data_vars) == ["layers_10", nfc]


def _stacked() -> xr.Dataset:
    ds = xr.Dataset({"v": (("a", "b"), np.zeros((2, 2)))}, coords={"a": [0, 1], "b": [0, 1]})
    return ds.stack(ab=("a", "b"))


# What to_netcdf is given, and what its error message must say about the fix.
# fmt: off
REFUSALS: dict[str, tuple[Callable[[], Any], str]] = {
    "dimension_name": (lambda: xr.Dataset({"v": ("a/b", [1])}), r"dimension name 'a/b'.*ds\.rename"),
    "dataset_attr_name": (
        lambda: xr.Dataset(attrs={"a/b": 1}), r"attr name 'a/b'.*ds\.attrs\['a_b'\] = ds\.attrs\.pop"),
    "variable_attr_name": (
        lambda: xr.Dataset({"v": ("x", [1], {" x": 1})}), r"' x' on 'v'.*ds\['v'\]\.attrs\['x'\]"),
    "attr_value": (
        lambda: xr.Dataset(attrs={"site": {"inner": object()}}), r"'site'.*object.*convert it"),
    "complex": (lambda: xr.Dataset({"z": ("x", [1 + 2j])}), r"complex128.*\.real"),
    "reserved_attr": (
        lambda: xr.Dataset({"v": ("x", [1], {STORED_DTYPE_ATTR: "bool"})}),
        rf"{STORED_DTYPE_ATTR}.*del ds\['v'\]\.attrs"),
    "multiindex": (_stacked, r"reset_index\('ab'\)"),
    "dataarray": (lambda: xr.DataArray([1, 2]), r"to_dataset\(name="),
}
# fmt: on


@pytest.mark.parametrize("case", REFUSALS.values(), ids=list(REFUSALS))
def test_refused_before_writing(tmp_path: Path, case: tuple[Callable[[], Any], str]) -> None:
    build, match = case
    with pytest.raises(StorageError, match=match):
        to_netcdf(build(), tmp_path / "r.nc")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("level", [-1, 10, 1.5, True, "4"])
def test_bad_compress_level_is_refused(tmp_path: Path, level: Any) -> None:
    with pytest.raises(StorageError, match=r"compress=.*0 \(off\) to 9"):
        to_netcdf(xr.Dataset(), tmp_path / "r.nc", compress=level)


# How each bad path is used, and what the error must say; every message names the path.
PATH_ERRORS: dict[str, tuple[str, str, str]] = {
    "write_missing_parent": ("write", "no/such/r.nc", "directory .* does not exist.*mkdir"),
    "write_directory": ("write", ".", "is a directory; pass a file path"),
    "read_directory": ("read", ".", "is a directory"),
    "read_missing": ("read", "missing.nc", "no such file"),
    "read_not_netcdf": ("read", "notes.nc", "as netCDF"),
}


@pytest.mark.parametrize("case", PATH_ERRORS.values(), ids=list(PATH_ERRORS))
def test_bad_paths_are_refused(tmp_path: Path, case: tuple[str, str, str]) -> None:
    action, name, match = case
    (tmp_path / "notes.nc").write_text("not a netCDF file")
    path = (tmp_path / name).absolute()
    with pytest.raises(StorageError, match=match) as info:
        if action == "write":
            to_netcdf(xr.Dataset({"v": ("x", [1])}), path)
        else:
            open_dataset(path)
    assert str(path) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["notes.nc"]


def test_bad_path_type_is_refused() -> None:
    with pytest.raises(StorageError, match="pass a str or pathlib.Path"):
        open_dataset(42)  # type: ignore[arg-type]


def test_foreign_json_looking_attr_is_kept_as_text(tmp_path: Path) -> None:
    path = tmp_path / "foreign.nc"
    with netCDF4.Dataset(path, "w") as raw:
        raw.setncattr("note", "json:{broken")
        raw.setncattr("values", np.array([1, 2], dtype=np.int32))
    attrs = open_dataset(path).attrs
    assert attrs["note"] == "json:{broken"
    np.testing.assert_array_equal(attrs["values"], [1, 2])
