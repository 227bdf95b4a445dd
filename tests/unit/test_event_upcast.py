"""A ``Key.Created`` stored by issue 2 (class version 1) still reads back and replays.

The v1 payload below is written out literally, byte for byte as issue 2's
``CanonicalMapper`` stored it: no ``policy``, no ``tags`` and no ``class_version``.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import StoredEvent

from ledger.domain.model import CallContext, Key, default_key_policy
from ledger.errors import DisabledError
from ledger.keystore.port import MaterialRef
from ledger.persistence import CanonicalMapper
from ledger.records import canonical
from projections.state import apply_key_event, key_metadata, key_policy

KEY_ID = UUID("1234abcd-12ab-34cd-56ef-1234567890ab")
ACCOUNT = "444455556666"
ARN = f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/{KEY_ID}"
TOPIC = "ledger.domain.model:Key.Created"
MATERIAL_ID = "ab" * 32
WRAPPED = bytes(range(40))
CREATED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# Issue 2's Key.Created v1, canonical JSON (RFC 8785: sorted keys, compact), as stored.
V1_STATE = (
    b'{"additional":{"keyMaterialId":"' + MATERIAL_ID.encode() + b'"},'
    b'"call":{"account_id":"444455556666","operation":"CreateKey",'
    b'"principal":"arn:aws:iam::444455556666:user/alice","region":"eu-west-1",'
    b'"request_id":"00000000-0000-4000-8000-000000000001","service_initiated":false,'
    b'"source_ip":"192.0.2.1","user_agent":null},'
    b'"description":"issue 2 key",'
    b'"key_arn":"arn:aws:kms:eu-west-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab",'
    b'"key_id":"1234abcd-12ab-34cd-56ef-1234567890ab",'
    b'"key_spec":"SYMMETRIC_DEFAULT","key_usage":"ENCRYPT_DECRYPT",'
    b'"material":{"material_id":"' + MATERIAL_ID.encode() + b'",'
    b'"wrapped":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJw=="},'
    b'"origin":"AWS_KMS",'
    b'"originator_id":"1234abcd-12ab-34cd-56ef-1234567890ab",'
    b'"originator_topic":"ledger.domain.model:Key","originator_version":1,'
    b'"read_only":false,'
    b'"request":{"description":"issue 2 key","keySpec":"SYMMETRIC_DEFAULT",'
    b'"keyUsage":"ENCRYPT_DECRYPT","origin":"AWS_KMS"},'
    b'"response":{"keyMetadata":{"AWSAccountId":"444455556666",'
    b'"arn":"arn:aws:kms:eu-west-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab",'
    b'"creationDate":"May 1, 2024, 12:00:00 PM","customerMasterKeySpec":"SYMMETRIC_DEFAULT",'
    b'"description":"issue 2 key","enabled":true,"encryptionAlgorithms":["SYMMETRIC_DEFAULT"],'
    b'"keyId":"1234abcd-12ab-34cd-56ef-1234567890ab","keyManager":"CUSTOMER",'
    b'"keySpec":"SYMMETRIC_DEFAULT","keyState":"Enabled","keyUsage":"ENCRYPT_DECRYPT",'
    b'"multiRegion":false,"origin":"AWS_KMS"}},'
    b'"timestamp":"2024-05-01T12:00:00+00:00",'
    b'"topic":"ledger.domain.model:Key.Created"}'
)

V1_STORED = StoredEvent(
    originator_id=KEY_ID, originator_version=1, topic=TOPIC, state=V1_STATE
)  # fmt: skip


def call(operation: str, n: int) -> CallContext:
    return CallContext(
        operation=operation,
        request_id=str(UUID(int=n)),
        principal=f"arn:aws:iam::{ACCOUNT}:user/alice",
        region="eu-west-1",
        account_id=ACCOUNT,
    )


def read_v1() -> Any:
    return CanonicalMapper().to_domain_event(V1_STORED)


def test_the_v1_payload_is_canonical_and_has_no_policy_tags_or_class_version() -> None:
    decoded = orjson.loads(V1_STATE)
    assert canonical(decoded) == V1_STATE
    assert not {"policy", "tags", "class_version"} & decoded.keys()


def test_stored_v1_key_created_reads_back_as_v2_with_default_policy_and_no_tags() -> None:
    event = read_v1()
    assert isinstance(event, Key.Created)
    assert type(event).class_version == 2
    assert event.policy == default_key_policy(ACCOUNT)
    assert orjson.loads(event.policy)["Statement"][0]["Principal"] == {
        "AWS": f"arn:aws:iam::{ACCOUNT}:root"
    }
    assert event.tags == {}
    assert event.originator_id == KEY_ID
    assert event.originator_version == 1
    assert event.timestamp == CREATED_AT
    assert event.key_arn == ARN
    assert event.description == "issue 2 key"
    assert event.material == {
        "material_id": MATERIAL_ID,
        "wrapped": base64.b64encode(WRAPPED).decode(),
    }
    assert "class_version" not in vars(event)


def test_upcast_does_not_touch_the_stored_bytes_and_a_rewrite_is_class_version_2() -> None:
    event = read_v1()
    assert V1_STORED.state == V1_STATE  # verifiers hash stored bytes, never re-serialise
    rewritten = orjson.loads(CanonicalMapper().to_stored_event(event).state)
    assert rewritten["class_version"] == 2
    assert rewritten["policy"] == default_key_policy(ACCOUNT)
    assert rewritten["tags"] == {}
    v1 = orjson.loads(V1_STATE)
    assert {
        k: v for k, v in rewritten.items() if k not in ("class_version", "policy", "tags")
    } == v1


def test_key_built_from_a_v1_event_behaves_normally() -> None:
    key = read_v1().mutate(None)
    assert isinstance(key, Key)
    assert key.id == KEY_ID
    assert key.version == 1
    assert key.arn == ARN
    assert key.key_state == "Enabled"
    assert key.enabled
    assert key.policy == default_key_policy(ACCOUNT)
    assert key.tags == {}
    assert key.version_number == 1
    assert key.current_material == MaterialRef(material_id=MATERIAL_ID, wrapped=WRAPPED)
    assert key.created_on == CREATED_AT

    t = CREATED_AT + timedelta(days=1)
    key.tag(call=call("TagResource", 2), timestamp=t, request={}, tags={"team": "a"})
    policy = '{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*"}]}'
    key.put_policy(
        call=call("PutKeyPolicy", 3), timestamp=t, request={}, policy_name="default", policy=policy
    )
    fresh = MaterialRef(material_id="cd" * 32, wrapped=bytes(40))
    key.rotate(
        call=call("RotateKeyOnDemand", 4), timestamp=t, request={}, material=fresh,
        rotation_type="ON_DEMAND", on_demand_limit=25,
    )  # fmt: skip
    key.disable(call=call("DisableKey", 5), timestamp=t, request={})
    with pytest.raises(DisabledError):
        key.check("Encrypt")
    new_events = key.collect_events()
    assert [e.originator_version for e in new_events] == [2, 3, 4, 5]
    assert key.tags == {"team": "a"}
    assert key.policy == policy
    assert key.version_number == 2
    assert key.material_version(1).material_id == MATERIAL_ID
    assert [m["rotation_type"] for m in key.rotations()] == ["ON_DEMAND"]

    # The same history replayed from storage (the v1 record followed by v2-era ones).
    mapper = CanonicalMapper()
    stored = [V1_STORED, *(mapper.to_stored_event(e) for e in new_events)]
    replayed: Any = None
    for s in stored:
        event: Any = mapper.to_domain_event(s)
        replayed = event.mutate(replayed)
    assert isinstance(replayed, Key)
    assert (replayed.version, replayed.key_state, replayed.tags, replayed.policy) == (
        5, "Disabled", {"team": "a"}, policy,
    )  # fmt: skip
    assert replayed.materials == key.materials


def test_the_read_model_gives_a_v1_key_the_default_policy_and_no_tags() -> None:
    doc = apply_key_event(None, orjson.loads(V1_STATE))
    assert doc is not None
    assert key_policy(doc) == default_key_policy(ACCOUNT)
    assert doc["tags"] == {}
    md = key_metadata(doc)
    assert (md["KeyId"], md["Arn"], md["KeyState"]) == (str(KEY_ID), ARN, "Enabled")
    assert md["CreationDate"] == CREATED_AT.timestamp()
    assert md["CurrentKeyMaterialId"] == MATERIAL_ID
