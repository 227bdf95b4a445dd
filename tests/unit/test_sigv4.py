"""``api.sigv4``: requests signed by botocore verify; any change to them does not."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from api.sigv4 import (
    SIGNATURE_MISMATCH_MESSAGE,
    ParsedAuth,
    ReplayCache,
    parse_and_canonicalise,
    signing_key,
    verify_signature,
)
from ledger.errors import (
    IncompleteSignatureError,
    InvalidSignatureError,
    MissingAuthenticationTokenError,
)

AK = "AKIDEXAMPLE"
SK = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
REGION = "eu-west-1"
URL = "https://kms.eu-west-1.amazonaws.com/"
BODY = b'{"KeyId": "alias/payments", "Plaintext": "aGVsbG8="}'
KMS_HEADERS = {
    "Content-Type": "application/x-amz-json-1.1",
    "X-Amz-Target": "TrentService.Encrypt",
}
WHEN = datetime(2024, 5, 17, 12, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Wire:
    """A request as the server receives it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def with_header(self, name: str, value: str) -> Wire:
        kept = [(n, v) for n, v in self.headers if n.lower() != name.lower()]
        return replace(self, headers=[*kept, (name, value)])

    def header(self, name: str) -> str:
        return next(v for n, v in self.headers if n.lower() == name.lower())


def _sign(
    *,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    params: list[tuple[str, str]] | None = None,
    service: str = "kms",
    region: str = REGION,
    secret: str = SK,
    token: str | None = None,
    when: datetime = WHEN,
    presign_expires: int | None = None,
) -> Wire:
    request = AWSRequest(method=method, url=url, data=body, params=params or {})
    pairs = list(KMS_HEADERS.items()) if headers is None else list(dict(headers).items())
    if isinstance(headers, list):
        pairs = headers
    for name, value in pairs:
        request.headers[name] = value  # HTTPHeaders appends: repeats are kept
    credentials = Credentials(AK, secret, token)
    signer: SigV4Auth = (
        SigV4Auth(credentials, service, region)
        if presign_expires is None
        else SigV4QueryAuth(credentials, service, region, expires=presign_expires)
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        signer.add_auth(request)
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    raw_body = prepared.body or b""
    return Wire(
        method=prepared.method,
        path=parts.path,
        query=parts.query,
        # The HTTP client adds Host; botocore signs the value it will send.
        # (request.headers, not prepared.headers: preparing collapses repeated headers.)
        headers=[("Host", parts.netloc), *request.headers.items()],
        body=raw_body.encode() if isinstance(raw_body, str) else raw_body,
    )


def _parse(wire: Wire, *, now: datetime = WHEN, **options: Any) -> ParsedAuth:
    options.setdefault("expected_service", "kms")
    options.setdefault("allowed_regions", {REGION})
    return parse_and_canonicalise(
        method=wire.method,
        path=wire.path,
        query_string=wire.query,
        headers=wire.headers,
        body=wire.body,
        now=now,
        **options,
    )


def _verify(wire: Wire, *, now: datetime = WHEN, secret: str = SK, **options: Any) -> ParsedAuth:
    parsed = _parse(wire, now=now, **options)
    verify_signature(parsed, signing_key(secret, parsed.date, parsed.region, parsed.service))
    return parsed


# Published vectors (AWS SigV4 test suite "get-vanilla" and the signing-key examples).


def test_signing_key_matches_the_published_examples() -> None:
    assert signing_key(SK, "20120215", "us-east-1", "iam").hex() == (
        "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
    )
    assert signing_key(SK, "20150830", "us-east-1", "iam").hex() == (
        "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
    )


def test_get_vanilla_vector_gives_the_published_string_to_sign_and_verifies() -> None:
    parsed = parse_and_canonicalise(
        method="GET",
        path="/",
        query_string="",
        headers=[
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                "SignedHeaders=host;x-amz-date, "
                "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
        ],
        body=b"",
        now=datetime(2015, 8, 30, 12, 36, tzinfo=UTC),
        expected_service="service",
    )
    assert parsed.string_to_sign == (
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    )
    verify_signature(parsed, signing_key(SK, "20150830", "us-east-1", "service"))


# Requests signed by botocore.


def test_botocore_signed_kms_request_verifies_and_is_parsed() -> None:
    parsed = _verify(_sign())
    assert parsed.access_key_id == AK
    assert (parsed.date, parsed.region, parsed.service) == ("20240517", REGION, "kms")
    assert parsed.amz_date == WHEN
    assert "host" in parsed.signed_headers
    assert "x-amz-target" in parsed.signed_headers
    assert parsed.session_token is None
    assert parsed.presigned is False
    assert parsed.valid_until == WHEN + timedelta(minutes=5)


def test_verify_fails_with_a_wrong_secret() -> None:
    with pytest.raises(InvalidSignatureError) as caught:
        _verify(_sign(), secret=SK[:-1] + "X")
    assert caught.value.message == SIGNATURE_MISMATCH_MESSAGE


def test_verify_fails_when_the_body_changes_by_one_byte() -> None:
    wire = _sign()
    tampered = replace(wire, body=wire.body.replace(b"payments", b"paymentz"))
    with pytest.raises(InvalidSignatureError):
        _verify(tampered)


def test_verify_fails_when_a_signed_header_value_changes() -> None:
    wire = _sign().with_header("X-Amz-Target", "TrentService.Decrypt")
    with pytest.raises(InvalidSignatureError):
        _verify(wire)


def test_verify_fails_when_the_host_changes() -> None:
    with pytest.raises(InvalidSignatureError):
        _verify(_sign().with_header("Host", "kms.eu-west-2.amazonaws.com"))


def test_verify_fails_when_the_path_changes() -> None:
    with pytest.raises(InvalidSignatureError):
        _verify(replace(_sign(), path="/other"))


def test_verify_fails_when_the_query_changes() -> None:
    wire = _sign(params=[("a", "1")])
    with pytest.raises(InvalidSignatureError):
        _verify(replace(wire, query="a=2"))


def test_verify_fails_when_the_method_changes() -> None:
    with pytest.raises(InvalidSignatureError):
        _verify(replace(_sign(), method="PUT"))


def test_unsigned_headers_may_change() -> None:
    wire = _sign()
    _verify(replace(wire, headers=[*wire.headers, ("X-Forwarded-For", "10.0.0.1")]))


def test_an_unparseable_signature_fails_as_a_mismatch() -> None:
    wire = _sign()
    header = wire.header("Authorization")
    bad = header[: header.index("Signature=")] + "Signature=zz\u00e9"
    with pytest.raises(InvalidSignatureError):
        _verify(wire.with_header("Authorization", bad))


# Time window.


def test_a_request_four_minutes_old_passes() -> None:
    _verify(_sign(), now=WHEN + timedelta(minutes=4))


def test_a_request_six_minutes_old_has_expired() -> None:
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(_sign(), now=WHEN + timedelta(minutes=6))
    assert caught.value.message == (
        "Signature expired: 20240517T120000Z is now earlier than 20240517T120100Z "
        "(20240517T120600Z - 5 min.)"
    )


def test_a_request_six_minutes_ahead_is_not_yet_current() -> None:
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(_sign(), now=WHEN - timedelta(minutes=6))
    assert caught.value.message == (
        "Signature not yet current: 20240517T120000Z is still later than 20240517T115900Z "
        "(20240517T115400Z + 5 min.)"
    )


def test_scope_date_must_equal_the_request_date() -> None:
    late = datetime(2024, 5, 17, 23, 59, 50, tzinfo=UTC)
    wire = _sign(when=late).with_header("X-Amz-Date", "20240518T000010Z")
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(wire, now=late)
    assert caught.value.message.startswith(
        "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
        "from HTTP: '20240517' != '20240518', from '20240518T000010Z'."
    )


def test_date_header_is_accepted_in_place_of_x_amz_date() -> None:
    wire = _sign(headers={**KMS_HEADERS, "Date": "placeholder"})
    assert "X-Amz-Date" not in dict(wire.headers)
    assert _verify(wire).amz_date == WHEN


def test_a_malformed_x_amz_date_is_an_incomplete_signature() -> None:
    wire = _sign().with_header("X-Amz-Date", "2024-05-17T12:00:00Z")
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire)
    assert caught.value.message.startswith("Date must be in ISO-8601 'basic format'.")


@pytest.mark.parametrize(
    "text",
    [
        "\u0662\u0660\u0662\u0664\u0660\u0665\u0661\u0667T120000Z",  # Arabic-Indic digits
        "20240517T126000Z",  # no such minute
        "20241317T120000Z",  # no such month
    ],
)
def test_an_x_amz_date_of_other_digits_or_no_such_time_is_an_incomplete_signature(
    text: str,
) -> None:
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(_sign().with_header("X-Amz-Date", text))
    assert caught.value.message.startswith("Date must be in ISO-8601 'basic format'.")


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        _parse(_sign(), now=WHEN.replace(tzinfo=None))


# Credential scope.


def test_a_region_outside_the_allowed_set_is_refused() -> None:
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(_sign(region="us-east-1"))
    assert caught.value.message == (
        "Credential should be scoped to a valid region, not 'us-east-1'. "
    )


def test_any_region_passes_when_no_set_is_given() -> None:
    _verify(_sign(region="ap-south-2"), allowed_regions=None)


def test_a_credential_for_another_service_is_refused() -> None:
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(_sign(service="s3"))
    assert caught.value.message == "Credential should be scoped to correct service: 'kms'. "


def test_a_credential_that_is_not_five_parts_is_incomplete() -> None:
    wire = _sign()
    header = wire.header("Authorization").replace("/aws4_request", "")
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire.with_header("Authorization", header))
    assert caught.value.message.startswith(
        "Credential must have exactly 5 slash-delimited elements"
    )


def test_a_wrong_scope_terminator_is_refused() -> None:
    wire = _sign()
    header = wire.header("Authorization").replace("/aws4_request", "/aws5_request")
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(wire.with_header("Authorization", header))
    assert "valid terminator: 'aws4_request', not 'aws5_request'" in caught.value.message


# Malformed or missing authentication.


def test_no_authorization_header_is_a_missing_token() -> None:
    wire = _sign()
    bare = replace(wire, headers=[(n, v) for n, v in wire.headers if n != "Authorization"])
    with pytest.raises(MissingAuthenticationTokenError) as caught:
        _parse(bare)
    assert caught.value.message == "Request is missing Authentication Token"


def test_a_garbage_authorization_header_is_incomplete_and_not_echoed() -> None:
    secret_token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl"
    wire = _sign().with_header("Authorization", f"Bearer {secret_token}")
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire)
    assert caught.value.message.startswith(
        "Authorization header requires 'Credential' parameter. "
        "Authorization header requires 'Signature' parameter. "
        "Authorization header requires 'SignedHeaders' parameter."
    )
    assert secret_token not in caught.value.message


def test_a_garbage_token_with_no_scheme_is_clipped() -> None:
    secret_token = "x" * 200
    wire = _sign().with_header("Authorization", secret_token)
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire)
    assert secret_token not in caught.value.message


@pytest.mark.parametrize("part", ["Credential", "Signature", "SignedHeaders"])
def test_a_missing_authorization_part_is_named(part: str) -> None:
    wire = _sign()
    header = wire.header("Authorization")
    signature = header.rsplit("Signature=", 1)[1]
    algorithm, params = header.split(" ", 1)
    kept = [p for p in params.split(", ") if not p.startswith(f"{part}=")]
    wire = wire.with_header("Authorization", f"{algorithm} {', '.join(kept)}")
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire)
    assert caught.value.message == (
        f"Authorization header requires '{part}' parameter. Authorization=AWS4-HMAC-SHA256"
    )
    assert signature not in caught.value.message


def test_a_missing_date_is_named() -> None:
    wire = _sign()
    undated = replace(wire, headers=[(n, v) for n, v in wire.headers if n != "X-Amz-Date"])
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(undated)
    assert "requires existence of either a 'X-Amz-Date' or a 'Date' header" in (
        caught.value.message
    )


def test_a_parameter_without_equals_sign_is_incomplete_and_the_signature_not_echoed() -> None:
    wire = _sign()
    header = wire.header("Authorization")
    signature = header.rsplit("Signature=", 1)[1]
    broken = header.replace("Signature=", "Signature ")
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire.with_header("Authorization", broken))
    assert "not a valid key=value pair (missing equal-sign)" in caught.value.message
    assert signature not in caught.value.message


def test_another_algorithm_is_incomplete() -> None:
    wire = _sign()
    header = wire.header("Authorization").replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512")
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire.with_header("Authorization", header))
    assert caught.value.message == "Unsupported AWS 'algorithm': 'AWS4-HMAC-SHA512'."


def test_host_must_be_signed() -> None:
    wire = _sign()
    header = re.sub(
        r"SignedHeaders=[^,]*",
        "SignedHeaders=content-type;x-amz-date",
        wire.header("Authorization"),
    )
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(wire.with_header("Authorization", header))
    assert caught.value.message == (
        "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
    )


def test_two_authorization_headers_are_refused() -> None:
    wire = _sign()
    doubled = replace(
        wire, headers=[*wire.headers, ("authorization", wire.header("Authorization"))]
    )
    with pytest.raises(IncompleteSignatureError):
        _parse(doubled)


# Payload hash.


def test_a_matching_content_sha256_header_verifies() -> None:
    digest = hashlib.sha256(BODY).hexdigest()
    _verify(_sign(headers={**KMS_HEADERS, "X-Amz-Content-SHA256": digest}))


def test_a_content_sha256_header_that_does_not_match_the_body_is_refused() -> None:
    wire = _sign(headers={**KMS_HEADERS, "X-Amz-Content-SHA256": "ab" * 32})
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(wire)
    assert caught.value.message == (
        "The provided 'x-amz-content-sha256' header does not match what was computed."
    )


def test_unsigned_payload_verifies_without_covering_the_body() -> None:
    wire = _sign(headers={**KMS_HEADERS, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    _verify(replace(wire, body=b"anything"))


def test_a_streaming_content_sha256_is_refused() -> None:
    value = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    wire = _sign(headers={**KMS_HEADERS, "X-Amz-Content-SHA256": value})
    with pytest.raises(InvalidSignatureError):
        _parse(wire)


# Canonical forms.


def test_query_strings_with_special_characters_and_repeated_keys_verify() -> None:
    params = [
        ("b", "two words"),
        ("a", "~/tilde and slash"),
        ("a", "\u00e9t\u00e9 \u2603"),
        ("a", "1"),
        ("empty", ""),
        ("plus", "1+1=2"),
        ("\u00fcber", "k\u00e9y"),
    ]
    _verify(_sign(method="GET", body=b"", params=params))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)),
        max_size=5,
    )
)
def test_any_query_parameters_verify(params: list[tuple[str, str]]) -> None:
    _verify(_sign(method="GET", body=b"", params=params))


def test_header_values_with_runs_of_spaces_verify() -> None:
    wire = _sign(headers={**KMS_HEADERS, "X-Custom": "  a   b \t c  "})
    _verify(wire)
    assert ("X-Custom", "  a   b \t c  ") in wire.headers


def test_a_proxy_collapsing_spaces_in_a_header_value_still_verifies() -> None:
    wire = _sign(headers={**KMS_HEADERS, "X-Custom": "a   b"})
    _verify(wire.with_header("X-Custom", "a b"))


def test_repeated_headers_are_joined_in_order() -> None:
    headers = [*KMS_HEADERS.items(), ("X-Multi", "first"), ("X-Multi", " second  value ")]
    wire = _sign(headers=headers)
    assert [v for n, v in wire.headers if n == "X-Multi"] == ["first", " second  value "]
    _verify(wire)
    swapped = [
        *[(n, v) for n, v in wire.headers if n != "X-Multi"],
        ("x-multi", " second  value "),
        ("X-MULTI", "first"),
    ]
    with pytest.raises(InvalidSignatureError):
        _verify(replace(wire, headers=swapped))


def test_paths_with_dot_segments_and_encoded_characters_verify() -> None:
    wire = _sign(url="https://kms.eu-west-1.amazonaws.com/a/./b/../c%20d//e~f/")
    assert wire.path == "/a/./b/../c%20d//e~f/"
    _verify(wire)


def test_a_non_default_port_is_part_of_the_signed_host() -> None:
    wire = _sign(url="http://localhost:8080/")
    assert wire.header("Host") == "localhost:8080"
    _verify(wire)
    with pytest.raises(InvalidSignatureError):
        _verify(wire.with_header("Host", "localhost:8081"))


# Session tokens.


def test_session_token_header_is_carried_through() -> None:
    parsed = _verify(_sign(token="FQoGZXIvYXdzE-session"))
    assert parsed.session_token == "FQoGZXIvYXdzE-session"
    assert "x-amz-security-token" in parsed.signed_headers


def test_secrets_are_not_in_the_repr() -> None:
    parsed = _verify(_sign(token="FQoGZXIvYXdzE-session"))
    assert parsed.signature not in repr(parsed)
    assert "FQoGZXIvYXdzE-session" not in repr(parsed)


# Presigned URLs.


def test_a_presigned_url_verifies() -> None:
    wire = _sign(method="GET", body=b"", params=[("Action", "ListKeys")], presign_expires=300)
    assert "Authorization" not in dict(wire.headers)
    parsed = _verify(wire, now=WHEN + timedelta(seconds=299))
    assert parsed.presigned is True
    assert parsed.valid_until == WHEN + timedelta(seconds=300)


def test_a_presigned_url_carries_its_session_token() -> None:
    wire = _sign(method="GET", body=b"", token="tok/en+=", presign_expires=60)
    assert _verify(wire).session_token == "tok/en+="


def test_an_expired_presigned_url_is_refused() -> None:
    wire = _sign(method="GET", body=b"", presign_expires=300)
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(wire, now=WHEN + timedelta(seconds=301))
    assert caught.value.message.startswith("Signature expired: 20240517T120000Z")


def test_a_presigned_url_from_the_future_is_refused() -> None:
    wire = _sign(method="GET", body=b"", presign_expires=300)
    with pytest.raises(InvalidSignatureError) as caught:
        _parse(wire, now=WHEN - timedelta(minutes=6))
    assert caught.value.message.startswith("Signature not yet current:")


def test_a_tampered_presigned_url_fails() -> None:
    wire = _sign(method="GET", body=b"", params=[("Action", "ListKeys")], presign_expires=300)
    with pytest.raises(InvalidSignatureError):
        _verify(replace(wire, query=wire.query.replace("ListKeys", "ListAliases")))
    with pytest.raises(InvalidSignatureError):
        _verify(replace(wire, query=wire.query.replace("X-Amz-Expires=300", "X-Amz-Expires=900")))


def test_a_presigned_url_missing_parameters_names_them() -> None:
    wire = _sign(method="GET", body=b"", presign_expires=300)
    kept = "&".join(p for p in wire.query.split("&") if not p.startswith("X-Amz-Credential"))
    with pytest.raises(IncompleteSignatureError) as caught:
        _parse(replace(wire, query=kept))
    assert caught.value.message == (
        "AWS query-string parameters must include 'X-Amz-Credential'. "
        "Re-examine the query-string parameters."
    )


@pytest.mark.parametrize("expires", ["604801", "-1", "soon"])
def test_a_bad_presigned_expiry_is_incomplete(expires: str) -> None:
    wire = _sign(method="GET", body=b"", presign_expires=300)
    query = wire.query.replace("X-Amz-Expires=300", f"X-Amz-Expires={expires}")
    with pytest.raises(IncompleteSignatureError):
        _parse(replace(wire, query=query))


def test_header_and_query_authentication_together_are_refused() -> None:
    presigned = _sign(method="GET", body=b"", presign_expires=300)
    signed = _sign(method="GET", body=b"")
    both = replace(presigned, headers=[*presigned.headers, ("Authorization", "AWS4-HMAC-SHA256")])
    assert signed.header("Authorization")
    with pytest.raises(InvalidSignatureError):
        _parse(both)


# Replay.


def test_a_replayed_request_is_refused_and_a_fresh_signature_passes() -> None:
    cache = ReplayCache()
    first = _verify(_sign())
    cache.check_and_remember(first, WHEN)
    with pytest.raises(InvalidSignatureError) as caught:
        cache.check_and_remember(_verify(_sign()), WHEN + timedelta(seconds=2))
    assert caught.value.message == "Signature has already been used."
    fresh = _verify(_sign(when=WHEN + timedelta(seconds=1)), now=WHEN + timedelta(seconds=2))
    cache.check_and_remember(fresh, WHEN + timedelta(seconds=2))


def test_replay_entries_age_out_once_the_signature_could_not_verify() -> None:
    cache = ReplayCache()
    parsed = _verify(_sign())
    cache.check_and_remember(parsed, WHEN)
    assert len(cache) == 1
    with pytest.raises(InvalidSignatureError):
        cache.check_and_remember(parsed, WHEN + timedelta(minutes=5))
    cache.check_and_remember(parsed, WHEN + timedelta(minutes=5, seconds=1))
    assert len(cache) == 1


def test_replay_cache_memory_is_bounded() -> None:
    cache = ReplayCache(max_entries=3)
    parsed = _verify(_sign())
    for n in range(10):
        cache.check_and_remember(replace(parsed, signature=f"{n:064x}"), WHEN)
    assert len(cache) == 3


def test_the_same_signature_under_another_access_key_is_a_different_entry() -> None:
    cache = ReplayCache()
    parsed = _verify(_sign())
    cache.check_and_remember(parsed, WHEN)
    cache.check_and_remember(replace(parsed, access_key_id="AKIDOTHER"), WHEN)
