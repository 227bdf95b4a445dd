"""The Sigma evaluator, the shipped rules, correlation windows and first-seen state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sigma.collection import SigmaCollection
from sigma.correlations import SigmaCorrelationRule
from sigma.rule import SigmaRule

from consumers.detections import (
    Alert,
    Detector,
    SigmaRuleError,
    compile_detection,
    default_rules_dir,
    load_documents,
    load_rules,
    policy_fields,
)

ACCOUNT = "111122223333"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
LOGSOURCE = {"product": "aws", "service": "cloudtrail"}


def record(
    name: str,
    *,
    seconds: int = 0,
    principal: str | None = ALICE,
    ip: str | None = "10.0.0.1",
    error: str | None = None,
    request: dict[str, Any] | None = None,
    service: bool = False,
) -> dict[str, Any]:
    """A CloudTrail record shaped like consumers.cloudtrail's view."""
    identity: dict[str, Any] = (
        {"accountId": ACCOUNT, "invokedBy": "AWS Internal"}
        if service
        else {"type": "IAMUser", "arn": principal, "accountId": ACCOUNT}
    )
    rec: dict[str, Any] = {
        "eventVersion": "1.11",
        "userIdentity": identity,
        "eventTime": (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eventSource": "kms.amazonaws.com",
        "eventName": name,
        "sourceIPAddress": "AWS Internal" if service else ip,
        "requestParameters": None if service else (request or {"keyId": KEY}),
        "eventID": f"id-{name}-{seconds}",
        "resources": [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": KEY}],
        "eventType": "AwsServiceEvent" if service else "AwsApiCall",
        "recipientAccountId": ACCOUNT,
    }
    if error is not None:
        rec["errorCode"] = error
        rec["errorMessage"] = "refused"
    return rec


class Feed:
    """Feeds records to a Detector with consecutive seqs; returns (rule name, seq) pairs."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.seq = 0
        self.alerts: list[Alert] = []

    def __call__(self, rec: dict[str, Any]) -> set[tuple[str | None, int]]:
        self.seq += 1
        found = self.detector.process(
            {"ledger": "kl-x", "seq": self.seq, "recordHash": "ab" * 32, "record": rec}
        )
        self.alerts += found
        return {(a.rule_name, a.seq) for a in found}


def fresh() -> Feed:
    return Feed(Detector(load_rules()))


def matches(detection: dict[str, Any], rec: dict[str, Any]) -> bool:
    return compile_detection(detection)(rec)


# ------------------------------------------------------------------ modifiers


def test_plain_values_match_whole_strings_case_insensitively_with_wildcards() -> None:
    rec = record("Decrypt")
    assert matches({"s": {"eventName": "decrypt"}, "condition": "s"}, rec)
    assert not matches({"s": {"eventName": "Decryp"}, "condition": "s"}, rec)
    assert matches({"s": {"eventName": "De*t"}, "condition": "s"}, rec)
    assert matches({"s": {"eventName": "Decr?pt"}, "condition": "s"}, rec)
    assert not matches({"s": {"eventName|cased": "decrypt"}, "condition": "s"}, rec)


def test_escaped_wildcards_are_literal_characters() -> None:
    rec = record("Decrypt", request={"policy": "a*b"})
    assert matches({"s": {"requestParameters.policy": "a\\*b"}, "condition": "s"}, rec)
    assert not matches(
        {"s": {"requestParameters.policy": "a\\*b"}, "condition": "s"},
        record("Decrypt", request={"policy": "axxb"}),
    )


def test_contains_startswith_endswith_and_re_modifiers() -> None:
    rec = record("GenerateDataKeyPair")
    assert matches({"s": {"eventName|contains": "datakey"}, "condition": "s"}, rec)
    assert matches({"s": {"eventName|startswith": "generate"}, "condition": "s"}, rec)
    assert matches({"s": {"eventName|endswith": "PAIR"}, "condition": "s"}, rec)
    assert not matches({"s": {"eventName|endswith": "Key"}, "condition": "s"}, rec)
    assert matches({"s": {"eventName|re": "^Generate.*Pair$"}, "condition": "s"}, rec)
    assert not matches({"s": {"eventName|re": "^generate"}, "condition": "s"}, rec)
    assert matches({"s": {"eventName|re|i": "^generate"}, "condition": "s"}, rec)


def test_a_list_of_values_is_or_and_all_makes_it_and() -> None:
    rec = record("Decrypt")
    assert matches({"s": {"eventName": ["Encrypt", "Decrypt"]}, "condition": "s"}, rec)
    assert not matches({"s": {"eventName": ["Encrypt", "Sign"]}, "condition": "s"}, rec)
    assert matches({"s": {"eventName|contains|all": ["De", "pt"]}, "condition": "s"}, rec)
    assert not matches({"s": {"eventName|contains|all": ["De", "En"]}, "condition": "s"}, rec)


def test_null_and_exists_test_for_missing_fields() -> None:
    ok, failed = record("Decrypt"), record("Decrypt", error="AccessDeniedException")
    assert matches({"s": {"errorCode": None}, "condition": "s"}, ok)
    assert not matches({"s": {"errorCode": None}, "condition": "s"}, failed)
    assert matches({"s": {"errorCode|exists": True}, "condition": "s"}, failed)
    assert matches({"s": {"errorCode|exists": False}, "condition": "s"}, ok)


def test_dotted_fields_reach_nested_objects_and_lists() -> None:
    rec = record("Decrypt")
    assert matches({"s": {"userIdentity.arn|endswith": "/alice"}, "condition": "s"}, rec)
    assert matches({"s": {"resources.ARN": KEY}, "condition": "s"}, rec)
    assert not matches({"s": {"resources.ARN": KEY + "x"}, "condition": "s"}, rec)


def test_booleans_and_numbers_compare_by_value() -> None:
    rec = record("ScheduleKeyDeletion", request={"pendingWindowInDays": 7, "dry": False})
    assert matches({"s": {"requestParameters.pendingWindowInDays": 7}, "condition": "s"}, rec)
    assert not matches({"s": {"requestParameters.pendingWindowInDays": 8}, "condition": "s"}, rec)
    assert matches({"s": {"requestParameters.dry": False}, "condition": "s"}, rec)
    assert not matches({"s": {"requestParameters.dry": True}, "condition": "s"}, rec)


# ------------------------------------------------------------------ conditions


def test_conditions_follow_sigma_precedence_not_then_and_then_or() -> None:
    det = {
        "a": {"eventName": "Decrypt"},
        "b": {"errorCode|exists": True},
        "c": {"sourceIPAddress": "10.0.0.1"},
    }
    ok = record("Decrypt", ip="10.0.0.2")
    # "a or b and c" is "a or (b and c)": true through a alone.
    assert matches({**det, "condition": "a or b and c"}, ok)
    assert not matches({**det, "condition": "(a or b) and c"}, ok)
    assert matches({**det, "condition": "a and not b"}, ok)
    assert not matches({**det, "condition": "not a or b"}, ok)


def test_one_of_and_all_of_expand_name_patterns_and_them() -> None:
    det = {
        "sel_name": {"eventName": "Decrypt"},
        "sel_ip": {"sourceIPAddress": "10.9.9.9"},
    }
    rec = record("Decrypt")
    assert matches({**det, "condition": "1 of sel_*"}, rec)
    assert not matches({**det, "condition": "all of sel_*"}, rec)
    assert matches({**det, "condition": "1 of them"}, rec)
    assert matches({**det, "condition": "all of them"}, record("Decrypt", ip="10.9.9.9"))


def test_a_list_of_maps_is_an_or_of_the_maps() -> None:
    det = {"s": [{"eventName": "Encrypt"}, {"sourceIPAddress": "10.0.0.1"}], "condition": "s"}
    assert matches(det, record("Decrypt"))
    assert not matches(det, record("Decrypt", ip="10.0.0.2"))


@pytest.mark.parametrize(
    "detection",
    [
        {"s": {"eventName|base64": "x"}, "condition": "s"},
        {"s": {"eventName": "x"}, "condition": "s and t"},
        {"s": {"eventName": "x"}, "condition": "(s"},
        {"s": ["keyword"], "condition": "s"},
        {"s": {"eventName": "x"}},
        {"s": {"eventName|re": "("}, "condition": "s"},
    ],
    ids=["modifier", "unknown-search", "paren", "keywords", "no-condition", "bad-regex"],
)
def test_unsupported_or_malformed_detections_are_refused(detection: dict[str, Any]) -> None:
    with pytest.raises(SigmaRuleError):
        compile_detection(detection)


def test_rules_for_another_logsource_are_refused() -> None:
    doc = {
        "title": "t",
        "id": "x",
        "logsource": {"product": "windows"},
        "detection": {"s": {"a": "b"}, "condition": "s"},
    }
    with pytest.raises(SigmaRuleError, match="logsource"):
        load_documents([("x.yml", doc)])


# ------------------------------------------------------------------ shipped rules


def test_every_shipped_rule_is_valid_sigma_for_aws_cloudtrail() -> None:
    files = sorted(default_rules_dir().glob("*.yml"))
    assert len(files) == 8
    kinds: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        collection = SigmaCollection.from_yaml(text, collect_errors=True)
        collection.resolve_rule_references()
        assert collection.errors == [], (path.name, collection.errors)
        for rule in collection.rules:
            kinds.append(type(rule).__name__)
            if isinstance(rule, SigmaRule):
                assert rule.logsource.product == "aws", path.name
                assert rule.logsource.service == "cloudtrail", path.name
                assert rule.errors == [], (path.name, rule.errors)
            else:
                assert isinstance(rule, SigmaCorrelationRule)
        for doc in yaml.safe_load_all(text):  # and our evaluator accepts the same file
            assert doc["id"] and doc["title"] and doc["level"]
    assert kinds.count("SigmaCorrelationRule") == 2
    assert len(load_rules().rules) == 8


def test_scheduled_deletion_and_disable_fire_only_on_success() -> None:
    feed = fresh()
    assert feed(record("ScheduleKeyDeletion")) == {("kms_key_scheduled_for_deletion", 1)}
    assert feed(record("ScheduleKeyDeletion", error="KMSInvalidStateException")) == set()
    assert feed(record("DisableKey")) == {("kms_key_disabled", 3)}
    assert feed(record("DisableKey", error="AccessDeniedException")) == set()
    assert feed(record("EnableKey")) == set()


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


ROOT_STMT = {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
             "Action": "kms:*", "Resource": "*"}  # fmt: skip


@pytest.mark.parametrize(
    ("principal", "effect", "fires"),
    [
        ("*", "Allow", True),
        ({"AWS": "*"}, "Allow", True),
        ({"AWS": ["arn:aws:iam::111122223333:user/bob", "*"]}, "Allow", True),
        ({"AWS": "arn:aws:iam::*:root"}, "Allow", True),
        ({"AWS": "arn:aws:iam::444455556666:root"}, "Allow", True),
        ({"AWS": "444455556666"}, "Allow", True),
        ({"AWS": "arn:aws:iam::111122223333:user/bob"}, "Allow", False),
        ({"Service": "logs.amazonaws.com"}, "Allow", False),
        ("*", "Deny", False),
        ({"AWS": "arn:aws:iam::444455556666:root"}, "Deny", False),
    ],
)
def test_policy_rule_fires_for_anyone_or_another_account_in_an_allow_statement(
    principal: Any, effect: str, fires: bool
) -> None:
    stmt = {"Effect": effect, "Principal": principal, "Action": "kms:Decrypt", "Resource": "*"}
    feed = fresh()
    got = feed(record("PutKeyPolicy", request={"keyId": KEY, "policy": policy(ROOT_STMT, stmt)}))
    assert got == ({("kms_key_policy_opened", 1)} if fires else set())


def test_policy_rule_also_reads_create_key_and_ignores_failed_calls() -> None:
    opened = policy({"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"})
    feed = fresh()
    assert feed(record("CreateKey", request={"policy": opened})) == {("kms_key_policy_opened", 1)}
    failed = record("PutKeyPolicy", request={"policy": opened}, error="AccessDeniedException")
    assert ("kms_key_policy_opened", 2) not in feed(failed)
    assert feed(record("CreateKey", request={"policy": "not json"})) == set()


def test_policy_fields_name_the_foreign_accounts_only() -> None:
    stmt = {"Effect": "Allow", "Principal": {"AWS": ["444455556666", f"{ACCOUNT}"]},
            "Action": "kms:Decrypt", "Resource": "*"}  # fmt: skip
    rec = record("PutKeyPolicy", request={"policy": policy(stmt)})
    assert policy_fields(rec) == {
        "policyOpenToAnyone": False,
        "policyForeignAccounts": ["444455556666"],
    }
    assert policy_fields(record("Decrypt")) is None


def test_imported_material_deletion_fires_for_the_call_and_the_service_event() -> None:
    feed = fresh()
    assert feed(record("DeleteImportedKeyMaterial")) == {("kms_imported_key_material_deleted", 1)}
    got = feed(record("DeleteExpiredKeyMaterial", service=True))
    assert got == {("kms_imported_key_material_deleted", 2)}
    assert feed.alerts[-1].principal == "AWS Internal"
    assert feed.alerts[-1].key_arn == KEY


@pytest.mark.parametrize(
    ("name", "error", "fires"),
    [
        ("Encrypt", "DisabledException", True),
        ("Decrypt", "KMSInvalidStateException", True),
        ("GenerateDataKey", "DisabledException", True),
        ("Sign", "KMSInvalidStateException", True),
        ("Encrypt", "AccessDeniedException", False),
        ("DescribeKey", "KMSInvalidStateException", False),
        ("EnableKey", "KMSInvalidStateException", False),
    ],
)
def test_use_of_a_disabled_or_pending_deletion_key_fires_on_cryptographic_calls(
    name: str, error: str, fires: bool
) -> None:
    got = fresh()(record(name, error=error))
    assert got == ({("kms_disabled_key_use", 1)} if fires else set())


# ------------------------------------------------------------------ correlation windows


def denied(seconds: int, principal: str = ALICE) -> dict[str, Any]:
    return record("Encrypt", seconds=seconds, principal=principal, error="AccessDeniedException")


def test_five_denials_spanning_exactly_five_minutes_fire_once() -> None:
    feed = fresh()
    fired = set().union(*(feed(denied(s)) for s in (0, 60, 120, 180, 300)))
    assert fired == {("kms_access_denied_burst", 5)}
    assert feed.alerts[0].correlated_seqs == (1, 2, 3, 4, 5)
    assert feed.alerts[0].principal == ALICE


def test_five_denials_spanning_five_minutes_and_a_second_do_not_fire() -> None:
    feed = fresh()
    fired = set().union(*(feed(denied(s)) for s in (0, 60, 120, 180, 301)))
    assert fired == set()
    # The window slides: the next denial within 5 minutes of the 2nd makes five again.
    assert feed(denied(302)) == {("kms_access_denied_burst", 6)}
    assert feed.alerts[0].correlated_seqs == (2, 3, 4, 5, 6)


def test_a_burst_counts_per_principal_and_the_window_restarts_after_an_alert() -> None:
    feed = fresh()
    bob = f"arn:aws:iam::{ACCOUNT}:user/bob"
    fired: set[tuple[str | None, int]] = set()
    for s in range(0, 40, 5):  # alternating principals: 4 each, no burst
        fired |= feed(denied(s, ALICE if s % 10 == 0 else bob))
    assert fired == set()
    assert feed(denied(50)) == {("kms_access_denied_burst", 9)}  # alice's fifth
    assert set().union(*(feed(denied(60 + s)) for s in range(4))) == set()  # cleared
    assert feed(denied(70)) == {("kms_access_denied_burst", 14)}


def test_single_denials_do_not_alert_on_their_own() -> None:
    feed = fresh()
    assert feed(denied(0)) == set()


def test_value_count_correlation_counts_distinct_values_within_the_window() -> None:
    docs = [
        ("a.yml", {"title": "any decrypt", "id": "r1", "name": "dec",
                   "logsource": LOGSOURCE, "level": "low",
                   "detection": {"s": {"eventName": "Decrypt"}, "condition": "s"}}),
        ("a.yml", {"title": "many ips", "id": "c1", "name": "ips", "level": "high",
                   "correlation": {"type": "value_count", "rules": ["dec"],
                                   "group-by": ["userIdentity.arn"], "timespan": "1m",
                                   "condition": {"field": "sourceIPAddress", "gte": 3}}}),
    ]  # fmt: skip
    feed = Feed(Detector(load_documents(docs)))
    assert feed(record("Decrypt", seconds=0, ip="10.0.0.1")) == set()
    assert feed(record("Decrypt", seconds=10, ip="10.0.0.1")) == set()
    assert feed(record("Decrypt", seconds=20, ip="10.0.0.2")) == set()
    assert feed(record("Decrypt", seconds=90, ip="10.0.0.3")) == set()  # first two expired
    assert feed(record("Decrypt", seconds=95, ip="10.0.0.4")) == set()
    assert feed(record("Decrypt", seconds=100, ip="10.0.0.5")) == {("ips", 6)}


def test_a_correlation_naming_an_unknown_rule_is_refused() -> None:
    doc = {"title": "c", "id": "c1", "correlation": {"type": "event_count", "rules": ["nope"],
           "timespan": "5m", "condition": {"gte": 1}}}  # fmt: skip
    with pytest.raises(SigmaRuleError, match="unknown rule"):
        load_documents([("c.yml", doc)])


# ------------------------------------------------------------------ first seen


def test_decrypt_from_a_new_ip_fires_only_after_the_principal_has_a_baseline() -> None:
    feed = fresh()
    assert feed(record("Decrypt", ip="10.0.0.1")) == set()  # first ever: the baseline
    assert feed(record("Decrypt", ip="10.0.0.1")) == set()
    assert feed(record("Decrypt", ip="203.0.113.9")) == {("kms_decrypt_from_new_source_ip", 3)}
    assert feed(record("Decrypt", ip="203.0.113.9")) == set()  # now seen
    assert feed.alerts[0].source_ip == "203.0.113.9"


def test_any_successful_call_teaches_an_ip_but_failed_calls_do_not() -> None:
    feed = fresh()
    feed(record("Encrypt", ip="10.0.0.1"))
    feed(record("Encrypt", ip="10.0.0.2"))
    assert feed(record("Decrypt", ip="10.0.0.2")) == set()
    feed(record("Encrypt", ip="198.51.100.7", error="AccessDeniedException"))
    assert feed(record("Decrypt", ip="198.51.100.7")) == {("kms_decrypt_from_new_source_ip", 5)}


def test_source_ips_are_tracked_per_principal() -> None:
    feed = fresh()
    bob = f"arn:aws:iam::{ACCOUNT}:user/bob"
    feed(record("Encrypt", ip="10.0.0.1"))
    feed(record("Encrypt", principal=bob, ip="10.0.0.2"))
    assert feed(record("Decrypt", principal=bob, ip="10.0.0.1")) == {
        ("kms_decrypt_from_new_source_ip", 3)
    }
    assert feed(record("Decrypt", ip="10.0.0.1")) == set()


def test_replaying_the_same_records_rebuilds_the_same_state() -> None:
    history = [record("Encrypt", ip="10.0.0.1")] + [denied(s) for s in (0, 10, 20, 30)]
    first, second = fresh(), fresh()
    for rec in history:
        first(rec)
        second(rec)
    assert first(denied(40)) == second(denied(40)) == {("kms_access_denied_burst", 6)}
    assert first(record("Decrypt", ip="10.7.7.7")) == second(record("Decrypt", ip="10.7.7.7"))


def test_alerts_carry_identifying_fields_and_no_request_values() -> None:
    feed = fresh()
    rec = record("PutKeyPolicy", request={"keyId": KEY, "policy": policy({
        "Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"})})  # fmt: skip
    feed(rec)
    out = feed.alerts[0].to_json()
    assert out["eventID"] == rec["eventID"] and out["seq"] == 1
    assert out["keyArn"] == KEY and out["principal"] == ALICE
    assert out["sourceIPAddress"] == "10.0.0.1" and out["eventTime"] == "2026-05-01T09:00:00Z"
    assert "Statement" not in json.dumps(out)


def test_a_rules_dir_without_rules_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigmaRuleError, match="no rule files"):
        load_rules(tmp_path)


# ------------------------------------------------------------------ key reconnaissance


def read(name: str, key: int, seconds: int, principal: str = ALICE, **kw: Any) -> dict[str, Any]:
    """A read of key number ``key`` (its resolved ARN in resources)."""
    rec = record(name, seconds=seconds, principal=principal, **kw)
    arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-4000-8000-{key:012d}"
    rec["resources"] = [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": arn}]
    rec["requestParameters"] = {"keyId": arn}
    rec["readOnly"] = True
    return rec


READ_NAMES = ["DescribeKey", "GetKeyPolicy", "ListGrants", "GetPublicKey", "ListResourceTags",
              "GetKeyRotationStatus", "ListKeyPolicies", "ListKeyRotations",
              "GetKeyLastUsage"]  # fmt: skip


def test_reads_of_ten_distinct_keys_by_one_principal_within_ten_minutes_fire_once() -> None:
    feed = fresh()
    fired: set[tuple[str | None, int]] = set()
    for i in range(9):  # nine keys, each read twice, by every kind of read
        fired |= feed(read(READ_NAMES[i], i, seconds=i * 30))
        fired |= feed(read("DescribeKey", i, seconds=i * 30 + 1))
    assert fired == set()
    # The tenth key, refused: a refused read counts too (it names the key it probed).
    assert feed(read("GetKeyPolicy", 9, seconds=300, error="AccessDeniedException")) == {
        ("kms_key_reconnaissance", 19)
    }
    alert = feed.alerts[-1]
    assert alert.principal == ALICE and len(alert.correlated_seqs) == 19
    assert feed(read("DescribeKey", 10, seconds=310)) == set()  # the window restarted


def test_reads_spread_over_more_than_ten_minutes_or_principals_do_not_fire() -> None:
    feed = fresh()
    fired: set[tuple[str | None, int]] = set()
    for i in range(10):  # ten keys, but the first is more than ten minutes before the last
        fired |= feed(read("DescribeKey", i, seconds=0 if i == 0 else 600 + i))
    carol, dave = (f"arn:aws:iam::{ACCOUNT}:user/{n}" for n in ("carol", "dave"))
    for i in range(10):  # ten keys within a minute, between two other principals
        fired |= feed(read("DescribeKey", 100 + i, seconds=700 + i, principal=(carol, dave)[i % 2]))
    assert fired == set()


def test_listings_and_cryptographic_calls_are_not_key_reads() -> None:
    feed = fresh()
    fired: set[tuple[str | None, int]] = set()
    for i in range(12):
        fired |= feed(read("Encrypt", i, seconds=i))
        listing = record("ListKeys", seconds=i, request={"limit": 5})
        del listing["resources"]
        fired |= feed(listing)
    assert fired == set()
