"""10,000 malformed requests against a running server: every one is answered 4xx with
an AWS error name (never 5xx), recorded as exactly one ``ApiCall.Failed``, and nothing
else changes; afterwards the server is healthy, a valid Encrypt works and the chain
verifies.

Requests are generated deterministically (seeded random) from valid KMS requests by one
mutator each. Body mutators sign after mutating, so the request authenticates and
reaches parsing or the operation; transport mutators (signature, date, target, headers)
keep a valid body and break only what they name. Each mutator declares the error names
it may get, so a mutation that slips through to a success fails the test.

Not covered here: requests uvicorn's HTTP parser refuses before the app (e.g. headers
over 16 KiB) get uvicorn's plain-text 400 and never reach the ledger.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from api.app import DEFAULT_MAX_BODY
from cli.context import CliContext
from ledger.settings import Settings
from tests.api.conftest import Server, start_server, stop_server

SEED = 20_241_125
REQUESTS = 10_000
OVERSIZE = 5  # each is a > 1 MiB body: a handful
THREADS = 4
FAILED_TOPIC = "ApiCall.Failed"
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
}
AWS_ERRORS = frozenset(
    {
        "ValidationException",
        "SerializationException",
        "UnknownOperationException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
        "NotFoundException",
        "InvalidCiphertextException",
        "AccessDeniedException",
        "InvalidKeyUsageException",
    }
)
SERIALIZATION = frozenset({"SerializationException"})
VALIDATION = frozenset({"ValidationException"})
BAD_SIGNATURE = frozenset({"InvalidSignatureException"})
INCOMPLETE = frozenset({"IncompleteSignatureException"})
AUTH_ERRORS = (
    BAD_SIGNATURE
    | INCOMPLETE
    | {
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
    }
)


# ------------------------------------------------------------------------ signing


class _SigV4At(SigV4Auth):
    """botocore's SigV4 signer with the signing time given instead of read from the clock."""

    def __init__(self, credentials: Credentials, service: str, region: str, when: datetime):
        super().__init__(credentials, service, region)
        self._when = when

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._when.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        self._inject_signature_to_request(
            request, self.signature(self.string_to_sign(request, canonical), request)
        )


@dataclass
class Spec:
    """One request to make: what to sign, and how to break it."""

    operation: str
    body: bytes
    mutator: str
    target: str | None = None  # None: TrentService.<operation>; "": no header
    access_key: str | None = None  # None: the fuzzer's
    secret: str | None = None
    service: str = "kms"
    skew: timedelta = timedelta(0)
    after_signing: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] | None = field(
        default=None, compare=False
    )
    replay: bool = False
    expected: frozenset[str] = field(default_factory=frozenset)


@dataclass
class Fixture:
    url: str
    access_key: str
    secret: str
    key_id: str
    blob: str


def _sign(fx: Fixture, spec: Spec) -> list[tuple[str, str]]:
    headers = {"Content-Type": "application/x-amz-json-1.1"}
    target = f"TrentService.{spec.operation}" if spec.target is None else spec.target
    if target:
        headers["X-Amz-Target"] = target
    request = AWSRequest(method="POST", url=fx.url + "/", data=spec.body, headers=headers)
    _SigV4At(
        Credentials(spec.access_key or fx.access_key, spec.secret or fx.secret),
        spec.service,
        "us-east-1",
        datetime.now(UTC) + spec.skew,
    ).add_auth(request)
    pairs = list(request.headers.items())
    pairs.append(("amz-sdk-invocation-id", str(uuid.uuid4())))  # unsigned, as botocore
    return spec.after_signing(pairs) if spec.after_signing else pairs


# ------------------------------------------------------------------------ mutators


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bases(fx: Fixture) -> list[tuple[str, dict[str, Any]]]:
    """Valid requests (never sent as they are)."""
    return [
        ("Encrypt", {"KeyId": fx.key_id, "Plaintext": _b64(b"hello"),
                     "EncryptionContext": {"a": "b"}}),
        ("Decrypt", {"CiphertextBlob": fx.blob, "EncryptionContext": {"a": "b"}}),
        ("GenerateDataKey", {"KeyId": fx.key_id, "KeySpec": "AES_256"}),
        ("DescribeKey", {"KeyId": fx.key_id}),
        ("GenerateRandom", {"NumberOfBytes": 32}),
        ("ScheduleKeyDeletion", {"KeyId": fx.key_id, "PendingWindowInDays": 7}),
    ]  # fmt: skip


REQUIRED = {
    "Encrypt": ("KeyId", "Plaintext"),
    "Decrypt": ("CiphertextBlob",),
    "GenerateDataKey": ("KeyId",),
    "DescribeKey": ("KeyId",),
    "ScheduleKeyDeletion": ("KeyId",),
}
_WRONG: dict[type, list[Any]] = {
    str: [123, True, [], {"x": "y"}, 1.5],
    int: ["32", [], {"n": 1}, 1.5],
    dict: ["a=b", 7, ["a", "b"]],
}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _body_specs(rng: random.Random, op: str, body: dict[str, Any]) -> list[Callable[[], Spec]]:
    """Mutators of the body; the request is signed after mutating (it authenticates)."""
    raw = _json(body)

    def truncated() -> Spec:
        return Spec(op, raw[: rng.randrange(1, len(raw))], "bad_json", expected=SERIALIZATION)

    def garbage() -> Spec:
        junk = rng.choice(
            [
                b"{",
                b"}",
                b"{'KeyId': 1}",
                b"\xff\xfe\x00",
                b"{]",
                b"nul",
                b'{"KeyId": "a",}',
                bytes(rng.randrange(256) for _ in range(16)),
            ]
        )
        return Spec(op, junk, "bad_json", expected=SERIALIZATION)  # fmt: skip

    def non_object() -> Spec:
        value = rng.choice([[], [body], "KeyId", 42, True, 1.5, [1, 2]])
        return Spec(op, _json(value), "json_non_object", expected=SERIALIZATION)

    def wrong_type() -> Spec:
        name = rng.choice(sorted(body))
        wrong = rng.choice(_WRONG[type(body[name])])
        return Spec(op, _json({**body, name: wrong}), "wrong_type", expected=SERIALIZATION)

    def missing_required() -> Spec:
        required = REQUIRED[op]
        drop = set(rng.sample(required, rng.randrange(1, len(required) + 1)))
        kept = {k: v for k, v in body.items() if k not in drop}
        if rng.random() < 0.3:
            kept.update(dict.fromkeys(drop))  # JSON null counts as absent
        return Spec(op, _json(kept), "missing_required", expected=VALIDATION)

    def extra_member() -> Spec:
        name = rng.choice(["Foo", "keyId", "KEYID", "Plaintext2", "__type", ""])
        if name in body:
            name += "_"
        return Spec(op, _json({**body, name: rng.choice([1, "x", [], {}])}), "extra_member",
                    expected=SERIALIZATION)  # fmt: skip

    def bad_base64() -> Spec:
        name = "Plaintext" if op == "Encrypt" else "CiphertextBlob"
        value = rng.choice(["not base64!", "abc", "a", "====", "YWJj\x00", "ab$d", "YQ=Y"])
        return Spec(op, _json({**body, name: value}), "bad_base64", expected=SERIALIZATION)

    def bad_value() -> Spec:
        """Well-formed, but out of range, too long, not in the enum, or unknown."""
        if op == "GenerateRandom":
            n = rng.choice([0, -1, 1025, 2**31])
            beyond_int32 = n >= 2**31  # a parse error, as AWS's JSON reader reports it
            return Spec(op, _json({"NumberOfBytes": n}), "bad_value",
                        expected=SERIALIZATION if beyond_int32 else VALIDATION)  # fmt: skip
        if op == "ScheduleKeyDeletion" and rng.random() < 0.5:
            days = rng.choice([0, 6, 31, 365])
            return Spec(op, _json({**body, "PendingWindowInDays": days}), "bad_value",
                        expected=VALIDATION)  # fmt: skip
        if op == "GenerateDataKey" and rng.random() < 0.5:
            spec = rng.choice(["AES_512", "aes_256", ""])
            return Spec(op, _json({**body, "KeySpec": spec}), "bad_value", expected=VALIDATION)
        if op == "Encrypt" and rng.random() < 0.5:
            text = _b64(bytes(4097))
            return Spec(op, _json({**body, "Plaintext": text}), "bad_value", expected=VALIDATION)
        if op == "Decrypt":
            mangled = bytearray(base64.b64decode(body["CiphertextBlob"]))
            mangled[rng.randrange(len(mangled))] ^= 1 << rng.randrange(8)
            choice = rng.choice([
                {**body, "CiphertextBlob": _b64(bytes(mangled))},
                {**body, "EncryptionContext": {"a": "c"}},
                {**body, "CiphertextBlob": _b64(rng.randbytes(rng.randrange(1, 200)))},
            ])  # fmt: skip
            return Spec(op, _json(choice), "bad_value",
                        expected=frozenset({"InvalidCiphertextException"}))  # fmt: skip
        key = rng.choice(
            [
                str(uuid.UUID(int=rng.getrandbits(128))),
                "alias/does-not-exist",
                "arn:aws:kms:us-east-1:111122223333:key/nope",
                "x" * 2049,
                "",
            ]
        )
        return Spec(op, _json({**body, "KeyId": key}), "bad_value",
                    expected=frozenset({"NotFoundException", "ValidationException"}))  # fmt: skip

    mutators: list[Callable[[], Spec]] = [truncated, garbage, non_object, extra_member, bad_value]
    if op in REQUIRED:
        mutators.append(missing_required)
    if op in ("Encrypt", "Decrypt"):
        mutators.append(bad_base64)
    mutators.append(wrong_type)
    return mutators


def _drop(name: str) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    return lambda pairs: [(k, v) for k, v in pairs if k.lower() != name.lower()]


def _set(name: str, value: str) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    return lambda pairs: [*_drop(name)(pairs), (name, value)]


def _flip_signature(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for k, v in pairs:
        if k.lower() == "authorization":
            last = v[-1]
            v = v[:-1] + ("0" if last != "0" else "1")
        out.append((k, v))
    return out


def _duplicate_authorization(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    auth = next(v for k, v in pairs if k.lower() == "authorization")
    return [*pairs, ("Authorization", auth.replace("Signature=", "Signature=0"))]


def _edit_authorization(
    edit: Callable[[str], str],
) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    return lambda pairs: [(k, edit(v) if k.lower() == "authorization" else v) for k, v in pairs]


def _transport_specs(rng: random.Random, op: str, body: dict[str, Any]) -> list[Callable[[], Spec]]:
    """Mutators of everything but the body (which stays valid)."""
    raw = _json(body)

    def spec(mutator: str, expected: frozenset[str], **kw: Any) -> Callable[[], Spec]:
        return lambda: Spec(op, raw, mutator, expected=expected, **kw)

    def unknown_target() -> Spec:
        target = rng.choice(
            [
                "TrentService.Nope",
                "TrentService.",
                "TrentService.encrypt",
                "trentservice.Encrypt",
                "DynamoDB_20120810.ListTables",
                "Encrypt",
                f"TrentService.{op}Extra",
                "TrentService.Décrypter",
            ]
        )
        return Spec(op, raw, "unknown_target", target=target,
                    expected=frozenset({"UnknownOperationException"}))  # fmt: skip

    return [
        unknown_target,
        spec("missing_target", frozenset({"UnknownOperationException"}), target=""),
        spec("bad_signature", BAD_SIGNATURE, after_signing=_flip_signature),
        spec("wrong_secret", BAD_SIGNATURE, secret="w" * 40),
        spec("expired_date", BAD_SIGNATURE, skew=-timedelta(minutes=10)),
        spec("future_date", BAD_SIGNATURE, skew=timedelta(minutes=10)),
        spec("scope_s3", BAD_SIGNATURE, service="s3"),
        spec("unknown_access_key", frozenset({"UnrecognizedClientException"}),
             access_key="AKIAFUZZFUZZFUZZFUZZ"),
        spec("no_authorization", frozenset({"MissingAuthenticationTokenException"}),
             after_signing=_drop("Authorization")),
        spec("garbage_authorization", INCOMPLETE,
             after_signing=_set("Authorization", "AWS4-HMAC-SHA256 Credential")),
        spec("other_algorithm", INCOMPLETE,
             after_signing=_edit_authorization(lambda v: v.replace("AWS4-HMAC-SHA256", "AWS4-X"))),
        spec("short_credential", INCOMPLETE,
             after_signing=_edit_authorization(lambda v: v.replace("/us-east-1/", "/"))),
        spec("host_not_signed", INCOMPLETE,
             after_signing=_edit_authorization(lambda v: v.replace("host;", ""))),
        spec("duplicate_authorization", INCOMPLETE, after_signing=_duplicate_authorization),
        spec("bad_date_header", INCOMPLETE, after_signing=_set("X-Amz-Date", "yesterday")),
        spec("no_date_header", INCOMPLETE, after_signing=_drop("X-Amz-Date")),
        spec("content_sha256_mismatch", BAD_SIGNATURE,
             after_signing=_set("X-Amz-Content-Sha256", "0" * 64)),
        spec("content_sha256_invalid", BAD_SIGNATURE,
             after_signing=_set("X-Amz-Content-Sha256", "sha256")),
        spec("latin1_target", BAD_SIGNATURE,
             after_signing=_set("X-Amz-Target", "TrentService.\xc9ncrypt")),
        spec("replayed", BAD_SIGNATURE, replay=True),
    ]  # fmt: skip


def generate(fx: Fixture, n: int, seed: int) -> list[Spec]:
    """``n`` request specs, the same for the same seed (bodies, choices, order)."""
    rng = random.Random(seed)
    bases = _bases(fx)
    specs: list[Spec] = []
    oversize_at = set(rng.sample(range(n), OVERSIZE))
    for i in range(n):
        op, body = rng.choice(bases)
        if i in oversize_at:
            pad = "A" * (DEFAULT_MAX_BODY + rng.randrange(1, 4096))
            specs.append(Spec(op, _json({**body, "Plaintext": pad}), "oversize",
                              expected=VALIDATION))  # fmt: skip
            continue
        family = _body_specs if rng.random() < 0.6 else _transport_specs
        specs.append(rng.choice(family(rng, op, body))())
    return specs


# ------------------------------------------------------------------------ the run


@dataclass
class Outcome:
    spec: Spec
    status: int
    error: str | None
    content_type: str | None


def _send_all(fx: Fixture, specs: list[Spec], worker: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    previous: tuple[list[tuple[str, str]], bytes] | None = None
    with httpx.Client(base_url=fx.url, timeout=60) as http:
        for spec in specs[worker::THREADS]:
            if spec.replay:  # the last request that authenticated, verbatim
                headers, body = previous or (_flip_signature(_sign(fx, spec)), spec.body)
            else:
                headers, body = _sign(fx, spec), spec.body
            raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            if spec.mutator == "oversize":  # answered before the body is read: own connection
                with httpx.Client(base_url=fx.url, timeout=60) as once:
                    response = once.post("/", headers=raw_headers, content=body)
            else:
                response = http.post("/", headers=raw_headers, content=body)
            error = None
            with contextlib.suppress(ValueError):
                error = response.json().get("__type")
            outcomes.append(
                Outcome(spec, response.status_code, error,
                        response.headers.get("content-type"))
            )  # fmt: skip
            if spec.mutator != "oversize" and error not in AUTH_ERRORS:
                previous = (headers, body)
    return outcomes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("malformed")
    srv = start_server(root / "data", log_path=root / "server.log")
    try:
        yield srv
    finally:
        stop_server(srv)


def _head_and_records(srv: Server, after: int) -> tuple[int, list[dict[str, Any]]]:
    ledger = CliContext(settings=Settings(data_dir=srv.data_dir)).ledger_without_hsm
    try:
        records = [r.event() for r in ledger.db.read_records(after, 10 * REQUESTS)]
        return int(ledger.db.head_seq()), records
    finally:
        ledger.close()


def test_ten_thousand_malformed_requests_are_refused_recorded_and_harmless(
    server: Server,
) -> None:
    creds = server.principal("fuzzer", policy=ALLOW_ALL)
    kms = server.client(creds)
    key_id = kms.create_key(Description="fuzz target")["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"hello", EncryptionContext={"a": "b"})
    fx = Fixture(server.url, creds["AccessKeyId"], creds["SecretAccessKey"], key_id,
                 _b64(blob["CiphertextBlob"]))  # fmt: skip
    specs = generate(fx, REQUESTS, SEED)
    assert specs == generate(fx, REQUESTS, SEED)  # deterministic
    assert sum(s.mutator == "oversize" for s in specs) == OVERSIZE
    before, _ = _head_and_records(server, 0)

    started = time.monotonic()
    results: list[list[Outcome]] = [[] for _ in range(THREADS)]

    def run(worker: int) -> None:
        results[worker] = _send_all(fx, specs, worker)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    outcomes = [o for part in results for o in part]
    assert len(outcomes) == REQUESTS

    wrong = [o for o in outcomes if not (400 <= o.status < 500) or o.error not in AWS_ERRORS]
    assert wrong == [], wrong[:20]
    assert {o.content_type for o in outcomes} == {"application/x-amz-json-1.1"}
    unexpected = Counter(
        (o.spec.mutator, o.spec.operation, o.error)
        for o in outcomes
        if o.error not in o.spec.expected
    )
    assert unexpected == Counter()
    mutators = Counter(s.mutator for s in specs)
    assert len(mutators) == 28, mutators  # every mutator was drawn

    # Healthy, still serving, and the log holds one failure per request and nothing else.
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    head, records = _head_and_records(server, before)
    assert len(records) == head - before == REQUESTS
    topics = {r["topic"].rsplit(":", 1)[-1] for r in records}
    assert topics == {FAILED_TOPIC}
    recorded = sorted(r["error_code"] for r in records)
    assert recorded == sorted(o.error or "" for o in outcomes)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    assert kms.list_aliases(KeyId=key_id)["Aliases"] == []
    out = kms.encrypt(KeyId=key_id, Plaintext=b"after", EncryptionContext={"a": "b"})
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"a": "b"})
    assert back["Plaintext"] == b"after"
    assert server.cli("audit", "verify").startswith("OK: ")
    print(f"\n{REQUESTS} malformed requests in {elapsed:.1f} s ({REQUESTS / elapsed:.0f}/s)")
