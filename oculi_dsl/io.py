"""Write result datasets to netCDF files and read them back exactly as they were.

netCDF stores fewer things than a result ``xarray.Dataset`` holds, so :func:`to_netcdf`
encodes the gaps and :func:`open_dataset` undoes them. The on-disk conventions are:

* ``bool`` and ``float16`` variables are stored as ``uint8`` / ``float32`` with the variable
  attr ``oculi_io_dtype`` set to the original dtype; reading casts them back and drops the attr.
* bfloat16 values arrive from the results layer as float32 with the attr
  ``oculi_dtype = "bfloat16"``; that attr is an ordinary string and is kept, and the data
  stays float32 after reading (numpy has no bfloat16).
* Attr values netCDF cannot hold (bool, None, list, tuple, dict, arrays, big ints, and any
  string that itself starts with the prefix) are stored as strings ``"json:<JSON>"``. Tuples,
  arrays and dicts with non-string keys are tagged inside the JSON so they come back as such.
  Numbers come back as Python ``int`` / ``float``; datetimes are stored as ISO strings.

Writes are atomic: a temporary file next to the target is written, fsynced and renamed over
the target, so a failed write never leaves a partial file behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import secrets
import unicodedata
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final

import numpy as np
import pandas as pd
import xarray as xr

from .errors import StorageError

__all__ = ["JSON_PREFIX", "STORED_DTYPE_ATTR", "open_dataset", "to_netcdf"]

ENGINE: Final = "netcdf4"
JSON_PREFIX: Final = "json:"
STORED_DTYPE_ATTR: Final = "oculi_io_dtype"

# dtype stored on disk for each dtype netCDF lacks; both casts are exact.
_STORED_AS: dict[str, np.dtype] = {"bool": np.dtype("uint8"), "float16": np.dtype("float32")}
# Single-key JSON objects that mark a value JSON itself cannot express.
_TAGS = ("__tuple__", "__ndarray__", "__items__")
_INT64 = np.iinfo(np.int64)
_ARRAY_ATTR_KINDS = "biufU"


# ----------------------------------------------------------------------------- names


def _name_problem(name: Hashable) -> str | None:
    """Why netCDF-C would refuse ``name`` (its ``NC_check_name`` rules), or None if it is fine."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a str"
    if name == "":
        return "it is empty"
    if unicodedata.normalize("NFC", name) != name:
        # netCDF normalises names to NFC, so the name would come back different.
        return "it is not in Unicode NFC form"
    first = name[0]
    if first.isascii() and not (first.isalnum() or first == "_"):
        return f"it starts with {first!r} (use a letter, digit or '_')"
    for ch in name:
        if ch == "/" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"it contains {ch!r}"
    if name[-1] in " \t\n\r\f\v":
        return "it ends with whitespace"
    return None


def _suggest_name(name: Hashable) -> str:
    text = unicodedata.normalize("NFC", str(name))
    text = "".join("_" if ch == "/" or ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)
    text = text.strip()
    if not text:
        return "unnamed"
    if text[0].isascii() and not (text[0].isalnum() or text[0] == "_"):
        text = "v" + text
    return text


def _check_name(name: Hashable, kind: str, owner: str | None = None) -> None:
    problem = _name_problem(name)
    if problem is None:
        return
    new = _suggest_name(name)
    if kind == "attr":
        where = "ds.attrs" if owner is None else f"ds[{owner!r}].attrs"
        fix = f"{where}[{new!r}] = {where}.pop({name!r})"
    else:
        fix = f"ds = ds.rename({{{name!r}: {new!r}}})"
    on = "" if owner is None else f" on {owner!r}"
    raise StorageError(
        f"{kind} name {name!r}{on} cannot be stored in netCDF: {problem}. Rename it, e.g. {fix}"
    )


# ----------------------------------------------------------------------------- attrs


def _to_json(value: Any, where: str) -> Any:
    """Turn an attr value into plain JSON data, tagging what JSON would otherwise lose."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_ATTR_KINDS:
            raise StorageError(
                f"attr {where} is an array of dtype {value.dtype}, which cannot be stored; "
                "convert it with .astype(float) or .astype(str) first"
            )
        data = {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.tolist()}
        return {"__ndarray__": data}
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _to_json(v, where) for k, v in value.items()}
        items = [[_to_json(k, where), _to_json(v, where)] for k, v in value.items()]
        return {"__items__": items}
    raise StorageError(
        f"attr {where} has a value of type {type(value).__name__} ({value!r:.80}), which cannot "
        "be stored; convert it to a str, number, bool, None, list, tuple or dict first"
    )


def _from_json(data: Any) -> Any:
    if isinstance(data, list):
        return [_from_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        ((key, inner),) = data.items()
        if key == "__tuple__":
            return tuple(_from_json(v) for v in inner)
        if key == "__ndarray__":
            return np.array(inner["data"], dtype=inner["dtype"]).reshape(inner["shape"])
        if key == "__items__":
            return {_hashable(_from_json(k)): _from_json(v) for k, v in inner}
    return {k: _from_json(v) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    # A list key can only be a tuple that went through a plain JSON list; make it hashable again.
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _encode_attr(value: Any, where: str) -> str | int | float:
    """Return a value netCDF can store natively, falling back to a ``json:`` string."""
    if isinstance(value, str) and not value.startswith(JSON_PREFIX):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if _INT64.min <= int(value) <= _INT64.max:
            return int(value)
    elif isinstance(value, (float, np.floating)):
        return float(value)
    elif isinstance(value, (_dt.date, _dt.time)):
        return _encode_attr(value.isoformat(), where)
    text = json.dumps(_to_json(value, where), ensure_ascii=False, allow_nan=True)
    return JSON_PREFIX + text


def _decode_attr(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        try:
            return _from_json(json.loads(value[len(JSON_PREFIX) :]))
        except (ValueError, TypeError, KeyError):
            # Not one of ours (a foreign file): keep the text rather than refuse the file.
            return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    return value


def _encode_attrs(attrs: Mapping[Any, Any], owner: str | None) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        _check_name(key, "attr", owner)
        where = f"{key!r}" if owner is None else f"{key!r} of {owner!r}"
        out[key] = _encode_attr(value, where)
    return out


# ----------------------------------------------------------------------------- variables


def _encode_variable(name: str, var: xr.Variable, compress: int, is_data: bool) -> xr.Variable:
    if STORED_DTYPE_ATTR in var.attrs:
        raise StorageError(
            f"variable {name!r} has the attr {STORED_DTYPE_ATTR!r}, which oculi-dsl reserves "
            f"for its own dtype bookkeeping; remove it with del ds[{name!r}].attrs"
            f"[{STORED_DTYPE_ATTR!r}]"
        )
    attrs = _encode_attrs(var.attrs, name)
    dtype = var.dtype
    if dtype.kind == "c":
        raise StorageError(
            f"variable {name!r} has dtype {dtype}, which netCDF cannot store; split it first, "
            f"e.g. ds[{name + '_real'!r}] = ds[{name!r}].real and the same with .imag"
        )
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise StorageError(
            f"variable {name!r} has dtype {dtype}, which netCDF cannot store; cast it first "
            f"with ds[{name!r}] = ds[{name!r}].astype('float64')"
        )
    if dtype.kind == "V":
        raise StorageError(
            f"variable {name!r} has structured dtype {dtype}, which netCDF cannot store; "
            "store each field as its own variable"
        )
    if dtype.name in _STORED_AS:
        var = var.astype(_STORED_AS[dtype.name])
        attrs[STORED_DTYPE_ATTR] = dtype.name
    elif dtype.kind == "T":
        # numpy's variable-width StringDType: xarray writes object arrays of str as NC_STRING.
        var = var.astype(object)
    out = var.copy(deep=False)
    out.attrs = attrs
    # Encoding inherited from a file this data was read from may not fit the new file.
    out.encoding = {}
    if is_data and compress and out.dtype.kind in "biuf" and out.ndim and out.size:
        out.encoding = {"zlib": True, "complevel": compress, "shuffle": True}
    return out


def _decode_variable(var: xr.Variable) -> xr.Variable:
    attrs = {key: _decode_attr(value) for key, value in var.attrs.items()}
    stored = attrs.get(STORED_DTYPE_ATTR)
    if stored in _STORED_AS:
        del attrs[STORED_DTYPE_ATTR]
        var = var.astype(stored)
        var.encoding = {}
    out = var.copy(deep=False)
    out.attrs = attrs
    return out


def _rebuild(ds: xr.Dataset, fn: Callable[[str, xr.Variable, bool], xr.Variable]) -> xr.Dataset:
    """Rebuild ``ds`` with every variable passed through ``fn``, keeping the coord/data split."""
    coords = {name: fn(str(name), ds.variables[name], False) for name in ds.coords}
    data_vars = {name: fn(str(name), ds.variables[name], True) for name in ds.data_vars}
    return xr.Dataset(data_vars, coords=coords)


def _encode_dataset(ds: xr.Dataset, compress: int) -> xr.Dataset:
    for dim, index in ds.indexes.items():
        if isinstance(index, pd.MultiIndex):
            raise StorageError(
                f"dimension {dim!r} has a MultiIndex, which netCDF cannot store; flatten it "
                f"first with ds = ds.reset_index({dim!r})"
            )
    for dim in ds.dims:
        _check_name(dim, "dimension")
    for name in ds.variables:
        _check_name(name, "variable")
    out = _rebuild(ds, lambda name, var, is_data: _encode_variable(name, var, compress, is_data))
    out.attrs = _encode_attrs(ds.attrs, None)
    return out


# ----------------------------------------------------------------------------- files


def _as_path(path: str | os.PathLike[str]) -> pathlib.Path:
    try:
        return pathlib.Path(os.fspath(path)).expanduser()
    except TypeError as err:
        raise StorageError(
            f"path {path!r} is a {type(path).__name__}; pass a str or pathlib.Path"
        ) from err


def _fsync(path: pathlib.Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems cannot fsync a directory; the file itself was already synced.
        if not directory:
            raise
    finally:
        os.close(fd)


def to_netcdf(ds: xr.Dataset, path: str | os.PathLike[str], *, compress: int = 4) -> pathlib.Path:
    """Write ``ds`` to ``path`` atomically and return the absolute path written.

    Numeric data variables are zlib-compressed at level ``compress`` (0 turns it off).
    The parent directory must exist; an existing file at ``path`` is replaced only once the
    new file is complete, and left untouched when writing fails.

    >>> import xarray as xr
    >>> ds = xr.Dataset({"resid": ("layer", [0.5, 1.5])}, attrs={"prompts": ["Hi"]})
    >>> to_netcdf(ds, "run.nc").name
    'run.nc'
    >>> open_dataset("run.nc").attrs["prompts"]
    ['Hi']
    """
    if not isinstance(ds, xr.Dataset):
        hint = " Use da.to_dataset(name='x') first." if isinstance(ds, xr.DataArray) else ""
        raise StorageError(f"to_netcdf needs an xarray.Dataset, got {type(ds).__name__}.{hint}")
    if isinstance(compress, bool) or not isinstance(compress, int) or not 0 <= compress <= 9:
        raise StorageError(
            f"compress={compress!r} is not a zlib level; pass an int from 0 (off) to 9"
        )
    target = _as_path(path).absolute()
    if target.is_dir():
        raise StorageError(
            f"{target} is a directory; pass a file path such as {target / 'result.nc'}"
        )
    if not target.parent.is_dir():
        raise StorageError(
            f"cannot write {target}: directory {target.parent} does not exist; create it "
            "first with pathlib.Path(...).mkdir(parents=True)"
        )
    encoded = _encode_dataset(ds, compress)
    # Same directory as the target, so os.replace is an atomic rename on one file system.
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        encoded.to_netcdf(tmp, engine=ENGINE, format="NETCDF4")
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, Exception):
            raise
        raise StorageError(
            f"could not write {target}: {type(err).__name__}: {err}. The previous file, if "
            "any, is unchanged; check the names, dtypes and attrs of the dataset and free "
            "disk space"
        ) from err
    _fsync(target.parent, directory=True)
    return target


def open_dataset(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read a file written by :func:`to_netcdf` fully into memory and close it.

    bool and float16 variables, attrs and strings come back as they were written.
    bfloat16 variables come back as float32 with the attr ``oculi_dtype = "bfloat16"``;
    turn one back into a tensor with
    ``torch.from_numpy(ds[name].values).to(torch.bfloat16)``.

    >>> import xarray as xr
    >>> _ = to_netcdf(xr.Dataset({"ok": ("prompt", [True, False])}), "flags.nc")
    >>> open_dataset("flags.nc")["ok"].dtype
    dtype('bool')
    """
    source = _as_path(path).absolute()
    if not source.exists():
        raise StorageError(f"cannot read {source}: no such file; check the path")
    if source.is_dir():
        raise StorageError(f"cannot read {source}: it is a directory, not a netCDF file")
    try:
        with xr.open_dataset(source, engine=ENGINE) as opened:
            loaded = opened.load()
    except Exception as err:
        raise StorageError(
            f"cannot read {source} as netCDF: {type(err).__name__}: {err}. Is it a file "
            "written by oculi.to_netcdf or xarray's to_netcdf?"
        ) from err
    out = _rebuild(loaded, lambda _name, var, _is_data: _decode_variable(var))
    out.attrs = {key: _decode_attr(value) for key, value in loaded.attrs.items()}
    out.encoding = dict(loaded.encoding)
    return out
