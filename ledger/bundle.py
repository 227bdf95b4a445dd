"""Writes the export bundle ``ledger.offline_verify.verify_bundle`` checks.

Layout of a bundle directory:

* ``records.jsonl``: the stored bytes of records ``fromSeq..toSeq``, one per line.
* ``chain.tsv``: ``seq, record_hash, prev, key_arn, key_seq, key_prev`` per record
  (hex; ``-`` for a record without a key).
* ``checkpoints/<id>.txt``: every signed checkpoint note.
* ``proofs/consistency-<id1>-<id2>.txt``: between consecutive checkpoints.
* ``proofs/range-<id>.txt``: partial exports only, leaves ``[fromSeq-1, toSeq)``
  against each checkpoint of size at least ``toSeq``.
* ``ledger.vkey``: the ledger's verifier keys; ``manifest.json``: what is where, with
  the SHA-256 of every other file, and ``seek``: every ``SEEK_EVERY``-th record's
  ``[seq, offset in records.jsonl, offset in chain.tsv]``, so a verifier can start a
  second process mid-file without counting lines (a hint only: a wrong one makes the
  verifier fall back to one pass, never changes its verdict).

Everything in a bundle is public: records carry only what the log stores (HSM-wrapped
material at most), never plaintext or key material.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from ledger.offline_verify import BUNDLE_FORMAT, format_consistency_proof, format_range_proof

SEEK_EVERY = 1 << 16  # records between two seek hints in the manifest


@dataclass(frozen=True)
class BundleRecord:
    seq: int
    data: bytes
    record_hash: bytes
    prev: bytes
    key_arn: str | None
    key_seq: int | None
    key_prev: bytes | None


@dataclass(frozen=True)
class BundleManifest:
    path: Path
    from_seq: int
    to_seq: int
    checkpoints: int


def write_bundle(
    out: Path,
    *,
    ledger_id: str,
    origin: str,
    from_seq: int,
    prev_hash: bytes,
    records: Iterable[BundleRecord],
    checkpoints: Sequence[tuple[int, int, str]],
    consistency_proof: Callable[[int, int], list[bytes]],
    range_proof: Callable[[int, int, int], list[bytes]],
    verifier_keys: Sequence[str],
    seek_every: int | None = None,
) -> BundleManifest:
    """Write the bundle into the new directory ``out`` (streams the records).

    A proof callable raising LookupError (records missing) leaves its file out.
    Raises ValueError if ``out`` exists and is not empty. Records are written as the
    database holds them, gaps included, so a damaged log exports and fails verify.
    """
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "proofs").mkdir(exist_ok=True)
    files: dict[str, str] = {}
    last = from_seq - 1
    rh = hashlib.sha256()
    th = hashlib.sha256()
    seek: list[list[int]] = []
    every = seek_every or SEEK_EVERY
    rec_at = tsv_at = 0
    with (out / "records.jsonl").open("wb") as rf, (out / "chain.tsv").open("wb") as tf:
        for n, r in enumerate(records):
            last = r.seq  # a gap (a deleted record) is written as it is: verify names it
            if n and n % every == 0:
                seek.append([r.seq, rec_at, tsv_at])
            line = r.data + b"\n"
            rf.write(line)
            rh.update(line)
            row = (
                "\t".join(
                    [
                        str(r.seq),
                        r.record_hash.hex(),
                        r.prev.hex(),
                        r.key_arn or "-",
                        "-" if r.key_seq is None else str(r.key_seq),
                        "-" if r.key_prev is None else r.key_prev.hex(),
                    ]
                ).encode()
                + b"\n"
            )
            tf.write(row)
            th.update(row)
            rec_at, tsv_at = rec_at + len(line), tsv_at + len(row)
    files["records.jsonl"], files["chain.tsv"] = rh.hexdigest(), th.hexdigest()

    def put(name: str, text: str) -> None:
        data = text.encode()
        (out / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()

    ordered = sorted(checkpoints)
    for cp_id, _, note in ordered:
        put(f"checkpoints/{cp_id:08d}.txt", note)
    for (id1, s1, _), (id2, s2, _) in itertools.pairwise(ordered):
        if s1 < s2:
            try:
                proof = consistency_proof(s1, s2)
            except LookupError:  # the log lost records: the missing proof is the finding
                continue
            put(
                f"proofs/consistency-{id1:08d}-{id2:08d}.txt",
                format_consistency_proof(s1, s2, proof),
            )
    if from_seq > 1 and last >= from_seq:
        for cp_id, size, _ in ordered:
            if size >= last:
                try:
                    proof = range_proof(size, from_seq - 1, last)
                except LookupError:
                    continue
                put(
                    f"proofs/range-{cp_id:08d}.txt",
                    format_range_proof(size, from_seq - 1, last, proof),
                )
    put("ledger.vkey", "".join(k + "\n" for k in verifier_keys))
    manifest = {
        "format": BUNDLE_FORMAT,
        "ledger": ledger_id,
        "origin": origin,
        "fromSeq": from_seq,
        "toSeq": last,
        "prevHash": prev_hash.hex(),
        "files": files,
        "seek": seek,
    }
    (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return BundleManifest(out, from_seq, last, len(ordered))


__all__ = ["SEEK_EVERY", "BundleManifest", "BundleRecord", "write_bundle"]
