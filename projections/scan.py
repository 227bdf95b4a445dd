"""Brute-force answers from a full scan of the log, with the usage index's semantics.

This is the baseline the index is checked against (tests) and measured against
(``bench/forensics.py``). It reads every stored event and decides in Python, without
the index tables, so a mistake in either shows up as a difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ledger.persistence import LedgerDatabase
from projections.usage import (
    CRYPTO_OPERATIONS,
    Filters,
    group_bursts,
    period_number,
    period_text,
)


def _events(db: LedgerDatabase) -> Iterator[tuple[int, dict[str, Any]]]:
    position = 0
    while True:
        records = db.read_records(position, 5000)
        if not records:
            return
        for record in records:
            yield record.seq, record.event()
        position = records[-1].seq


def _us(iso: str) -> int:
    d = datetime.fromisoformat(iso)
    return int(d.timestamp()) * 1_000_000 + d.microsecond


def _sent(request: dict[str, Any]) -> Any:
    for name in ("keyId", "destinationKeyId", "targetKeyId"):
        if request.get(name) is not None:
            return request[name]
    return None


def _contexts(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        request[n]
        for n in ("encryptionContext", "destinationEncryptionContext")
        if isinstance(request.get(n), dict)
    ]


def scan_trail(db: LedgerDatabase, f: Filters) -> list[int]:
    """The seqs of every event matching ``f``, in log order (the last ``f.limit``)."""
    aliases: dict[str, str | None] = {}  # alias ARN -> key ARN it names now
    names: dict[str, str] = {}  # alias stream id -> alias ARN
    out: list[int] = []
    for seq, event in _events(db):
        topic = str(event.get("topic", ""))
        call = event.get("call") or {}
        request = event.get("request") or {}
        additional = event.get("additional") or {}
        key_arn = event.get("key_arn")
        source = additional.get("sourceKeyArn") if isinstance(additional, dict) else None
        ok = True
        if f.key_arns or f.alias_arn or f.key_sent:
            hit = bool(f.key_arns) and (key_arn in f.key_arns or source in f.key_arns)
            if f.alias_arn and key_arn is not None and aliases.get(f.alias_arn) == key_arn:
                hit = True
            if f.key_sent and key_arn is None and _sent(request) == f.key_sent:
                hit = True
            ok = hit
        if f.principal and call.get("principal") != f.principal:
            ok = False
        if f.operations and call.get("operation") not in f.operations:
            ok = False
        ts = _us(event["timestamp"])
        if f.since_us is not None and ts < f.since_us:
            ok = False
        if f.until_us is not None and ts > f.until_us:
            ok = False
        code = event.get("error_code")
        if f.error_code and code != f.error_code:
            ok = False
        if f.error and not f.error_code and code is None:
            ok = False
        for k, v in f.context:
            if not any(k in c and str(c[k]) == v for c in _contexts(request)):
                ok = False
        if f.source_ip and call.get("source_ip") != f.source_ip:
            ok = False
        if f.lifecycle and topic.split(":", 1)[-1].startswith("ApiCall."):
            ok = False
        if ok:
            out.append(seq)
        # Alias changes take effect after the event that makes them.
        if topic.endswith("Alias.Created"):
            names[str(event["originator_id"])] = event["alias_arn"]
        arn = names.get(str(event.get("originator_id")))
        if arn is None:
            pass
        elif topic.endswith(("Alias.Created", "Alias.Recreated", "Alias.Retargeted")):
            aliases[arn] = arn.split(":alias/", 1)[0] + ":key/" + str(event["target_key_id"])
        elif topic.endswith("Alias.Deleted"):
            aliases[arn] = None
        if topic.endswith("Key.Deleted"):
            for name, target in list(aliases.items()):
                if target == key_arn:
                    aliases[name] = None
    return out[-f.limit :] if f.limit is not None else out


def scan_last_used(db: LedgerDatabase, key_arn: str) -> int | None:
    """The seq of the key's last successful cryptographic call, or None."""
    last = None
    for seq, event in _events(db):
        additional = event.get("additional") or {}
        source = additional.get("sourceKeyArn") if isinstance(additional, dict) else None
        if (
            (event.get("key_arn") == key_arn or source == key_arn)
            and event.get("error_code") is None
            and (event.get("call") or {}).get("operation") in CRYPTO_OPERATIONS
        ):
            last = seq
    return last


def scan_stats(db: LedgerDatabase, f: Filters, by: str, bucket: str | None) -> list[Any]:
    """``(group, period, count, first time, last time)`` per group, as the index's
    ``stats`` orders them."""
    wanted = set(scan_trail(db, Filters(**{**f.__dict__, "limit": None})))
    groups: dict[tuple[Any, str], list[Any]] = {}
    for seq, event in _events(db):
        if seq not in wanted:
            continue
        call = event.get("call") or {}
        grp = {
            "key": event.get("key_arn"),
            "principal": call.get("principal"),
            "operation": call.get("operation"),
            "error": event.get("error_code"),
            "source_ip": call.get("source_ip"),
        }[by]
        t = event["timestamp"]
        period = period_text(bucket, period_number(bucket, _us(t))) if bucket else ""
        g = groups.setdefault((grp, period), [grp, period, 0, t, t])
        g[2] += 1
        g[4] = t
    rows = sorted(groups.values(), key=lambda g: (-g[2], str(g[0]), g[1]))
    return rows


def scan_denied_bursts(
    db: LedgerDatabase, f: Filters, *, window_s: int = 300, threshold: int = 5
) -> list[dict[str, Any]]:
    """AccessDenied bursts per (principal, source IP), from a full scan."""
    denied = Filters(**{**f.__dict__, "error_code": "AccessDeniedException", "limit": None})
    wanted = set(scan_trail(db, denied))
    rows = []
    for seq, event in _events(db):
        if seq in wanted:
            call = event.get("call") or {}
            rows.append(
                {
                    "seq": seq,
                    "ts": _us(event["timestamp"]),
                    "time": event["timestamp"],
                    "principal": call.get("principal"),
                    "source_ip": call.get("source_ip"),
                }
            )
    rows.sort(key=lambda r: (str(r["principal"]), str(r["source_ip"]), r["seq"]))
    return group_bursts(rows, window_s=window_s, threshold=threshold)
