"""Hypothesis strategies derived from the wire schema, so every message type is covered."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from proto import codec


def for_spec(spec: codec.Spec, *, max_blob: int = 64, max_list: int = 4
             ) -> st.SearchStrategy[Any]:
    def rec(s: codec.Spec) -> st.SearchStrategy[Any]:
        return for_spec(s, max_blob=max_blob, max_list=max_list)

    if isinstance(spec, codec.IntSpec):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, codec.BoolSpec):
        return st.booleans()
    if isinstance(spec, codec.EnumSpec):
        return st.sampled_from(list(spec.enum_cls))
    if isinstance(spec, codec.BytesSpec):
        top = max(spec.min_len, min(spec.max_len, max_blob))
        return st.binary(min_size=spec.min_len, max_size=top)
    if isinstance(spec, codec.StrSpec):
        return st.text(max_size=min(spec.max_len, max_blob))
    if isinstance(spec, codec.OptSpec):
        return st.none() | rec(spec.inner)
    if isinstance(spec, codec.ListSpec):
        return st.lists(rec(spec.item), max_size=min(spec.max_items, max_list)).map(tuple)
    if isinstance(spec, codec.MapSpec):
        top = min(spec.max_items, max_list)
        return st.dictionaries(rec(spec.key), rec(spec.value), max_size=top)
    if isinstance(spec, codec.StructSpec):
        return for_struct(spec.cls, max_blob=max_blob, max_list=max_list)
    raise TypeError(f"no strategy for {spec!r}")


def for_struct(cls: type[Any], **kw: Any) -> st.SearchStrategy[Any]:
    fields = {f.name: for_spec(f.spec, **kw) for f in codec.schema_of(cls)}

    def build(values: dict[str, Any]) -> Any:
        try:
            return cls(**values)
        except (ValueError, TypeError):
            return None  # cross-field validation rejected this combination

    return st.fixed_dictionaries(fields).map(build).filter(lambda v: v is not None)


def any_message() -> st.SearchStrategy[Any]:
    return st.sampled_from(sorted(codec.registered_messages().items())).flatmap(
        lambda item: for_struct(item[1]))
