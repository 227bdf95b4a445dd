"""``canonical``: the one serialisation whose bytes are hashed into the chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.records import canonical

# Below the surrogate block, UTF-16 code-unit order (RFC 8785) and code-point order agree.
bmp_text = st.text(alphabet=st.characters(max_codepoint=0xD7FF), max_size=8)
json_ints = st.integers(min_value=-(2**53), max_value=2**53)
json_values = st.recursive(
    st.none() | st.booleans() | json_ints | bmp_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(bmp_text, children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(bmp_text, json_values, max_size=6)


def _assert_keys_sorted_at_every_depth(data: bytes) -> None:
    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys)
        return dict(pairs)

    json.loads(data, object_pairs_hook=check)


def test_keys_are_sorted_at_every_depth() -> None:
    value = {"b": {"z": 1, "a": [{"y": None, "x": True}]}, "a": "first"}
    assert canonical(value) == b'{"a":"first","b":{"a":[{"x":true,"y":null}],"z":1}}'


@settings(max_examples=100, deadline=None)
@given(value=json_objects)
def test_output_is_compact_sorted_utf8_json_that_parses_back_to_the_value(
    value: dict[str, Any],
) -> None:
    data = canonical(value)
    _assert_keys_sorted_at_every_depth(data)
    assert orjson.loads(data) == value
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert data == expected.encode("utf-8")


def test_output_has_no_whitespace_between_tokens_and_keeps_non_ascii_unescaped() -> None:
    assert canonical({"k": [1, 2], "é": "ü €"}) == '{"k":[1,2],"é":"ü €"}'.encode()


def _shuffled(value: Any, data: st.DataObject) -> Any:
    """The same value with every dict rebuilt in a drawn insertion order."""
    if isinstance(value, dict):
        items = data.draw(st.permutations(list(value.items())))
        return {k: _shuffled(v, data) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, data) for v in value]
    return value


@settings(max_examples=100, deadline=None)
@given(value=json_objects, data=st.data())
def test_equal_dicts_in_any_insertion_order_give_identical_bytes(
    value: dict[str, Any], data: st.DataObject
) -> None:
    assert canonical(_shuffled(value, data)) == canonical(value)


@pytest.mark.parametrize("bad", [1.0, 0.5, {"a": 1.5}, [1, [2, {"x": 3.0}]], float("nan")])
def test_floats_are_rejected_at_any_depth(bad: Any) -> None:
    with pytest.raises(TypeError):
        canonical(bad)


@pytest.mark.parametrize("edge", [2**53, -(2**53), 0, True, False])
def test_integers_up_to_two_to_the_53_are_accepted(edge: int) -> None:
    assert orjson.loads(canonical({"n": edge})) == {"n": edge}


@pytest.mark.parametrize("bad", [2**53 + 1, -(2**53) - 1, 2**63, -(2**64), 10**30])
def test_integers_beyond_two_to_the_53_are_rejected_at_any_depth(bad: int) -> None:
    for value in (bad, {"n": bad}, [[{"n": bad}]]):
        with pytest.raises(TypeError):
            canonical(value)


@pytest.mark.parametrize("bad_key", [1, None, True, (1, 2), b"k"])
def test_non_string_keys_are_rejected_at_any_depth(bad_key: Any) -> None:
    for value in ({bad_key: 1}, {"ok": {bad_key: 1}}, [{bad_key: 1}]):
        with pytest.raises(TypeError):
            canonical(value)


@pytest.mark.parametrize("bad", [b"bytes", {1, 2}, datetime(2024, 1, 1, tzinfo=UTC), object()])
def test_values_outside_plain_json_are_rejected(bad: Any) -> None:
    with pytest.raises(TypeError):
        canonical({"v": bad})


def test_keys_are_sorted_by_utf16_code_units_as_rfc_8785_requires() -> None:
    # U+1F600 is D83D DE00 in UTF-16, so it sorts before U+E000 under RFC 8785.
    assert canonical({"\ue000": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ue000":1}'.encode()
