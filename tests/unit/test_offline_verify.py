"""The offline verifier and the prover against published vectors and properties."""

from __future__ import annotations

import ast
import base64
import json
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import merkle
from ledger.appendlog import Frontier
from ledger.offline_verify import (
    TreeBuilder,
    VerificationError,
    checkpoint_body,
    format_consistency_proof,
    format_inclusion_proof,
    key_of_record,
    leaf_hash,
    node_hash,
    note_signature_line,
    parse_checkpoint,
    parse_consistency_proof,
    parse_inclusion_proof,
    parse_verifier_key,
    range_root,
    verifier_key_text,
    verify_consistency,
    verify_inclusion,
    verify_note,
)

DATA = Path(__file__).resolve().parent.parent / "data"
RFC = json.loads((DATA / "merkle" / "rfc6962.json").read_text())
NOTE = json.loads((DATA / "signed-note" / "peterneumann.json").read_text())


def leaves_of(n: int) -> list[bytes]:
    return [leaf_hash(f"leaf {i}".encode()) for i in range(n)]


def node_fn(leaves: list[bytes]):  # type: ignore[no-untyped-def]
    def node(level: int, idx: int) -> bytes:
        width = 1 << level
        return root_of(leaves[idx * width : (idx + 1) * width])

    return node


def root_of(leaves: list[bytes]) -> bytes:
    b = TreeBuilder()
    for leaf in leaves:
        b.append(leaf)
    return b.root()


def flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


def test_roots_of_every_prefix_equal_the_rfc6962_vectors() -> None:
    leaves = [leaf_hash(bytes.fromhex(x)) for x in RFC["leaves_hex"]]
    for n, want in enumerate(RFC["roots"]):
        assert root_of(leaves[:n]).hex() == want
        assert merkle.root(node_fn(leaves), n).hex() == want
        f = Frontier()
        for leaf in leaves[:n]:
            f.append(leaf)
        assert f.root().hex() == want


@pytest.mark.parametrize("case", RFC["consistency"], ids=lambda c: f"{c['size1']}->{c['size2']}")
def test_consistency_vectors_verify_and_the_prover_reproduces_them(case: dict) -> None:  # type: ignore[type-arg]
    leaves = [leaf_hash(bytes.fromhex(x)) for x in RFC["leaves_hex"]]
    s1, s2 = case["size1"], case["size2"]
    proof = [bytes.fromhex(h) for h in case["proof"]]
    r1, r2 = bytes.fromhex(RFC["roots"][s1]), bytes.fromhex(RFC["roots"][s2])
    verify_consistency(s1, s2, proof, r1, r2)
    assert merkle.consistency_proof(node_fn(leaves), s1, s2) == proof
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = flip(bad[i])
        with pytest.raises(VerificationError):
            verify_consistency(s1, s2, bad, r1, r2)
    with pytest.raises(VerificationError):
        verify_consistency(s1, s2, proof, flip(r1), r2)
    with pytest.raises(VerificationError):
        verify_consistency(s1 + 1, s2, proof, r1, r2)
    with pytest.raises(VerificationError):
        verify_consistency(s1, s2, proof[:-1], r1, r2)


@pytest.mark.parametrize("case", RFC["inclusion"], ids=lambda c: f"{c['index']}/{c['size']}")
def test_inclusion_vectors_verify_and_the_prover_reproduces_them(case: dict) -> None:  # type: ignore[type-arg]
    leaves = [leaf_hash(bytes.fromhex(x)) for x in RFC["leaves_hex"]]
    i, n = case["index"], case["size"]
    proof = [bytes.fromhex(h) for h in case["proof"]]
    root = bytes.fromhex(RFC["roots"][n])
    verify_inclusion(i, n, leaves[i], proof, root)
    assert merkle.inclusion_proof(node_fn(leaves), i, n) == proof
    with pytest.raises(VerificationError):
        verify_inclusion(i, n, leaves[i], proof, flip(root))


def test_every_inclusion_proof_of_the_rfc6962_tree_verifies_and_rejects_tampering() -> None:
    leaves = [leaf_hash(bytes.fromhex(x)) for x in RFC["leaves_hex"]]
    for n in range(1, 9):
        root = bytes.fromhex(RFC["roots"][n])
        for i in range(n):
            proof = merkle.inclusion_proof(node_fn(leaves), i, n)
            verify_inclusion(i, n, leaves[i], proof, root)
            with pytest.raises(VerificationError):
                verify_inclusion(i, n, flip(leaves[i]), proof, root)
            with pytest.raises(VerificationError):
                verify_inclusion((i + 1) % n if n > 1 else 1, n, leaves[i], proof, root)
            if proof:
                with pytest.raises(VerificationError):
                    verify_inclusion(i, n, leaves[i], [flip(proof[0]), *proof[1:]], root)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.data())
def test_inclusion_consistency_and_range_proofs_round_trip(n: int, data: st.DataObject) -> None:
    leaves = leaves_of(n)
    node = node_fn(leaves)
    root = root_of(leaves)
    i = data.draw(st.integers(0, n - 1))
    verify_inclusion(i, n, leaves[i], merkle.inclusion_proof(node, i, n), root)
    m = data.draw(st.integers(1, n))
    verify_consistency(m, n, merkle.consistency_proof(node, m, n), root_of(leaves[:m]), root)
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(a + 1, n))
    proof = merkle.range_proof(node, n, a, b)
    assert range_root(n, a, b, leaves[a:b], proof) == root
    changed = list(leaves[a:b])
    changed[0] = flip(changed[0])
    assert range_root(n, a, b, changed, proof) != root
    with pytest.raises(VerificationError):
        range_root(n, a, b, leaves[a:b], [*proof, root])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200))
def test_the_frontier_matches_from_scratch_roots_and_reports_completed_nodes(n: int) -> None:
    leaves = leaves_of(n)
    f = Frontier()
    stored: dict[tuple[int, int], bytes] = {}
    for leaf in leaves:
        for level, idx, h in f.append(leaf):
            stored[(level, idx)] = h
    assert f.root() == root_of(leaves)
    node = node_fn(leaves)
    for (level, idx), h in stored.items():
        assert node(level, idx) == h
    again = Frontier.from_packed(n, f.packed())
    assert again.root() == f.root()


def test_the_c2sp_signed_note_vector_verifies_and_signing_reproduces_it() -> None:
    key = parse_verifier_key(NOTE["vkey"])
    assert key.name == "PeterNeumann" and key.key_id.hex() == "c74f20a3"
    assert verify_note(NOTE["note"], [key]) == ["PeterNeumann"]
    seed = base64.b64decode(NOTE["skey"].split("+", 4)[4])[1:]
    private = Ed25519PrivateKey.from_private_bytes(seed)
    assert verifier_key_text("PeterNeumann", key.public_key) == NOTE["vkey"]
    sig = private.sign(NOTE["text"].encode())
    assert (
        NOTE["text"] + "\n" + note_signature_line("PeterNeumann", key.key_id, sig) == NOTE["note"]
    )
    with pytest.raises(VerificationError, match="signature verification failed"):
        verify_note(NOTE["note"].replace("cryptography", "cryptographY"), [key])
    blob = bytearray(NOTE["note"].encode())
    blob[-10] = ord("A") if blob[-10] != ord("A") else ord("B")
    with pytest.raises(VerificationError):
        verify_note(blob.decode(), [key])
    with pytest.raises(VerificationError):
        parse_verifier_key(NOTE["vkey"].replace("c74f20a3", "c74f20a4"))
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(VerificationError):
        verify_note(NOTE["note"], [parse_verifier_key(verifier_key_text("Someone", other))])


def test_checkpoints_and_proof_texts_round_trip() -> None:
    root = bytes(range(32))
    body = checkpoint_body("keyledger/kl-x", 7, root, ["time 2026-12-05T00:00:00+00:00"])
    cp = parse_checkpoint(body)
    assert (cp.origin, cp.size, cp.root, cp.extensions) == (
        "keyledger/kl-x",
        7,
        root,
        ["time 2026-12-05T00:00:00+00:00"],
    )
    for bad in ("x\n", "o\n07\n" + base64.b64encode(root).decode() + "\n", body[:-1]):
        with pytest.raises(VerificationError):
            parse_checkpoint(bad)
    note = body + "\n— k " + base64.b64encode(b"\x00" * 68).decode() + "\n"
    text = format_inclusion_proof(3, [root, root], note)
    assert parse_inclusion_proof(text) == (3, [root, root], note)
    assert parse_consistency_proof(format_consistency_proof(2, 9, [root])) == (2, 9, [root])


def test_key_of_record_reads_the_top_level_key_arn() -> None:
    arn = "arn:aws:kms:us-east-1:111122223333:key/abc"
    assert key_of_record(json.dumps({"a": 1, "key_arn": arn}).encode()) == arn
    assert key_of_record(b'{"key_arn":null,"x":1}') is None
    nested = json.dumps(
        {"key_arn": arn, "request": {"encryptionContext": {"key_arn": "other"}}},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert key_of_record(nested) == arn
    in_string = json.dumps({"key_arn": None, "s": '"key_arn":"evil"'}).encode()
    assert key_of_record(in_string) is None
    assert node_hash(b"a" * 32, b"b" * 32) != node_hash(b"b" * 32, b"a" * 32)


def test_the_offline_verifier_imports_only_the_standard_library_and_cryptography() -> None:
    source = Path(sys.modules["ledger.offline_verify"].__file__ or "").read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots - sys.stdlib_module_names == {"cryptography"}
