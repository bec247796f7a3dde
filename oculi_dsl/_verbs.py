"""Intervention verbs on attention sites: ``q.scale``, ``k.scale``, ``heads[h].ablate``, ``expanded``.

Each verb checks its arguments while recording (alpha, head ranges, which site it is on) and
records ordinary graph nodes that edit the site, exactly like a slice assignment would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _ops
from .errors import RecordError, SiteError

if TYPE_CHECKING:
    from .proxy import OculiProxy


def layer_part(value: Any, i: int, n: int) -> Any:
    from .proxy import layer_part as part

    return part(value, i, n)


def _site(proxy: OculiProxy, verb: str, allowed: tuple[str, ...]) -> str:
    binding = proxy._binding
    site = binding.site if binding is not None and binding.index is None else None
    if binding is not None and binding.index is not None:
        site = "attn.heads[h]"
    if site not in allowed:
        raise RecordError(
            f".{verb}() applies to {' / '.join(allowed)}, not to {proxy._describe()}. "
            f"Call it on the site directly, e.g. `t.layers[3].{allowed[0]}.{verb}(...)`."
        )
    return site  # type: ignore[return-value]


def _check_head(value: int, n: int, what: str, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -n <= value < n:
        raise SiteError(f"{what} {value!r} is out of range for {model}: valid {what}s are 0..{n - 1}.")
    return value % n


def scale(proxy: OculiProxy, alpha: float, *, head: int | None, kv_head: int | None) -> None:
    site = _site(proxy, "scale", ("attn.q", "attn.k"))
    info = proxy.tracer.info
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise RecordError(f"scale alpha must be a number > 0 (alpha > 1 sharpens, < 1 flattens), got {alpha!r}.")
    if site == "attn.q":
        if kv_head is not None:
            raise RecordError("attn.q.scale takes head=<query head>, not kv_head=. "
                              "To scale a KV head's keys use attn.k.scale(alpha, kv_head=g).")
        if head is None:
            raise RecordError("attn.q.scale needs head=<query head>, e.g. q.scale(1.5, head=5).")
        h = _check_head(head, info.n_heads, "query head", info.model_id)
    else:
        if head is not None:
            raise RecordError(
                f"attn.k.scale takes kv_head=, not head=: keys are shared by query heads under GQA "
                f"({info.n_heads} query heads, {info.n_kv_heads} KV heads), so scaling a key "
                "changes every query head of its group. To scale one query head use "
                "attn.q.scale(alpha, head=h); to scale the whole group use kv_head=h // "
                f"{info.n_heads // info.n_kv_heads}."
            )
        if kv_head is None:
            raise RecordError("attn.k.scale needs kv_head=<KV head>, e.g. k.scale(1.5, kv_head=0).")
        h = _check_head(kv_head, info.n_kv_heads, "KV head", info.model_id)
    # q is (..., head, token, d_head) and k (..., kv_head, token, d_head)
    index = (Ellipsis, h, slice(None), slice(None))
    proxy.tracer.edit_each(proxy._binding, lambda part, i: proxy.tracer.create_proxy(  # type: ignore[arg-type]
        "call_function", _ops.scale_at, (part, float(alpha), index), {}))


def ablate(proxy: OculiProxy, kind: str, reference: Any) -> None:
    _site(proxy, "ablate", ("attn.heads[h]",))
    if kind not in ("zero", "mean"):
        raise RecordError(f"Unknown ablation kind {kind!r}. Valid: 'zero', 'mean' (with reference=).")
    if kind == "zero":
        fn: Any = _ops.zeros_like
    else:
        if reference is None:
            raise RecordError(
                "Mean ablation needs reference values: pass reference=<the same head in an invoke "
                "over reference prompts>, e.g. `ref.layers[l].attn.heads[h]` with "
                "`ref = t.invoke([...reference prompts...])` (mean over prompts, per position), "
                "or a tensor of values."
            )
        fn = _ops.mean_over_prompts
    binding = proxy._binding
    n = len(binding.keys)  # type: ignore[union-attr]

    def make(part: Any, i: int) -> Any:
        args = (part,) if kind == "zero" else (part, layer_part(reference, i, n))
        return proxy.tracer.create_proxy("call_function", fn, args, {})

    proxy.tracer.edit_each(binding, make)  # type: ignore[arg-type]


def expanded(proxy: OculiProxy) -> OculiProxy:
    _site(proxy, "expanded", ("attn.k", "attn.v"))
    info = proxy.tracer.info
    n_rep = info.n_heads // info.n_kv_heads
    # kv_head is the third dim from the end: (..., kv_head, token, d_head)
    return proxy.tracer.create_proxy("call_function", _ops.expand_kv, (proxy, n_rep), {})  # type: ignore[return-value]
