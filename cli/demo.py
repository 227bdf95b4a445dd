"""``keyledger demo``: the main job end to end on the embedded defaults.

Each step prints one readable line. Plaintext and blobs are never printed, only sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import orjson
import typer

from cli.context import CliContext
from cli.main import trail_line
from ledger.errors import DisabledError, KeyLedgerError

DEMO_PLAINTEXT = (
    b"KeyLedger demo file: quarterly payroll export, 2026-Q4.\n"
    b"Every use of the key that protects it is a chained ledger event.\n"
)


def _step(n: int, text: str) -> None:
    typer.echo(f"[{n:>2}] {text}")


def run_demo(cli: CliContext, *, on_broker: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every step; raise on the first step that does not behave. Returns figures."""
    from consumers.broker import TansuBroker
    from consumers.relay import AuditRelay, read_topic
    from ledger.chain import verify_chain

    s = cli.settings
    where = s.database_url.split("@")[-1] if s.database_url else str(s.data_dir / "ledger.sqlite3")
    _step(1, f"data dir {s.data_dir} (ledger: {where})")
    ledger = cli.ledger  # initialises the SoftHSM2 token on first use
    hsm = "embedded SoftHSM2" if s.uses_embedded_hsm else s.pkcs11_module
    _step(2, f"HSM ready: token '{s.hsm_token}' ({hsm}), AES-256 domain wrapping key inside")

    caller = cli.caller
    md = ledger.create_key(caller=caller, description="demo key")["KeyMetadata"]
    arn = md["Arn"]
    _step(3, f"created key {arn} ({md['KeySpec']}, material generated in the HSM)")

    context = {"purpose": "demo", "team": "payroll"}
    enc = ledger.encrypt(
        caller=caller, key_id=md["KeyId"], plaintext=DEMO_PLAINTEXT, encryption_context=context
    )
    blob: bytes = enc["CiphertextBlob"]
    _step(
        4,
        f"encrypted a {len(DEMO_PLAINTEXT)}-byte file -> {len(blob)}-byte blob "
        f"with context {orjson.dumps(context).decode()}",
    )

    dec = ledger.decrypt(caller=caller, ciphertext_blob=blob, encryption_context=context)
    same = hashlib.sha256(dec["Plaintext"]).digest() == hashlib.sha256(DEMO_PLAINTEXT).digest()
    if not same:
        raise RuntimeError("decrypted plaintext differs")
    _step(5, "decrypted without naming the key: plaintext matches the original")

    try:
        ledger.decrypt(caller=caller, ciphertext_blob=blob, encryption_context={"purpose": "x"})
        raise RuntimeError("decrypt with a wrong context succeeded")
    except KeyLedgerError as err:
        _step(6, f"decrypt with a wrong context refused: {err.aws_name} (recorded)")

    ledger.disable_key(caller=caller, key_id=arn)
    _step(7, "disabled the key")
    try:
        ledger.encrypt(caller=caller, key_id=arn, plaintext=b"more data")
        raise RuntimeError("encrypt under a disabled key succeeded")
    except DisabledError as err:
        _step(8, f"encrypt refused: {err.aws_name}: {err.message} (recorded)")

    ledger.enable_key(caller=caller, key_id=arn)
    _step(9, "re-enabled the key")

    _api_steps(ledger, caller, arn, context)

    db = ledger.db
    from ledger import audit

    cp = audit.make_checkpoint(ledger)
    _step(
        14,
        f"signed checkpoint {cp.id} in the HSM (Ed25519, C2SP signed note): "
        f"{cp.size} records, Merkle root {cp.root.hex()[:16]}...",
    )
    result = verify_chain(db.iter_chain(), db.iter_events())
    _step(15, f"audit verify: OK: {result.count} events, head {result.head_hex}")

    records = db.read_records(0, result.count)
    _step(16, f"audit trail ({len(records)} events):")
    for record in records:
        typer.echo("       " + trail_line(record.seq, record.event()))
    _forensics_step(db, arn)
    _bundle_step(ledger)

    with TansuBroker() as broker:
        _step(19, f"started a Kafka-protocol broker (Tansu) on {broker.bootstrap}")
        if on_broker is not None:
            on_broker(broker.bootstrap)
        with AuditRelay(
            reader=db, positions=db, bootstrap=broker.bootstrap, ledger_id=ledger.ledger_id
        ) as relay:
            published = relay.run_once()
            again = relay.run_once()
            topic = relay.topic
        _step(
            20, f"streamed {published} CloudTrail records to {topic} (a second pass sent {again})"
        )
        back = read_topic(broker.bootstrap, topic)
        seqs = sorted(orjson.loads(r.value)["seq"] for r in back)
        names = sorted({orjson.loads(r.value)["record"]["eventName"] for r in back})
        if seqs != list(range(1, result.count + 1)):
            raise RuntimeError("the audit topic does not hold every seq exactly once")
        _step(
            21,
            f"read back {len(back)} records, seq 1..{seqs[-1]} each once, "
            f"events: {', '.join(names)}",
        )
    _step(22, "stopped the broker; demo complete")
    return {"events": result.count, "published": published, "read_back": len(back)}


def _forensics_step(db: Any, arn: str) -> None:
    """The usage index: the key's calls by outcome, and its last successful use."""
    from projections.usage import Filters, UsageIndex

    index = UsageIndex(db)
    n = index.rebuild()
    by_error = index.stats(Filters(key_arns=[arn]), "error")
    outcomes = ", ".join(f"{r['grp'] or 'OK'} {r['n']}" for r in by_error)
    last = index.last_used(arn)
    used = f"last used: {last['operation']} at seq {last['seq']}" if last else "never used"
    _step(17, f"usage index over {n} events: the key's calls {outcomes}; {used}")


def _bundle_step(ledger: Any) -> None:
    """Export a bundle and verify it offline with only the public key."""
    import tempfile
    from pathlib import Path

    from ledger import audit
    from ledger.offline_verify import parse_verifier_keys, verify_bundle

    with tempfile.TemporaryDirectory(prefix="keyledger-bundle-") as tmp:
        bundle = Path(tmp) / "bundle"
        audit.write_export(ledger, bundle, 1, None)
        keys = parse_verifier_keys("".join(k.vkey + "\n" for k in audit.signing_keys(ledger.db)))
        report = verify_bundle(bundle, keys)
        if not report.ok:
            raise RuntimeError("the exported bundle does not verify")
        _step(18, f"exported an audit bundle; offline verify: {report.summary()}")


APP_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}],
}


def _api_steps(ledger: Any, caller: Any, arn: str, context: dict[str, str]) -> None:
    """The HTTP API on loopback: a principal signs requests (SigV4) with botocore;
    without an identity policy it is refused, with one it encrypts and decrypts."""
    import threading

    import botocore.session
    import uvicorn
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from api.app import create_app
    from api.auth import SigV4Authenticator
    from api.backend import KmsBackend

    created = ledger.create_principal(caller=caller, name="demo-app")
    app = create_app(
        ledger=KmsBackend(ledger), authenticator=SigV4Authenticator(ledger, ledger.settings)
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API server did not start")
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}"
        _step(
            10,
            f"API on {url}: principal {created['Principal']['Arn']} "
            f"(access key {created['AccessKeyId']}; its secret is shown once, stored sealed)",
        )
        kms = botocore.session.get_session().create_client(
            "kms", endpoint_url=url, region_name=ledger.settings.region,
            aws_access_key_id=created["AccessKeyId"],
            aws_secret_access_key=created["SecretAccessKey"],
            config=Config(retries={"max_attempts": 1}),
        )  # fmt: skip
        try:
            kms.encrypt(KeyId=arn, Plaintext=b"api", EncryptionContext=context)
            raise RuntimeError("a principal without a policy could encrypt")
        except ClientError as err:
            code = err.response["Error"]["Code"]
            _step(11, f"SigV4-signed Encrypt without an identity policy refused: {code} (recorded)")
        ledger.attach_principal_policy(
            caller=caller, name="demo-app", policy_name="encrypt-decrypt",
            policy=orjson.dumps(APP_POLICY).decode(),
        )  # fmt: skip
        _step(12, "attached an identity policy allowing kms:Encrypt and kms:Decrypt")
        blob = kms.encrypt(KeyId=arn, Plaintext=DEMO_PLAINTEXT, EncryptionContext=context)
        back = kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=context)
        if back["Plaintext"] != DEMO_PLAINTEXT:
            raise RuntimeError("API round trip differs")
        _step(13, "Encrypt and Decrypt over HTTP (botocore, SigV4): plaintext matches")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
