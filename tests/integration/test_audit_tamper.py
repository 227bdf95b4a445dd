"""Issue 6 tamper suite, on SQLite and PostgreSQL, against live verify
(`keyledger audit verify`) and bundle verify (`keyledger audit verify --bundle`).

Each tamper is detected with the right reason and position; an untouched ledger and
bundle verify clean. Checkpoints are signed by the ledger's Ed25519 key in SoftHSM2.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from cli.main import main
from consumers.relay import message_value
from ledger import audit
from ledger.offline_verify import (
    leaf_hash,
    parse_checkpoint,
    parse_consistency_proof,
    parse_inclusion_proof,
    parse_verifier_keys,
    verify_consistency,
    verify_inclusion,
)
from ledger.service import Caller, KeyLedger
from tests.integration.test_tamper import (
    delete_row,
    flip_byte,
    insert_copy,
    nid_of,
    rebuild_index,
    swap_rows,
    truncate_tail,
)

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
N = 8


def fill(ledger: KeyLedger) -> str:
    """8 records; checkpoints at sizes 5 and 8."""
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    for i in range(4):
        ledger.encrypt(caller=CALLER, key_id=key, plaintext=f"m{i}".encode())
    audit.make_checkpoint(ledger)
    for i in range(3):
        ledger.encrypt(caller=CALLER, key_id=key, plaintext=f"n{i}".encode())
    audit.make_checkpoint(ledger)
    assert ledger.db.head_seq() == N
    return str(key)


def run_cli(ledger: KeyLedger, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    s = ledger.settings
    base = ["--data-dir", str(s.data_dir)]
    if s.database_url:
        base += ["--database-url", s.database_url]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*base, *args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def verify_bundle(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], bundle: Path, vkeys: Path, *extra: str
) -> tuple[int, str]:
    return run_cli(
        ledger, capsys, "audit", "verify", "--bundle", str(bundle), "--public-key", str(vkeys),
        *extra,
    )  # fmt: skip


def vkey_file(ledger: KeyLedger, tmp_path: Path) -> Path:
    path = tmp_path / "ledger.vkey"
    path.write_text("".join(k.vkey + "\n" for k in audit.signing_keys(ledger.db)))
    return path


def state_of(ledger: KeyLedger, seq: int) -> bytes:
    with ledger.db.transaction(commit=False) as c:
        row = c.execute(
            "SELECT state FROM {events} WHERE {nid} = ?", (nid_of(ledger, seq),)
        ).fetchone()
    assert row is not None
    return bytes(row["state"])


def set_state(ledger: KeyLedger, seq: int, state: bytes) -> None:
    with ledger.db.transaction(commit=True) as c:
        c.execute("UPDATE {events} SET state = ? WHERE {nid} = ?", (state, nid_of(ledger, seq)))


TAMPERS: list[tuple[str, Callable[[KeyLedger], None], int, str, str]] = [
    # name, tamper, live position, live word, bundle line
    ("change one byte", flip_byte, 3, "modified", "INVALID: record hash mismatch at seq 3"),
    ("delete a row", delete_row, 3, "missing", "INVALID:"),
    (
        "swap two rows",
        swap_rows,
        3,
        "modified",
        "INVALID: chain break at seq 3 (records missing or reordered)",
    ),
    ("insert a copy of a row", insert_copy, N + 1, "inserted", ""),
    (
        "truncate the tail",
        truncate_tail,
        N - 1,
        "truncated",
        "INVALID: log truncated: checkpoint 2 covers 8 records, the bundle ends at seq 6",
    ),
]


def test_untouched_ledger_and_bundle_verify_clean(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(ledger)
    code, out = run_cli(ledger, capsys, "audit", "verify")
    assert code == 0, out
    assert out.startswith(f"OK: {N} events, head ") and out.strip().endswith(
        "2 checkpoints valid"
    ), out
    bundle = tmp_path / "bundle"
    code, out = run_cli(ledger, capsys, "audit", "export", "--out", str(bundle))
    assert code == 0 and f"exported records 1..{N} and 2 checkpoints" in out
    code, out = verify_bundle(
        ledger,
        capsys,
        bundle,
        vkey_file(ledger, tmp_path),
    )
    assert (code, out) == (0, f"{N} records valid, 2 checkpoints valid\n")


@pytest.mark.parametrize(
    ("name", "tamper", "position", "word", "bundle_line"), TAMPERS, ids=[t[0] for t in TAMPERS]
)
def test_tamper_is_detected_live_and_in_the_bundle(
    ledger: KeyLedger,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    tamper: Callable[[KeyLedger], None],
    position: int,
    word: str,
    bundle_line: str,
) -> None:
    fill(ledger)
    vkeys = vkey_file(ledger, tmp_path)
    tamper(ledger)
    code, out = run_cli(ledger, capsys, "audit", "verify")
    assert code == 1, (name, out)
    assert out.startswith(f"FAIL: position {position}:"), out
    assert word in out, out
    if not bundle_line:
        return  # an inserted row without a chain entry never reaches an export
    bundle = tmp_path / "bundle"
    code, out = run_cli(ledger, capsys, "audit", "export", "--out", str(bundle))
    assert code == 0, out
    code, out = verify_bundle(ledger, capsys, bundle, vkeys)
    assert code == 1, out
    assert bundle_line in out, out


def test_a_fork_is_caught_by_an_earlier_checkpoint_the_auditor_kept(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(ledger)
    vkeys = vkey_file(ledger, tmp_path)
    kept = tmp_path / "kept.txt"
    kept.write_text(audit.checkpoints(ledger.db)[0].note)
    # Rewrite record 3, recompute everything, drop the old checkpoints, sign a new one.
    event = orjson.loads(state_of(ledger, 3))
    event["call"]["source_ip"] = "203.0.113.7"
    set_state(ledger, 3, orjson.dumps(event, option=orjson.OPT_SORT_KEYS))
    rebuild_index(ledger)
    with ledger.db.transaction(commit=True) as c:
        c.execute("DELETE FROM {checkpoints}")
    audit.make_checkpoint(ledger)
    code, out = run_cli(ledger, capsys, "audit", "verify")
    assert code == 0, out  # self-consistent: only an outside copy can tell
    bundle = tmp_path / "bundle"
    run_cli(ledger, capsys, "audit", "export", "--out", str(bundle))
    code, out = verify_bundle(ledger, capsys, bundle, vkeys)
    assert code == 0, out
    code, out = verify_bundle(ledger, capsys, bundle, vkeys, "--checkpoint", str(kept))
    assert code == 1, out
    assert out.startswith("INVALID: records do not match the kept checkpoint of size 5\n"), out
    assert out.endswith(f"{N - 5} records valid, 1 checkpoints valid\n"), out


def test_forged_signature_wrong_key_and_missing_checkpoint_are_reported(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(ledger)
    vkeys = vkey_file(ledger, tmp_path)
    bundle = tmp_path / "bundle"
    run_cli(ledger, capsys, "audit", "export", "--out", str(bundle))
    # Wrong public key: every checkpoint fails its signature.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from ledger.offline_verify import verifier_key_text

    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    name = audit.signing_keys(ledger.db)[0].name
    wrong = tmp_path / "wrong.vkey"
    wrong.write_text(verifier_key_text(name, other) + "\n")
    code, out = verify_bundle(ledger, capsys, bundle, wrong)
    assert code == 1 and "signature verification failed" in out, out
    assert out.strip().endswith("0 checkpoints valid"), out
    # Missing checkpoint file.
    gone = tmp_path / "gone"
    shutil.copytree(bundle, gone)
    (gone / "checkpoints" / "00000002.txt").unlink()
    code, out = verify_bundle(ledger, capsys, gone, vkeys)
    assert code == 1 and "INVALID: file checkpoints/00000002.txt is missing" in out, out
    # Forged signature in the live ledger: one byte of checkpoint 2's signature.
    cp = audit.checkpoints(ledger.db)[1]
    text, sig_line = cp.note.rsplit("\n— ", 1)
    sig_name, sig_b64 = sig_line.strip().split(" ")
    import base64

    raw = bytearray(base64.b64decode(sig_b64))
    raw[10] ^= 0x01
    forged = f"{text}\n— {sig_name} {base64.b64encode(bytes(raw)).decode()}\n"
    with ledger.db.transaction(commit=True) as c:
        c.execute("UPDATE {checkpoints} SET note = ? WHERE id = ?", (forged, cp.id))
    code, out = run_cli(ledger, capsys, "audit", "verify")
    assert code == 1, out
    assert out.startswith(f"FAIL: position {N}: checkpoint 2: signature verification failed"), out


def test_an_edited_siem_copy_is_reported_with_its_seq(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(ledger)
    vkeys = vkey_file(ledger, tmp_path)
    bundle = tmp_path / "bundle"
    run_cli(ledger, capsys, "audit", "export", "--out", str(bundle))
    copies = [message_value(r, ledger.ledger_id, r.event()) for r in ledger.db.read_records(0, 100)]
    siem = tmp_path / "siem.jsonl"
    siem.write_bytes(b"".join(c + b"\n" for c in copies))
    code, out = verify_bundle(ledger, capsys, bundle, vkeys, "--siem-copy", str(siem))
    assert code == 0, out
    edited = json.loads(copies[4])
    edited["record"]["sourceIPAddress"] = "198.51.100.1"
    copies[4] = json.dumps(edited).encode()
    siem.write_bytes(b"".join(c + b"\n" for c in copies))
    code, out = verify_bundle(ledger, capsys, bundle, vkeys, "--siem-copy", str(siem))
    assert code == 1, out
    assert "INVALID: SIEM copy at seq 5 differs from the stored event" in out, out


def test_proofs_verify_against_the_signed_checkpoints(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = fill(ledger)
    keys = parse_verifier_keys(vkey_file(ledger, tmp_path).read_text())
    cps = audit.checkpoints(ledger.db)
    for seq in range(1, N + 1):
        code, out = run_cli(ledger, capsys, "audit", "prove", "--seq", str(seq))
        assert code == 0
        index, proof, note = parse_inclusion_proof(out)
        body = parse_checkpoint(note.split("\n\n", 1)[0] + "\n")
        assert (index, body.size) == (seq - 1, N)
        verify_inclusion(index, body.size, leaf_hash(state_of(ledger, seq)), proof, body.root)
        from ledger.offline_verify import verify_note

        assert verify_note(note, keys)
    code, out = run_cli(ledger, capsys, "audit", "prove", "--from-size", "5", "--to-size", "8")
    assert code == 0
    s1, s2, proof = parse_consistency_proof(out)
    verify_consistency(s1, s2, proof, cps[0].root, cps[1].root)
    code, out = run_cli(ledger, capsys, "audit", "history", key)
    assert code == 0, out
    assert f"key chain: {N} records of" in out, out
    index, proof, note = parse_inclusion_proof(out[out.index("c2sp.org/tlog-proof") :])
    assert index == N - 1
    code, out = run_cli(ledger, capsys, "audit", "prove", "--seq", "99")
    assert code == 1


def test_signing_key_rotation_keeps_every_checkpoint_verifiable_with_the_right_keys(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    audit.make_checkpoint(ledger)  # before: K1
    old = audit.signing_keys(ledger.db)[0]
    new = audit.add_signing_key(ledger)
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"x")
    audit.make_checkpoint(ledger)  # during: K1 and K2
    audit.retire_signing_key(ledger, old.name)
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"y")
    audit.make_checkpoint(ledger)  # after: K2
    sig_lines = [cp.note.count("\n— ") for cp in audit.checkpoints(ledger.db)]
    assert sig_lines == [1, 2, 1]
    bundle = tmp_path / "bundle"
    run_cli(ledger, capsys, "audit", "export", "--out", str(bundle))

    def verify_with(*vkeys: str) -> tuple[int, str]:
        f = tmp_path / "keys.vkey"
        f.write_text("".join(v + "\n" for v in vkeys))
        return verify_bundle(ledger, capsys, bundle, f)

    assert verify_with(old.vkey, new.vkey) == (0, "3 records valid, 3 checkpoints valid\n")
    code, out = verify_with(old.vkey)
    assert code == 1 and "INVALID: checkpoint 3 (size 3): signature verification failed" in out
    code, out = verify_with(new.vkey)
    assert code == 1 and "INVALID: checkpoint 1 (size 1): signature verification failed" in out
    code, out = run_cli(ledger, capsys, "audit", "verify")
    assert code == 0 and out.strip().endswith("3 checkpoints valid"), out
    with pytest.raises(Exception, match=r"ledger signing key not found"):
        ledger.keystore.ledger_sign(old.label, b"after retirement")


def test_a_partial_export_verifies_and_catches_a_modified_record(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(ledger)
    vkeys = vkey_file(ledger, tmp_path)
    bundle = tmp_path / "part"
    code, out = run_cli(
        ledger, capsys, "audit", "export", "--out", str(bundle), "--from-seq", "3", "--to-seq", "6"
    )
    assert code == 0, out
    code, out = verify_bundle(ledger, capsys, bundle, vkeys)
    assert code == 0 and out.startswith("4 records valid"), out
    flip_byte(ledger)
    rebuild_index(ledger)
    bad = tmp_path / "bad"
    run_cli(
        ledger, capsys, "audit", "export", "--out", str(bad), "--from-seq", "3", "--to-seq", "6"
    )
    code, out = verify_bundle(ledger, capsys, bad, vkeys)
    assert code == 1, out
    assert "INVALID: records do not match checkpoint" in out, out


def test_an_old_ledger_is_indexed_on_its_next_append(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ledger written before the key chain and tree existed is backfilled."""
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    for i in range(20):
        ledger.encrypt(caller=CALLER, key_id=key, plaintext=f"m{i}".encode())
    with ledger.db.transaction(commit=True) as c:
        c.execute("DELETE FROM {tree}")
        c.execute("DELETE FROM {tree_head}")
        c.execute("DELETE FROM {key_chain}")
        c.execute("DELETE FROM {key_heads}")
    ledger.recorder.indexer.forget()
    ledger.encrypt(caller=CALLER, key_id=key, plaintext=b"after")
    from ledger.offline_verify import TreeBuilder

    builder = TreeBuilder()
    for data in ledger.db.iter_chain_states():
        builder.append(leaf_hash(data))
    assert audit.tree_size(ledger.db) == 22
    assert audit.tree_root(ledger.db, 22) == builder.root()
    assert len(audit.key_history(ledger.db, ledger.settings.key_arn(key))) == 22
    code, out = run_cli(ledger, capsys, "audit", "verify")
    assert code == 0, out
