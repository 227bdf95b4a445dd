"""Authorization matrix: key policies, identity policies, grants and conditions on real
SoftHSM2, on SQLite and PostgreSQL, each case checked against AWS KMS's documented
outcome.

An allowed case must succeed. A refused case must raise its AWS error, add exactly one
ledger record (an ``ApiCall.Failed`` naming the operation and the error code) and leave
the key as it was. Sources are the AWS KMS Developer Guide pages named in the comments.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest

from ledger.errors import KeyLedgerError
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

A = "111122223333"
B = "444455556666"
ROOT = f"arn:aws:iam::{A}:root"
ROOT_B = f"arn:aws:iam::{B}:root"
ALICE = f"arn:aws:iam::{A}:user/alice"
CAROL = f"arn:aws:iam::{A}:user/carol"
APP = f"arn:aws:iam::{A}:role/app"
BOB = f"arn:aws:iam::{B}:user/bob"
ACTORS = {"root": ROOT, "root-b": ROOT_B, "alice": ALICE, "carol": CAROL, "app": APP, "bob": BOB}
IT = {"Department": "IT"}
DENIED = "AccessDeniedException"
NOT_FOUND = "NotFoundException"
MALFORMED = "MalformedPolicyDocumentException"
LOCKOUT = "The new key policy will not allow you to update the key policy in the future."

JSON = dict[str, Any]


# ------------------------------------------------------------------ policy builders


def allow(principal: str | list[str], action: str | list[str], **cond: Any) -> JSON:
    st: JSON = {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": action}
    st["Resource"] = "*"
    if cond:
        st["Condition"] = cond
    return st


def deny(principal: str | list[str], action: str | list[str], **cond: Any) -> JSON:
    return {**allow(principal, action, **cond), "Effect": "Deny"}


def allow_all_but(principal: str, action: str) -> JSON:
    return {"Effect": "Allow", "Principal": {"AWS": principal}, "NotAction": action,
            "Resource": "*"}  # fmt: skip


def key_policy(*statements: JSON) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


ROOT_ALL = allow(ROOT, "kms:*")  # the default key policy's statement


def identity(*statements: JSON) -> JSON:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def iam(effect: str, action: str | list[str], resource: str = "*", **cond: Any) -> JSON:
    st: JSON = {"Effect": effect, "Action": action, "Resource": resource}
    if cond:
        st["Condition"] = cond
    return st


# ------------------------------------------------------------------ the world of one case


@dataclass
class World:
    """One ledger with two keys of account A and the principals of both accounts."""

    ledger: KeyLedger
    key_arn: str
    key_id: str
    key2_arn: str = ""
    blob: bytes = b""
    blob_it: bytes = b""
    grants: dict[str, str] = field(default_factory=dict)  # name -> GrantId

    def root(self) -> Caller:
        return Caller(principal=ROOT, source_ip="10.9.9.9")

    def grant(self, name: str, grantee: str, operations: list[str], **extra: Any) -> None:
        out = self.ledger.create_grant(
            caller=self.root(), key_id=self.key_id, grantee_principal=grantee,
            operations=operations, **extra,
        )  # fmt: skip
        self.grants[name] = out["GrantId"]

    def snapshot(self) -> tuple[Any, ...]:
        key = self.ledger.load_key(UUID(self.key_id))
        return (key.policy, key.enabled, key.key_state, tuple(sorted(key.grants)))


Call = Callable[[World, Caller], Any]


@dataclass(frozen=True)
class Case:
    """One row of the matrix. ``policy`` replaces both keys' policies (bypassing the
    lockout check, set by the root); ``identity`` is attached to the actor."""

    id: str
    operation: str
    call: Call
    allowed: bool
    actor: str = "alice"
    policy: str | None = None
    identity: JSON | None = None
    error: str = DENIED
    message: str | None = None
    source_ip: str | None = "10.1.2.3"
    via_service: str | None = None
    signing_key: bool = False
    two_keys: bool = False  # ReEncrypt and the other-key case need a second key
    setup: Callable[[World], None] | None = None


# ------------------------------------------------------------------ calls


def encrypt(context: dict[str, str] | None = None, key: str = "id") -> Call:
    def run(w: World, c: Caller) -> Any:
        key_id = {"id": w.key_id, "arn": w.key_arn, "alias": "alias/app"}[key]
        return w.ledger.encrypt(caller=c, key_id=key_id, plaintext=b"p", encryption_context=context)

    return run


def decrypt(with_context: bool = False) -> Call:
    def run(w: World, c: Caller) -> Any:
        if with_context:
            return w.ledger.decrypt(caller=c, ciphertext_blob=w.blob_it, encryption_context=IT)
        return w.ledger.decrypt(caller=c, ciphertext_blob=w.blob)

    return run


def generate_data_key(without_plaintext: bool = False) -> Call:
    def run(w: World, c: Caller) -> Any:
        fn = (
            w.ledger.generate_data_key_without_plaintext
            if without_plaintext
            else w.ledger.generate_data_key
        )
        return fn(caller=c, key_id=w.key_id, key_spec="AES_256")

    return run


def re_encrypt(w: World, c: Caller) -> Any:
    return w.ledger.re_encrypt(caller=c, ciphertext_blob=w.blob, destination_key_id=w.key2_arn)


def describe_by_arn(w: World, c: Caller) -> Any:
    return w.ledger.describe_key(caller=c, key_id=w.key_arn)


def put_policy(policy: str, *, bypass: bool = False) -> Call:
    def run(w: World, c: Caller) -> Any:
        return w.ledger.put_key_policy(
            caller=c, key_id=w.key_arn, policy=policy, bypass_policy_lockout_safety_check=bypass
        )

    return run


def enable_by_arn(w: World, c: Caller) -> Any:
    return w.ledger.enable_key(caller=c, key_id=w.key_arn)


def sign(algorithm: str = "ECDSA_SHA_256") -> Call:
    def run(w: World, c: Caller) -> Any:
        return w.ledger.sign(caller=c, key_id=w.key_id, message=b"m", signing_algorithm=algorithm)

    return run


def create_grant(operations: list[str], grantee: str = CAROL, **extra: Any) -> Call:
    def run(w: World, c: Caller) -> Any:
        return w.ledger.create_grant(
            caller=c, key_id=w.key_arn, grantee_principal=grantee, operations=operations, **extra
        )

    return run


def retire(name: str) -> Call:
    def run(w: World, c: Caller) -> Any:
        return w.ledger.retire_grant(caller=c, key_id=w.key_arn, grant_id=w.grants[name])

    return run


def create_key(policy: str | None = None, *, bypass: bool = False) -> Call:
    def run(w: World, c: Caller) -> Any:
        return w.ledger.create_key(
            caller=c, description="m", policy=policy, bypass_policy_lockout_safety_check=bypass
        )

    return run


def generate_random(w: World, c: Caller) -> Any:
    return w.ledger.generate_random(caller=c, number_of_bytes=16)


# ------------------------------------------------------------------ setups


def grant_to(
    name: str, grantee: str, operations: list[str], **extra: Any
) -> Callable[[World], None]:
    def run(w: World) -> None:
        w.grant(name, grantee, operations, **extra)

    return run


def grant_then(end: str) -> Callable[[World], None]:
    """A Decrypt grant to alice, then retired or revoked by the root."""

    def run(w: World) -> None:
        w.grant("g", ALICE, ["Decrypt"])
        if end == "retire":
            w.ledger.retire_grant(caller=w.root(), key_id=w.key_arn, grant_id=w.grants["g"])
        else:
            w.ledger.revoke_grant(caller=w.root(), key_id=w.key_arn, grant_id=w.grants["g"])

    return run


def alias_app(w: World) -> None:
    w.ledger.create_alias(caller=w.root(), alias_name="alias/app", target_key_id=w.key_id)


def disable_alice(w: World) -> None:
    w.ledger.set_principal_enabled(caller=w.root(), name="alice", enabled=False, account=A)


# ------------------------------------------------------------------ the matrix

ENC = iam("Allow", "kms:Encrypt")
ALL = iam("Allow", "kms:*")
ALICE_ONLY = key_policy(allow(ALICE, "kms:Encrypt"))
B_CAN_USE = key_policy(ROOT_ALL, allow(ROOT_B, ["kms:Encrypt", "kms:DescribeKey"]))
B_ALL = key_policy(ROOT_ALL, allow(ROOT_B, "kms:*"))


def ctx_policy(**cond: Any) -> str:
    return key_policy(ROOT_ALL, allow(ALICE, ["kms:Encrypt", "kms:Decrypt"], **cond))


def ip_policy(**cond: Any) -> str:
    return key_policy(ROOT_ALL, allow(ALICE, "kms:Encrypt", **cond))


DEPT_IT = {"StringEquals": {"kms:EncryptionContext:Department": "IT"}}
KEYS_ALL = {"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["Department", "Project"]}}
KEYS_ANY = {"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "Department"}}
NEEDS_CTX = {"Null": {"kms:EncryptionContextKeys": "false"}}
DEPT_LIKE = {"StringLike": {"kms:EncryptionContext:Department": "I*"}}
CALLER_A = {"StringEquals": {"kms:CallerAccount": A}}
CALLER_B = {"StringEquals": {"kms:CallerAccount": B}}
NOT_IN_10 = {"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}
RSA_ONLY = {"StringEquals": {"kms:KeySpec": "RSA_2048"}}
EC2 = "ec2.us-east-1.amazonaws.com"
IN_10 = {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}
NOT_IN_TEST_NET = {"NotIpAddress": {"aws:SourceIp": "192.0.2.0/24"}}
IN_V6 = {"IpAddress": {"aws:SourceIp": "2001:db8::/32"}}
VIA_EC2 = {"StringEquals": {"kms:ViaService": "ec2.us-east-1.amazonaws.com"}}
BY_ALIAS = {"StringEquals": {"kms:RequestAlias": "alias/app"}}
GRANT_OPS = {"ForAllValues:StringEquals": {"kms:GrantOperations": ["Encrypt", "Decrypt"]}}
FOR_AWS = {"Bool": {"kms:GrantIsForAWSResource": "true"}}
LOCKED = key_policy(allow(ALICE, "kms:*"))

CASES: list[Case] = [
    # --- the default key policy ("Default key policy": the account root may use the key,
    # and it enables IAM policies; a user needs an identity policy)
    Case("default-root-encrypts", "Encrypt", encrypt(), True, actor="root"),
    Case("default-user-without-identity-policy", "Encrypt", encrypt(), False),
    Case("default-user-identity-allows-encrypt", "Encrypt", encrypt(), True,
         identity=identity(ENC)),
    Case("default-user-identity-encrypt-only-decrypt", "Decrypt", decrypt(), False,
         identity=identity(ENC)),
    Case("default-identity-deny-beats-allow", "Encrypt", encrypt(), False,
         identity=identity(ALL, iam("Deny", "kms:Encrypt"))),
    Case("default-identity-resource-other-key", "Encrypt", encrypt(), False,
         two_keys=True,
         setup=lambda w: _identity_on(w, w.key2_arn)),
    Case("default-identity-resource-this-key", "Encrypt", encrypt(), True,
         setup=lambda w: _identity_on(w, w.key_arn)),
    # --- key policy naming principals (same account: the key policy alone suffices)
    Case("key-policy-names-user", "Encrypt", encrypt(), True, policy=ALICE_ONLY),
    Case("key-policy-names-other-user", "Encrypt", encrypt(), False, actor="carol",
         policy=ALICE_ONLY, identity=identity(ALL)),
    Case("key-policy-names-role", "Encrypt", encrypt(), True, actor="app",
         policy=key_policy(ROOT_ALL, allow(APP, "kms:Encrypt"))),
    Case("principal-star-caller-account-matches", "Encrypt", encrypt(), True,
         policy=key_policy(ROOT_ALL, allow("*", "kms:Encrypt", **CALLER_A))),
    Case("principal-star-caller-account-differs", "Encrypt", encrypt(), False,
         policy=key_policy(ROOT_ALL, allow("*", "kms:Encrypt", **CALLER_B))),
    # --- wildcard actions and NotAction
    Case("action-encrypt-star-encrypt", "Encrypt", encrypt(), True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Encrypt*"))),
    Case("action-encrypt-star-decrypt", "Decrypt", decrypt(), False,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Encrypt*"))),
    Case("action-kms-star-decrypt", "Decrypt", decrypt(), True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:*"))),
    Case("action-generate-star-data-key", "GenerateDataKey", generate_data_key(), True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Generate*"))),
    Case("action-generate-star-without-plaintext", "GenerateDataKeyWithoutPlaintext",
         generate_data_key(without_plaintext=True), True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Generate*"))),
    Case("action-generate-star-encrypt", "Encrypt", encrypt(), False,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Generate*"))),
    Case("action-re-star-reencrypt", "ReEncrypt", re_encrypt, True, two_keys=True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Re*"))),
    # ReEncrypt needs kms:ReEncryptFrom on the source and kms:ReEncryptTo on the destination.
    Case("action-reencrypt-from-only", "ReEncrypt", re_encrypt, False, two_keys=True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:ReEncryptFrom"))),
    Case("not-action-allows-the-rest", "Encrypt", encrypt(), True,
         policy=key_policy(ROOT_ALL, allow_all_but(ALICE, "kms:Decrypt"))),
    Case("not-action-excludes-decrypt", "Decrypt", decrypt(), False,
         policy=key_policy(ROOT_ALL, allow_all_but(ALICE, "kms:Decrypt"))),
    # --- explicit Deny
    Case("key-deny-beats-identity-allow", "Encrypt", encrypt(), False, identity=identity(ALL),
         policy=key_policy(ROOT_ALL, deny(ALICE, "kms:Encrypt"))),
    # A Deny in the key policy applies to the account root too ("Default key policy":
    # the root is allowed only through the key policy's Allow statement).
    Case("key-deny-naming-root-denies-root", "Encrypt", encrypt(), False, actor="root",
         policy=key_policy(ROOT_ALL, deny(ROOT, "kms:Encrypt"))),
    Case("key-deny-with-condition-applies", "Encrypt", encrypt(), False, identity=identity(ALL),
         source_ip="192.0.2.5",
         policy=key_policy(ROOT_ALL, deny("*", "kms:Encrypt", **NOT_IN_10))),
    Case("key-deny-with-condition-not-met", "Encrypt", encrypt(), True, identity=identity(ALL),
         policy=key_policy(ROOT_ALL, deny("*", "kms:Encrypt", **NOT_IN_10))),
    # --- encryption context ("kms:EncryptionContext:context-key", "kms:EncryptionContextKeys")
    Case("ec-equals-match", "Encrypt", encrypt(IT), True, policy=ctx_policy(**DEPT_IT)),
    Case("ec-equals-decrypt-match", "Decrypt", decrypt(with_context=True), True,
         policy=ctx_policy(**DEPT_IT)),
    Case("ec-equals-mismatch", "Encrypt", encrypt({"Department": "HR"}), False,
         policy=ctx_policy(**DEPT_IT)),
    Case("ec-equals-missing", "Encrypt", encrypt(), False, policy=ctx_policy(**DEPT_IT)),
    Case("ec-keys-for-all-values-subset", "Encrypt", encrypt(IT), True,
         policy=ctx_policy(**KEYS_ALL)),
    Case("ec-keys-for-all-values-extra-key", "Encrypt", encrypt({**IT, "Other": "x"}), False,
         policy=ctx_policy(**KEYS_ALL)),
    # ForAllValues is true for an empty context ("kms:EncryptionContextKeys": pair it with
    # a Null condition to require a context).
    Case("ec-keys-for-all-values-empty-context", "Encrypt", encrypt(), True,
         policy=ctx_policy(**KEYS_ALL)),
    Case("ec-keys-for-any-value-present", "Encrypt", encrypt({**IT, "Other": "x"}), True,
         policy=ctx_policy(**KEYS_ANY)),
    Case("ec-keys-for-any-value-absent", "Encrypt", encrypt({"Other": "x"}), False,
         policy=ctx_policy(**KEYS_ANY)),
    Case("ec-null-requires-context-given", "Encrypt", encrypt({"Other": "x"}), True,
         policy=ctx_policy(**NEEDS_CTX)),
    Case("ec-null-requires-context-missing", "Encrypt", encrypt(), False,
         policy=ctx_policy(**NEEDS_CTX)),
    Case("ec-string-like-match", "Encrypt", encrypt(IT), True, policy=ctx_policy(**DEPT_LIKE)),
    Case("ec-string-like-mismatch", "Encrypt", encrypt({"Department": "HR"}), False,
         policy=ctx_policy(**DEPT_LIKE)),
    # --- aws:SourceIp
    Case("ip-address-inside", "Encrypt", encrypt(), True, policy=ip_policy(**IN_10)),
    Case("ip-address-outside", "Encrypt", encrypt(), False, source_ip="192.0.2.5",
         policy=ip_policy(**IN_10)),
    Case("ip-address-no-source-ip", "Encrypt", encrypt(), False, source_ip=None,
         policy=ip_policy(**IN_10)),
    Case("not-ip-address-outside-range", "Encrypt", encrypt(), True,
         policy=ip_policy(**NOT_IN_TEST_NET)),
    Case("not-ip-address-inside-range", "Encrypt", encrypt(), False, source_ip="192.0.2.5",
         policy=ip_policy(**NOT_IN_TEST_NET)),
    Case("ipv6-inside", "Encrypt", encrypt(), True, source_ip="2001:db8::1",
         policy=ip_policy(**IN_V6)),
    Case("ipv6-range-ipv4-caller", "Encrypt", encrypt(), False, policy=ip_policy(**IN_V6)),
    # --- KMS condition keys
    Case("via-service-matches", "Encrypt", encrypt(), True, via_service=EC2,
         policy=ip_policy(**VIA_EC2)),
    Case("via-service-direct-call", "Encrypt", encrypt(), False, policy=ip_policy(**VIA_EC2)),
    Case("request-alias-by-alias", "Encrypt", encrypt(key="alias"), True, setup=alias_app,
         policy=ip_policy(**BY_ALIAS)),
    Case("request-alias-by-key-id", "Encrypt", encrypt(), False, setup=alias_app,
         policy=ip_policy(**BY_ALIAS)),
    Case("key-spec-and-signing-algorithm-match", "Sign", sign(), True, signing_key=True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Sign", StringEquals={
             "kms:KeySpec": "ECC_NIST_P256", "kms:SigningAlgorithm": "ECDSA_SHA_256"}))),
    Case("key-spec-mismatch", "Sign", sign(), False, signing_key=True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:Sign", **RSA_ONLY))),
    Case("grant-operations-within", "CreateGrant", create_grant(["Decrypt"]), True,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:CreateGrant", **GRANT_OPS))),
    Case("grant-operations-beyond", "CreateGrant", create_grant(["Decrypt", "RetireGrant"]), False,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:CreateGrant", **GRANT_OPS))),
    # kms:GrantIsForAWSResource is true only when an integrated service calls for the user.
    Case("grant-for-aws-resource-via-service", "CreateGrant", create_grant(["Decrypt"]), True,
         via_service="ec2.us-east-1.amazonaws.com",
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:CreateGrant", **FOR_AWS))),
    Case("grant-for-aws-resource-direct", "CreateGrant", create_grant(["Decrypt"]), False,
         policy=key_policy(ROOT_ALL, allow(ALICE, "kms:CreateGrant", **FOR_AWS))),
    # --- cross-account ("Allowing users in other accounts to use a KMS key": the key
    # policy and the other account's IAM policy are both required; key ARN only)
    Case("cross-account-user-with-identity-policy", "Encrypt", encrypt(key="arn"), True,
         actor="bob", policy=B_CAN_USE, identity=identity(ENC)),
    Case("cross-account-user-without-identity-policy", "Encrypt", encrypt(key="arn"), False,
         actor="bob", policy=B_CAN_USE),
    Case("cross-account-bare-key-id-not-visible", "Encrypt", encrypt(), False, actor="bob",
         policy=B_CAN_USE, identity=identity(ENC), error=NOT_FOUND),
    Case("cross-account-key-policy-silent", "Encrypt", encrypt(key="arn"), False, actor="bob",
         identity=identity(ENC)),
    Case("cross-account-key-policy-names-user-only", "Encrypt", encrypt(key="arn"), False,
         actor="bob", policy=key_policy(ROOT_ALL, allow(BOB, "kms:Encrypt"))),
    Case("cross-account-other-root", "Encrypt", encrypt(key="arn"), True, actor="root-b",
         policy=B_CAN_USE),
    Case("cross-account-describe-by-arn", "DescribeKey", describe_by_arn, True, actor="bob",
         policy=B_CAN_USE, identity=identity(iam("Allow", "kms:DescribeKey"))),
    # Management operations are not cross-account ("Cross-account use: No"): a permission
    # granted to another account for them has no effect.
    Case("cross-account-put-key-policy", "PutKeyPolicy", put_policy(key_policy(ROOT_ALL)), False,
         actor="bob", policy=B_ALL, identity=identity(ALL), error=NOT_FOUND),
    Case("cross-account-enable-key", "EnableKey", enable_by_arn, False, actor="bob",
         policy=B_ALL, identity=identity(ALL), error=NOT_FOUND),
    # --- grants ("Grants in AWS KMS", "Grant constraints", "Retiring and revoking grants")
    Case("grant-allows-decrypt", "Decrypt", decrypt(), True,
         setup=grant_to("g", ALICE, ["Decrypt"])),
    Case("grant-operation-not-granted", "Encrypt", encrypt(), False,
         setup=grant_to("g", ALICE, ["Decrypt"])),
    Case("grant-subset-context-matches", "Encrypt", encrypt({**IT, "Project": "x"}), True,
         setup=grant_to("g", ALICE, ["Encrypt"], constraints={"EncryptionContextSubset": IT})),
    Case("grant-subset-pair-missing", "Encrypt", encrypt({"Project": "x"}), False,
         setup=grant_to("g", ALICE, ["Encrypt"], constraints={"EncryptionContextSubset": IT})),
    Case("grant-equals-context-exact", "Encrypt", encrypt(IT), True,
         setup=grant_to("g", ALICE, ["Encrypt"], constraints={"EncryptionContextEquals": IT})),
    Case("grant-equals-context-extra-pair", "Encrypt", encrypt({**IT, "Project": "x"}), False,
         setup=grant_to("g", ALICE, ["Encrypt"], constraints={"EncryptionContextEquals": IT})),
    Case("grant-retired", "Decrypt", decrypt(), False, setup=grant_then("retire")),
    Case("grant-revoked", "Decrypt", decrypt(), False, setup=grant_then("revoke")),
    Case("grant-retiring-principal-retires", "RetireGrant", retire("g"), True, actor="app",
         setup=grant_to("g", ALICE, ["Decrypt"], retiring_principal=APP)),
    Case("grant-grantee-with-retire-grant-retires", "RetireGrant", retire("g"), True,
         setup=grant_to("g", ALICE, ["Decrypt", "RetireGrant"])),
    Case("grant-other-user-cannot-retire", "RetireGrant", retire("g"), False, actor="carol",
         setup=grant_to("g", ALICE, ["Decrypt"], retiring_principal=APP)),
    Case("grant-create-grant-through-grant", "CreateGrant", create_grant(["Decrypt"]), True,
         setup=grant_to("g", ALICE, ["Decrypt", "CreateGrant"])),
    # "Granting CreateGrant permission": a grantee can create grants only for the
    # operations of its own grant.
    Case("grant-create-grant-widening-operations", "CreateGrant", create_grant(["Encrypt"]),
         False, setup=grant_to("g", ALICE, ["Decrypt", "CreateGrant"])),
    Case("grant-create-grant-dropping-constraint", "CreateGrant", create_grant(["Decrypt"]),
         False, setup=grant_to("g", ALICE, ["Decrypt", "CreateGrant"],
                               constraints={"EncryptionContextSubset": IT})),
    # --- the policy lockout safety check ("Default key policy")
    Case("lockout-create-key-refused", "CreateKey", create_key(ALICE_ONLY), False, actor="root",
         error=MALFORMED, message=LOCKOUT),
    Case("lockout-create-key-bypassed", "CreateKey", create_key(ALICE_ONLY, bypass=True), True,
         actor="root"),
    Case("lockout-put-key-policy-refused", "PutKeyPolicy", put_policy(ALICE_ONLY), False,
         actor="root", error=MALFORMED, message=LOCKOUT),
    Case("lockout-put-key-policy-bypassed", "PutKeyPolicy", put_policy(ALICE_ONLY, bypass=True),
         True, actor="root"),
    Case("lockout-after-bypass-root-locked-out", "PutKeyPolicy", put_policy(key_policy(ROOT_ALL)),
         False, actor="root", policy=LOCKED),
    # --- principals and identity-only actions
    # A disabled principal is refused as AWS refuses a deactivated access key.
    Case("disabled-principal-refused", "Encrypt", encrypt(), False, identity=identity(ALL),
         setup=disable_alice, error="UnrecognizedClientException"),
    Case("create-key-without-identity-policy", "CreateKey", create_key(), False),
    Case("create-key-with-identity-policy", "CreateKey", create_key(), True,
         identity=identity(iam("Allow", "kms:CreateKey"))),
    Case("generate-random-without-identity-policy", "GenerateRandom", generate_random, False),
    Case("generate-random-with-identity-policy", "GenerateRandom", generate_random, True,
         identity=identity(iam("Allow", "kms:GenerateRandom"))),
]  # fmt: skip


def _identity_on(w: World, resource: str) -> None:
    w.ledger.attach_principal_policy(
        caller=w.root(), name="alice", policy_name="scoped", account=A,
        policy=json.dumps(identity(iam("Allow", "kms:Encrypt", resource))),
    )  # fmt: skip


def build_world(ledger: KeyLedger, case: Case) -> World:
    root = Caller(principal=ROOT, source_ip="10.9.9.9")
    spec = {"key_spec": "ECC_NIST_P256", "key_usage": "SIGN_VERIFY"} if case.signing_key else {}
    key = ledger.create_key(caller=root, **spec)["KeyMetadata"]
    w = World(ledger=ledger, key_arn=key["Arn"], key_id=key["KeyId"])
    if case.two_keys:
        w.key2_arn = ledger.create_key(caller=root)["KeyMetadata"]["Arn"]
    if case.operation in ("Decrypt", "ReEncrypt"):
        w.blob = ledger.encrypt(caller=root, key_id=w.key_id, plaintext=b"b")["CiphertextBlob"]
        w.blob_it = ledger.encrypt(
            caller=root, key_id=w.key_id, plaintext=b"b", encryption_context=IT
        )["CiphertextBlob"]
    actor = ACTORS[case.actor]
    if ":root" not in actor:  # only the actor needs to exist (grantees need not)
        account, (kind, name) = actor.split(":")[4], actor.split(":")[5].split("/")
        ledger.create_principal(
            caller=Caller(principal=f"arn:aws:iam::{account}:root"), name=name,
            account=account, principal_type=kind,
        )  # fmt: skip
    if case.identity is not None:
        account, name = actor.split(":")[4], actor.rsplit("/", 1)[-1]
        ledger.attach_principal_policy(
            caller=Caller(principal=f"arn:aws:iam::{account}:root"), name=name,
            policy_name="main", policy=json.dumps(case.identity), account=account,
        )  # fmt: skip
    if case.policy is not None:
        for arn in filter(None, (w.key_arn, w.key2_arn)):
            ledger.put_key_policy(
                caller=root, key_id=arn, policy=case.policy,
                bypass_policy_lockout_safety_check=True,
            )  # fmt: skip
    if case.setup is not None:
        case.setup(w)
    return w


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_policy_matrix_gives_the_documented_aws_outcome(ledger: KeyLedger, case: Case) -> None:
    w = build_world(ledger, case)
    caller = Caller(
        principal=ACTORS[case.actor], source_ip=case.source_ip, via_service=case.via_service
    )
    before_seq, before_key = ledger.db.head_seq(), w.snapshot()
    if case.allowed:
        case.call(w, caller)
        return
    with pytest.raises(KeyLedgerError) as info:
        case.call(w, caller)
    assert info.value.aws_name == case.error, info.value.message
    if case.message is not None:
        assert info.value.message == case.message
    new = ledger.db.read_records(before_seq, 10)
    assert len(new) == 1, [r.event()["topic"] for r in new]
    event = new[0].event()
    assert event["topic"].endswith("ApiCall.Failed")
    assert event["error_code"] == case.error
    assert event["call"]["operation"] == case.operation
    assert event["call"]["principal"] == ACTORS[case.actor]
    assert w.snapshot() == before_key


def test_matrix_has_at_least_forty_cases_with_unique_ids() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
