"""Tamper evidence on both backends: `keyledger audit verify` names the first bad position."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from cli.main import main
from ledger.chain import verify_chain
from ledger.errors import TamperError
from ledger.offline_verify import leaf_hash
from ledger.records import GENESIS
from ledger.service import Caller, KeyLedger

pytestmark = pytest.mark.softhsm

CALLER = Caller(principal="arn:aws:iam::111122223333:root")
N = 8  # events in the ledger under test


def fill(ledger: KeyLedger) -> None:
    key = ledger.create_key(caller=CALLER)["KeyMetadata"]["KeyId"]
    for i in range(N - 1):
        ledger.encrypt(caller=CALLER, key_id=key, plaintext=f"m{i}".encode())
    assert ledger.db.head_seq() == N


def nid_of(ledger: KeyLedger, seq: int) -> int:
    with ledger.db.transaction(commit=False) as c:
        row = c.execute("SELECT notification_id FROM {chain} WHERE seq = ?", (seq,)).fetchone()
    assert row is not None
    return int(row["notification_id"])


def flip_byte(ledger: KeyLedger) -> None:
    nid = nid_of(ledger, 3)
    with ledger.db.transaction(commit=True) as c:
        row = c.execute("SELECT state FROM {events} WHERE {nid} = ?", (nid,)).fetchone()
        assert row is not None
        state = bytearray(row["state"])
        state[40] ^= 0x01
        c.execute("UPDATE {events} SET state = ? WHERE {nid} = ?", (bytes(state), nid))


def delete_row(ledger: KeyLedger) -> None:
    with ledger.db.transaction(commit=True) as c:
        c.execute("DELETE FROM {events} WHERE {nid} = ?", (nid_of(ledger, 3),))


def swap_rows(ledger: KeyLedger) -> None:
    a, b = nid_of(ledger, 3), nid_of(ledger, 4)
    with ledger.db.transaction(commit=True) as c:
        ra = c.execute("SELECT state FROM {events} WHERE {nid} = ?", (a,)).fetchone()
        rb = c.execute("SELECT state FROM {events} WHERE {nid} = ?", (b,)).fetchone()
        assert ra is not None and rb is not None
        c.execute("UPDATE {events} SET state = ? WHERE {nid} = ?", (rb["state"], a))
        c.execute("UPDATE {events} SET state = ? WHERE {nid} = ?", (ra["state"], b))


def insert_copy(ledger: KeyLedger) -> None:
    with ledger.db.transaction(commit=True) as c:
        row = c.execute(
            "SELECT originator_id, originator_version, topic, state FROM {events} WHERE {nid} = ?",
            (nid_of(ledger, 3),),
        ).fetchone()
        assert row is not None
        c.execute(
            "INSERT INTO {events} (originator_id, originator_version, topic, state) "
            "VALUES (?, ?, ?, ?)",
            (row["originator_id"], row["originator_version"] + 1, row["topic"], row["state"]),
        )


def truncate_tail(ledger: KeyLedger) -> None:
    """Drop records 7 and 8 with their chain, key-chain and tree rows: the chain alone
    still verifies, only the checkpoint of size 8 shows the loss."""
    with ledger.db.transaction(commit=True) as c:
        for seq in (N, N - 1):
            nid = nid_of(ledger, seq)
            c.execute("DELETE FROM {events} WHERE {nid} = ?", (nid,))
            c.execute("DELETE FROM {chain} WHERE seq = ?", (seq,))
            c.execute("DELETE FROM {key_chain} WHERE seq = ?", (seq,))
    rebuild_index(ledger)


def rebuild_index(ledger: KeyLedger) -> None:
    """What a careful forger does after editing records: recompute every chain row,
    key-chain row and tree node so the database is self-consistent."""
    from ledger.appendlog import MIN_STORED_LEVEL, Frontier

    rows = list(ledger.db.iter_records_with_keys(1, ledger.db.head_seq()))
    frontier = Frontier()
    heads: dict[str, tuple[int, bytes]] = {}
    prev = GENESIS
    from ledger.offline_verify import key_of_record

    with ledger.db.transaction(commit=True) as c:
        c.execute("DELETE FROM {tree}")
        c.execute("DELETE FROM {key_chain}")
        c.execute("DELETE FROM {key_heads}")
        for seq, data, _, _, _, _, _ in rows:
            digest = hashlib.sha256(data).digest()
            c.execute(
                "UPDATE {chain} SET record_hash = ?, prev = ? WHERE seq = ?", (digest, prev, seq)
            )
            key = key_of_record(data)
            if key is not None:
                kseq, kprev = heads.get(key, (0, GENESIS))
                c.execute(
                    "INSERT INTO {key_chain} VALUES (?, ?, ?, ?)", (seq, key, kseq + 1, kprev)
                )
                heads[key] = (kseq + 1, digest)
            for level, idx, h in frontier.append(leaf_hash(data)):
                if level >= MIN_STORED_LEVEL:
                    c.execute("INSERT INTO {tree} VALUES (?, ?, ?)", (level, idx, h))
            prev = digest
        for key, (kseq, h) in heads.items():
            c.execute("INSERT INTO {key_heads} VALUES (?, ?, ?)", (key, kseq, h))
        c.execute(
            "UPDATE {tree_head} SET size = ?, last_hash = ?, frontier = ? WHERE id = 1",
            (frontier.size, prev, frontier.packed()),
        )
    ledger.recorder.indexer.forget()


TAMPERS: list[tuple[str, Callable[[KeyLedger], None], int, str]] = [
    ("change one byte", flip_byte, 3, "modified"),
    ("delete a row", delete_row, 3, "missing"),
    ("swap two rows", swap_rows, 3, "modified"),
    ("insert a copy of a row", insert_copy, N + 1, "inserted"),
]


def cli_verify(ledger: KeyLedger, *extra: str) -> tuple[int, str]:
    s = ledger.settings
    args = ["--data-dir", str(s.data_dir)]
    if s.database_url:
        args += ["--database-url", s.database_url]
    with pytest.raises(SystemExit) as info:
        main([*args, "audit", "verify", *extra])
        raise SystemExit(0)
    return int(info.value.code or 0), ""


@pytest.mark.parametrize(
    ("name", "tamper", "position", "word"), TAMPERS, ids=[t[0] for t in TAMPERS]
)
def test_verify_names_the_first_bad_position(
    ledger: KeyLedger,
    capsys: pytest.CaptureFixture[str],
    name: str,
    tamper: Callable[[KeyLedger], None],
    position: int,
    word: str,
) -> None:
    fill(ledger)
    code, _ = cli_verify(ledger)
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"OK: {N} events, head "), out
    tamper(ledger)
    code, _ = cli_verify(ledger)
    out = capsys.readouterr().out
    assert code == 1, name
    assert out.startswith(f"FAIL: position {position}:"), out
    assert word in out
    with pytest.raises(TamperError) as info:
        verify_chain(ledger.db.iter_chain(), ledger.db.iter_events())
    assert info.value.position == position


def test_truncated_tail_is_caught_by_expected_count_or_head(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(ledger)
    assert cli_verify(ledger)[0] == 0
    head = capsys.readouterr().out.split("head ")[1].split(",")[0].strip()
    truncate_tail(ledger)
    assert cli_verify(ledger)[0] == 0  # a shorter log is self-consistent...
    assert capsys.readouterr().out.startswith(f"OK: {N - 2} events")
    assert cli_verify(ledger, "--expect-count", str(N))[0] == 1  # ...but not what was expected
    assert capsys.readouterr().out.startswith(f"FAIL: position {N - 1}:")
    assert cli_verify(ledger, "--expect-head", head)[0] == 1
    assert "head hash differs" in capsys.readouterr().out


def test_untouched_log_verifies_with_expectations(
    ledger: KeyLedger, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(ledger)
    result = verify_chain(ledger.db.iter_chain(), ledger.db.iter_events())
    assert cli_verify(ledger, "--expect-count", str(N), "--expect-head", result.head_hex)[0] == 0
    out = capsys.readouterr().out
    assert out == f"OK: {N} events, head {result.head_hex}, 0 checkpoints valid\n"
