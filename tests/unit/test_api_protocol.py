"""AWS JSON 1.1 for KMS: request validation, operation mapping, responses, error bodies.

Driven by botocore's KMS model; botocore's own serializer and parsers check that what
we accept and answer is what an SDK sends and understands.
"""

from __future__ import annotations

import base64
import inspect
from datetime import UTC, datetime
from typing import Any

import botocore.parsers
import botocore.serialize
import botocore.session
import orjson
import pytest
from botocore import xform_name

from api.protocol import (
    call_operation,
    error_body,
    implemented_operations,
    model_operations,
    parse_request,
    prepare_call,
    serialize_response,
)
from ledger.errors import (
    AccessDeniedError,
    HsmError,
    InvalidSignatureError,
    KeyLedgerError,
    LedgerUnavailableError,
    MissingAuthenticationTokenError,
    NotFoundError,
    SerializationError,
    UnknownOperationError,
    UnrecognizedClientError,
    UnsupportedOperationError,
    ValidationError,
)
from ledger.service import Caller, KeyLedger

KMS = botocore.session.get_session().get_service_model("kms")
SHAPES: dict[str, Any] = KMS._shape_resolver._shape_map
CALLER = Caller(principal="arn:aws:iam::111122223333:user/alice")
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"

#: Operations whose KeyLedger method requires a member the model makes optional.
MODEL_OPTIONAL_LEDGER_REQUIRED: dict[str, dict[str, Any]] = {
    "CreateGrant": {"GranteePrincipal": "arn:aws:iam::111122223333:user/bob"},
    "Decrypt": {"CiphertextBlob": b"blob"},
    "ReEncrypt": {"CiphertextBlob": b"blob"},
}

#: Valid values for the model's patterned strings.
PATTERN_VALUES = {
    "AliasNameType": "alias/test",
    "GrantNameType": "grant-name",
    "PolicyNameType": "default",
    "PrincipalIdType": "arn:aws:iam::111122223333:user/bob",
    "MarkerType": "marker",
    "PolicyType": '{"Version":"2012-10-17"}',
    "RegionType": "us-west-2",
    "AccountIdType": "111122223333",
    "BackingKeyIdType": "a" * 64,
    "KeyMaterialDescriptionType": "material",
    "ServicePrincipalType": "service.amazonaws.com",
    "CloudHsmClusterIdType": "cluster-234abcdefgh",
    "XksKeyIdType": "xks-key",
}


def minimal(shape_name: str) -> Any:
    """The smallest JSON value the model accepts for ``shape_name``."""
    shape = SHAPES[shape_name]
    kind = shape["type"]
    if kind == "structure":
        return {
            name: minimal(shape["members"][name]["shape"]) for name in shape.get("required", [])
        }
    if kind == "string":
        if "enum" in shape:
            return shape["enum"][0]
        if shape_name in PATTERN_VALUES:
            return PATTERN_VALUES[shape_name]
        assert "pattern" not in shape, f"add a valid value for {shape_name}"
        return "x" * max(shape.get("min", 1), 1)
    if kind == "blob":
        return base64.b64encode(b"\x01" * max(shape.get("min", 1), 1)).decode()
    if kind in ("integer", "long"):
        return shape.get("min", 1)
    if kind == "boolean":
        return False
    if kind == "list":
        return [minimal(shape["member"]["shape"])] * shape.get("min", 0)
    if kind == "map":
        return {}
    if kind == "timestamp":
        return 1_700_000_000
    raise AssertionError(kind)


def input_shape(operation: str) -> str:
    return str(KMS.operation_model(operation).input_shape.name)


def body(**members: Any) -> bytes:
    return orjson.dumps(members)


def encrypt_body(**extra: Any) -> bytes:
    return body(KeyId="alias/app", Plaintext=base64.b64encode(b"secret").decode(), **extra)


def error_of(operation: str, raw: bytes) -> KeyLedgerError:
    with pytest.raises(KeyLedgerError) as info:
        parse_request(operation, raw)
    return info.value


# ------------------------------------------------------------------ parse: good input


def test_implemented_operations_are_the_model_operations_keyledger_has() -> None:
    ops = implemented_operations()
    assert {"Encrypt", "Decrypt", "GenerateDataKey", "CreateKey", "CreateGrant"} <= ops
    assert ops <= model_operations()
    assert "CreateCustomKeyStore" not in ops
    for op in ops:
        assert callable(getattr(KeyLedger, xform_name(op)))


@pytest.mark.parametrize("operation", sorted(implemented_operations()))
def test_minimal_valid_request_of_every_implemented_operation_parses_and_binds(
    operation: str,
) -> None:
    raw = minimal(input_shape(operation))
    params = parse_request(operation, orjson.dumps(raw))
    assert set(params) == set(raw)
    if operation in MODEL_OPTIONAL_LEDGER_REQUIRED:
        with pytest.raises(ValidationError, match="Member must not be null"):
            prepare_call(KeyLedger, operation, params)
        params.update(MODEL_OPTIONAL_LEDGER_REQUIRED[operation])
    method, kwargs = prepare_call(KeyLedger, operation, params)
    # the keyword arguments fit the real KeyLedger signature (self, caller, members)
    inspect.signature(method).bind(None, caller=CALLER, **kwargs)


def test_a_member_the_ledger_requires_but_the_model_does_not_is_a_validation_error() -> None:
    params = parse_request("CreateGrant", body(KeyId="k", Operations=["Encrypt"]))
    with pytest.raises(ValidationError) as info:
        prepare_call(KeyLedger, "CreateGrant", params)
    assert info.value.message == (
        "1 validation error detected: Value null at 'granteePrincipal' failed to satisfy "
        "constraint: Member must not be null"
    )


def test_empty_body_is_an_empty_object() -> None:
    assert parse_request("GenerateRandom", b"") == {}
    assert parse_request("GenerateRandom", b"  \n") == {}


def test_request_as_botocore_serializes_it_is_accepted_with_blobs_decoded() -> None:
    serializer = botocore.serialize.create_serializer("json")
    request = serializer.serialize_to_request(
        {
            "KeyId": "alias/app",
            "Plaintext": b"\x00\xffsecret",
            "EncryptionContext": {"purpose": "test"},
            "GrantTokens": ["token-1"],
        },
        KMS.operation_model("Encrypt"),
    )
    params = parse_request("Encrypt", request["body"])
    assert params == {
        "KeyId": "alias/app",
        "Plaintext": b"\x00\xffsecret",
        "EncryptionContext": {"purpose": "test"},
        "GrantTokens": ["token-1"],
    }


def test_nested_structures_lists_and_maps_are_validated_and_kept() -> None:
    params = parse_request(
        "CreateGrant",
        body(
            KeyId="k",
            GranteePrincipal="arn:aws:iam::111122223333:user/bob",
            Operations=["Encrypt", "Decrypt"],
            Constraints={"EncryptionContextSubset": {"a": "b"}},
        ),
    )
    assert params["Constraints"] == {"EncryptionContextSubset": {"a": "b"}}
    assert params["Operations"] == ["Encrypt", "Decrypt"]


def test_null_members_count_as_absent() -> None:
    assert parse_request("Encrypt", encrypt_body(EncryptionContext=None)) == {
        "KeyId": "alias/app",
        "Plaintext": b"secret",
    }


def test_timestamps_accept_epoch_seconds_and_iso_8601() -> None:
    base = {
        "KeyId": "k",
        "ImportToken": base64.b64encode(b"t").decode(),
        "EncryptedKeyMaterial": base64.b64encode(b"m").decode(),
    }
    epoch = parse_request("ImportKeyMaterial", body(**base, ValidTo=1_700_000_000.5))
    assert epoch["ValidTo"] == datetime.fromtimestamp(1_700_000_000.5, tz=UTC)
    iso = parse_request("ImportKeyMaterial", body(**base, ValidTo="2030-01-02T03:04:05Z"))
    assert iso["ValidTo"] == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    bad = error_of("ImportKeyMaterial", body(**base, ValidTo="next tuesday"))
    assert isinstance(bad, SerializationError)
    boolean = error_of("ImportKeyMaterial", body(**base, ValidTo=True))
    assert isinstance(boolean, SerializationError)


def test_integral_floats_are_integers() -> None:
    assert parse_request("GenerateRandom", body(NumberOfBytes=32.0)) == {"NumberOfBytes": 32}


# ------------------------------------------------------------------ parse: bad input


def test_unknown_operation_is_rejected() -> None:
    with pytest.raises(UnknownOperationError):
        parse_request("MakeCoffee", b"{}")


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe", b'{"KeyId": "k",}'])
def test_malformed_json_is_a_serialization_error(raw: bytes) -> None:
    assert isinstance(error_of("Encrypt", raw), SerializationError)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[]", "Start of list found where not expected."),
        (b'"text"', "STRING_VALUE can not be converted to a Structure"),
        (b"3", "NUMBER_VALUE can not be converted to a Structure"),
        (b"true", "TRUE_VALUE can not be converted to a Structure"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_serialization_error(
    raw: bytes, message: str
) -> None:
    err = error_of("Encrypt", raw)
    assert isinstance(err, SerializationError)
    assert err.message == message


TO_INT = "can not be converted to an Integer"
TO_STR = "can not be converted to a String"
MAP_START = "Start of structure or map found where not expected."
LIST_START = "Start of list found where not expected."


@pytest.mark.parametrize(
    ("operation", "raw", "message"),
    [
        ("GenerateRandom", body(NumberOfBytes="32"), f"STRING_VALUE {TO_INT}"),
        ("GenerateRandom", body(NumberOfBytes=1.5), f"NUMBER_VALUE {TO_INT}"),
        ("GenerateRandom", body(NumberOfBytes=True), f"TRUE_VALUE {TO_INT}"),
        ("DescribeKey", body(KeyId=7), f"NUMBER_VALUE {TO_STR}"),
        ("DescribeKey", body(KeyId={"a": 1}), MAP_START),
        ("DescribeKey", body(KeyId=["k"]), LIST_START),
        ("Encrypt", encrypt_body(EncryptionContext={"a": 1}), f"NUMBER_VALUE {TO_STR}"),
        ("Encrypt", encrypt_body(EncryptionContext=["a"]), LIST_START),
        ("Encrypt", encrypt_body(GrantTokens=[1]), f"NUMBER_VALUE {TO_STR}"),
        ("Encrypt", encrypt_body(GrantTokens="t"), "STRING_VALUE can not be converted to a List"),
        ("Encrypt", body(KeyId="k", Plaintext=12), "NUMBER_VALUE can not be converted to a Blob"),
        ("CreateKey", body(Tags={"TagKey": "a", "TagValue": "b"}), MAP_START),
        ("CreateKey", body(Tags=[{"TagKey": "a", "TagValue": 2}]), f"NUMBER_VALUE {TO_STR}"),
        (
            "CreateKey",
            body(BypassPolicyLockoutSafetyCheck="true"),
            "STRING_VALUE can not be converted to a Boolean",
        ),
    ],
)
def test_wrong_types_at_top_level_and_nested_are_serialization_errors(
    operation: str, raw: bytes, message: str
) -> None:
    err = error_of(operation, raw)
    assert isinstance(err, SerializationError)
    assert err.message == message


def test_missing_required_member_uses_aws_wording() -> None:
    err = error_of("Encrypt", body(Plaintext="aGk="))
    assert isinstance(err, ValidationError)
    assert err.message == (
        "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: "
        "Member must not be null"
    )


def test_several_violations_are_collected_in_one_message() -> None:
    err = error_of("Encrypt", body(EncryptionAlgorithm="ROT13"))
    assert isinstance(err, ValidationError)
    assert err.message.startswith("3 validation errors detected: ")
    assert "Value 'ROT13' at 'encryptionAlgorithm' failed to satisfy constraint: " in err.message
    assert "Member must satisfy enum value set: [SYMMETRIC_DEFAULT," in err.message
    assert "Value null at 'keyId'" in err.message
    assert "Value null at 'plaintext'" in err.message


def test_nested_required_members_use_one_based_list_paths() -> None:
    err = error_of("CreateKey", body(Tags=[{"TagKey": "a", "TagValue": "b"}, {"TagKey": "c"}]))
    assert isinstance(err, ValidationError)
    assert "Value null at 'tags.2.member.tagValue'" in err.message


def test_unknown_member_is_rejected() -> None:
    err = error_of("Encrypt", encrypt_body(Plaintxt="aGk="))
    assert isinstance(err, SerializationError)
    assert "'Plaintxt'" in err.message


def test_unknown_nested_member_is_rejected() -> None:
    err = error_of("CreateKey", body(Tags=[{"TagKey": "a", "TagValue": "b", "Extra": "c"}]))
    assert isinstance(err, SerializationError)


def test_enum_violation_is_a_validation_error() -> None:
    err = error_of("CreateKey", body(KeySpec="AES_512"))
    assert isinstance(err, ValidationError)
    assert "Value 'AES_512' at 'keySpec'" in err.message


MAX_LEN = "Member must have length less than or equal to"


def test_too_long_strings_and_blobs_are_validation_errors_without_echoing_blobs() -> None:
    plaintext = base64.b64encode(b"p" * 4097).decode()
    err = error_of("Encrypt", body(KeyId="k" * 2049, Plaintext=plaintext))
    assert isinstance(err, ValidationError)
    assert f"at 'keyId' failed to satisfy constraint: {MAX_LEN} 2048" in err.message
    assert f"Value at 'plaintext' failed to satisfy constraint: {MAX_LEN} 4096" in err.message
    assert plaintext not in err.message
    assert "pppp" not in err.message


def test_sensitive_values_are_never_echoed() -> None:
    err = error_of("CreateGrant", body(KeyId="k", GranteePrincipal="p", Operations=["Nope"]))
    assert isinstance(err, ValidationError)
    tokens_err = error_of("RetireGrant", body(GrantToken="s" * 8193))
    assert "sss" not in tokens_err.message


def test_number_ranges_are_checked() -> None:
    low = error_of("GenerateRandom", body(NumberOfBytes=0))
    assert isinstance(low, ValidationError)
    assert "Value '0' at 'numberOfBytes' failed to satisfy constraint: " in low.message
    assert "Member must have value greater than or equal to 1" in low.message
    high = error_of("ScheduleKeyDeletion", body(KeyId="k", PendingWindowInDays=366))
    assert "less than or equal to 365" in high.message
    huge = error_of("GenerateRandom", body(NumberOfBytes=2**40))
    assert isinstance(huge, SerializationError)


def test_list_lengths_are_checked() -> None:
    err = error_of("Encrypt", encrypt_body(GrantTokens=["t"] * 11))
    assert isinstance(err, ValidationError)
    assert f"at 'grantTokens' failed to satisfy constraint: {MAX_LEN} 10" in err.message


def test_patterns_are_checked() -> None:
    err = error_of("CreateAlias", body(AliasName="alias/bad name!", TargetKeyId="k"))
    assert isinstance(err, ValidationError)
    assert "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$" in err.message


@pytest.mark.parametrize("value", ["not base64!", "aGk", "a===", "****"])
def test_bad_base64_is_a_serialization_error_that_does_not_echo_the_value(value: str) -> None:
    err = error_of("Encrypt", body(KeyId="k", Plaintext=value))
    assert isinstance(err, SerializationError)
    assert value not in err.message


# ------------------------------------------------------------------ operation mapping


class RecordingLedger:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def encrypt(
        self,
        *,
        caller: Caller,
        key_id: str,
        plaintext: bytes,
        encryption_context: dict[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> dict[str, Any]:
        self.calls.append(("encrypt", {"key_id": key_id, "plaintext": plaintext}))
        return {"CiphertextBlob": b"blob", "KeyId": ARN}

    def create_key(
        self, *, caller: Caller, description: str = "", key_spec: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("create_key", {"description": description, "key_spec": key_spec}))
        return {"KeyMetadata": {"KeyId": "k"}}


def test_call_operation_maps_members_to_snake_case_keywords() -> None:
    ledger = RecordingLedger()
    result = call_operation(ledger, CALLER, "Encrypt", parse_request("Encrypt", encrypt_body()))
    assert result["CiphertextBlob"] == b"blob"
    assert ledger.calls == [("encrypt", {"key_id": "alias/app", "plaintext": b"secret"})]


def test_grant_tokens_and_dry_run_false_are_accepted_and_ignored() -> None:
    from uuid import uuid4

    from ledger.domain.grants import make_grant_token

    token = make_grant_token(uuid4(), "cd" * 32, b"t" * 32)
    params = parse_request("Encrypt", encrypt_body(GrantTokens=[token], DryRun=False))
    _, kwargs = prepare_call(RecordingLedger(), "Encrypt", params)
    assert kwargs == {"key_id": "alias/app", "plaintext": b"secret"}


def test_dry_run_true_runs_the_operation_inside_the_services_dry_run_context() -> None:
    from ledger import service

    seen: list[bool] = []

    class Ledger:
        def encrypt(self, *, caller: object, key_id: str, plaintext: bytes) -> dict[str, Any]:
            seen.append(service._DRY_RUN.get())
            return {}

    params = parse_request("Encrypt", encrypt_body(DryRun=True))
    method, kwargs = prepare_call(Ledger(), "Encrypt", params)
    method(caller=CALLER, **kwargs)
    assert seen == [True] and service._DRY_RUN.get() is False
    method, kwargs = prepare_call(Ledger(), "Encrypt", parse_request("Encrypt", encrypt_body()))
    method(caller=CALLER, **kwargs)
    assert seen == [True, False]


def test_members_the_ledger_cannot_take_are_unsupported() -> None:
    params = parse_request("CreateKey", body(MultiRegion=True))
    with pytest.raises(UnsupportedOperationError, match="MultiRegion"):
        prepare_call(RecordingLedger(), "CreateKey", params)
    assert prepare_call(RecordingLedger(), "CreateKey", {"MultiRegion": False})[1] == {}


def test_customer_master_key_spec_is_the_deprecated_name_of_key_spec() -> None:
    ledger = RecordingLedger()
    _, kwargs = prepare_call(ledger, "CreateKey", {"CustomerMasterKeySpec": "RSA_2048"})
    assert kwargs == {"key_spec": "RSA_2048"}
    same = {"CustomerMasterKeySpec": "RSA_2048", "KeySpec": "RSA_2048"}
    assert prepare_call(ledger, "CreateKey", same)[1] == {"key_spec": "RSA_2048"}
    with pytest.raises(ValidationError, match="in the same request"):
        conflict = {"CustomerMasterKeySpec": "RSA_2048", "KeySpec": "HMAC_256"}
        prepare_call(ledger, "CreateKey", conflict)


def test_model_operation_the_ledger_lacks_is_unsupported() -> None:
    with pytest.raises(UnsupportedOperationError) as info:
        prepare_call(RecordingLedger(), "CreateCustomKeyStore", {})
    assert info.value.message == "CreateCustomKeyStore is not supported by KeyLedger."


def test_operation_outside_the_model_is_unknown() -> None:
    with pytest.raises(UnknownOperationError):
        prepare_call(RecordingLedger(), "Explode", {})


# ------------------------------------------------------------------ responses


def parse_with_botocore(operation: str, status: int, payload: bytes) -> dict[str, Any]:
    parser = botocore.parsers.create_parser("json")
    parsed: dict[str, Any] = parser.parse(
        {"status_code": status, "headers": {}, "body": payload},
        KMS.operation_model(operation).output_shape,
    )
    return parsed


SYM = "SYMMETRIC_DEFAULT"


def test_encrypt_response_round_trips_through_botocore() -> None:
    payload = serialize_response(
        "Encrypt",
        {"CiphertextBlob": b"\x00\x01blob", "KeyId": ARN, "EncryptionAlgorithm": SYM},
    )
    assert orjson.loads(payload)["CiphertextBlob"] == base64.b64encode(b"\x00\x01blob").decode()
    parsed = parse_with_botocore("Encrypt", 200, payload)
    assert parsed["CiphertextBlob"] == b"\x00\x01blob"
    assert parsed["KeyId"] == ARN
    assert parsed["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"


def test_timestamps_become_epoch_seconds_and_unknown_or_none_members_are_dropped() -> None:
    created = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    payload = serialize_response(
        "DescribeKey",
        {
            "KeyMetadata": {
                "KeyId": "k",
                "CreationDate": created,
                "DeletionDate": 1_714_600_000,
                "Enabled": True,
                "Description": None,
                "Internal": "material-id",
                "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            },
            "Secret": b"never",
        },
    )
    data = orjson.loads(payload)
    assert data == {
        "KeyMetadata": {
            "KeyId": "k",
            "CreationDate": created.timestamp(),
            "DeletionDate": 1_714_600_000,
            "Enabled": True,
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        }
    }
    parsed = parse_with_botocore("DescribeKey", 200, payload)
    assert parsed["KeyMetadata"]["CreationDate"] == created


def test_naive_datetimes_are_taken_as_utc() -> None:
    payload = serialize_response(
        "DescribeKey", {"KeyMetadata": {"KeyId": "k", "CreationDate": datetime(2024, 1, 1)}}
    )
    assert orjson.loads(payload)["KeyMetadata"]["CreationDate"] == 1_704_067_200.0


def test_a_result_that_does_not_fit_its_shape_is_a_bug() -> None:
    with pytest.raises(TypeError):
        serialize_response("Encrypt", {"CiphertextBlob": "not bytes"})


def test_operations_without_output_answer_an_empty_object() -> None:
    assert orjson.loads(serialize_response("EnableKey", {})) == {}


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("err", "status", "code"),
    [
        (NotFoundError("Key 'k' does not exist"), 400, "NotFoundException"),
        (ValidationError("1 validation error detected: x"), 400, "ValidationException"),
        (AccessDeniedError("no"), 400, "AccessDeniedException"),
        (MissingAuthenticationTokenError("Missing"), 400, "MissingAuthenticationTokenException"),
        (UnrecognizedClientError("invalid token"), 400, "UnrecognizedClientException"),
        (InvalidSignatureError("mismatch"), 400, "InvalidSignatureException"),
        (LedgerUnavailableError("could not record"), 500, "KMSInternalException"),
        (HsmError("HSM failed"), 500, "KMSInternalException"),
        (KeyLedgerError(), 500, "KMSInternalException"),
    ],
)
def test_error_bodies_parse_in_botocore_to_the_right_code_and_message(
    err: KeyLedgerError, status: int, code: str
) -> None:
    got_status, payload = error_body(err)
    assert got_status == status
    assert orjson.loads(payload)["__type"] == code
    parsed = parse_with_botocore("Encrypt", status, payload)
    assert parsed["Error"]["Code"] == code
    assert parsed["Error"]["Message"] == (err.message or "An internal error occurred.")


def test_grant_tokens_must_be_tokens_keyledger_issued() -> None:
    from uuid import uuid4

    from ledger.domain.grants import make_grant_token
    from ledger.errors import InvalidGrantTokenError

    class Ledger:
        def encrypt(self, *, caller: object, key_id: str, plaintext: bytes) -> dict[str, object]:
            return {}

    good = make_grant_token(uuid4(), "ab" * 32, b"s" * 32)
    params = {"KeyId": "k", "Plaintext": b"x"}
    _, kwargs = prepare_call(Ledger(), "Encrypt", {**params, "GrantTokens": [good]})
    assert "grant_tokens" not in kwargs  # accepted: grants apply once recorded
    with pytest.raises(InvalidGrantTokenError):
        prepare_call(Ledger(), "Encrypt", {**params, "GrantTokens": [good, "forged"]})
