"""Pure helpers of the CLI: ``--context k=v`` parsing and the AWS JSON wire form."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import _jsonable, parse_context
from ledger.errors import ValidationError

context_keys = st.text(min_size=1, max_size=12).filter(lambda k: "=" not in k)


def test_context_pairs_become_a_dict() -> None:
    assert parse_context(["purpose=test", "team=blue"]) == {"purpose": "test", "team": "blue"}


def test_no_context_options_give_an_empty_context() -> None:
    assert parse_context(None) == {}
    assert parse_context([]) == {}


def test_a_context_value_may_contain_equals_signs_and_be_empty() -> None:
    assert parse_context(["a=b=c", "empty=", "eq=="]) == {"a": "b=c", "empty": "", "eq": "="}


@settings(max_examples=150, deadline=None)
@given(context=st.dictionaries(context_keys, st.text(max_size=12), max_size=6))
def test_any_context_written_as_pairs_parses_back(context: dict[str, str]) -> None:
    assert parse_context([f"{k}={v}" for k, v in context.items()]) == context


@pytest.mark.parametrize("pair", ["novalue", "", "=value", "="])
def test_a_context_entry_without_equals_or_with_an_empty_key_is_rejected(pair: str) -> None:
    with pytest.raises(ValidationError):
        parse_context(["ok=1", pair])


def test_a_context_key_given_twice_is_rejected_even_with_the_same_value() -> None:
    for pairs in (["k=1", "k=2"], ["k=1", "k=1"]):
        with pytest.raises(ValidationError, match="given twice"):
            parse_context(pairs)


def test_jsonable_base64_encodes_bytes_at_any_depth() -> None:
    value = {"CiphertextBlob": b"\x00\xff", "Nested": [{"Plaintext": b"hi"}, [b""]], "N": 1}
    assert _jsonable(value) == {
        "CiphertextBlob": "AP8=",
        "Nested": [{"Plaintext": "aGk="}, [""]],
        "N": 1,
    }


def test_jsonable_leaves_other_values_alone() -> None:
    value = {"KeyId": "k", "Enabled": True, "Count": 3, "Missing": None, "List": ["a"]}
    assert _jsonable(value) == value


wire_values = st.recursive(
    st.binary(max_size=16)
    | st.text(max_size=8)
    | st.integers(-(2**53), 2**53)
    | st.booleans()
    | st.none(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)


def _assert_encoded(original: Any, encoded: Any) -> None:
    if isinstance(original, bytes):
        assert isinstance(encoded, str)
        assert base64.b64decode(encoded, validate=True) == original
    elif isinstance(original, dict):
        assert isinstance(encoded, dict)
        assert list(encoded) == list(original)
        for key, value in original.items():
            _assert_encoded(value, encoded[key])
    elif isinstance(original, list):
        assert isinstance(encoded, list)
        assert len(encoded) == len(original)
        for value, enc in zip(original, encoded, strict=True):
            _assert_encoded(value, enc)
    else:
        assert encoded == original


@settings(max_examples=150, deadline=None)
@given(value=wire_values)
def test_jsonable_output_has_every_blob_base64_encoded_in_place(value: Any) -> None:
    encoded = _jsonable(value)
    _assert_encoded(value, encoded)
    assert orjson.loads(orjson.dumps(encoded)) == encoded
