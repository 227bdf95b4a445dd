"""Detections: Sigma rules over the CloudTrail audit stream, and the consumer that runs them.

Rules are plain Sigma YAML (``logsource: {product: aws, service: cloudtrail}``) shipped in
``consumers/rules/``. This module evaluates the subset they use:

* detection maps ``field|modifier...: value`` (AND across fields), lists of values (OR,
  or AND with ``|all``), lists of maps (OR); modifiers ``contains``, ``startswith``,
  ``endswith``, ``re`` (with ``i``, ``m``, ``s``), ``all``, ``exists``, ``cased``; ``*``
  and ``?`` wildcards; ``null`` for a missing field; matching is case-insensitive unless
  ``cased`` (``re`` is case-sensitive, as in Sigma);
* conditions with ``and``, ``or``, ``not``, parentheses, ``1 of``/``all of`` a name
  pattern or ``them``;
* Sigma v2 correlation rules of type ``event_count`` and ``value_count`` with
  ``group-by``, ``timespan`` and a ``gt/gte/lt/lte/eq/neq`` condition.

Two KeyLedger extensions, both documented in the rules that use them:

* **Derived policy fields.** A key policy reaches CloudTrail as a JSON *string* in
  ``requestParameters.policy``, which plain Sigma cannot parse. Before evaluation the
  record gets ``keyledger.policyOpenToAnyone`` (true when an Allow statement names the
  principal ``*``) and ``keyledger.policyForeignAccounts`` (accounts other than the key's
  that an Allow statement names), derived from that string only. Other Sigma tooling
  needs the same enrichment for the rule that reads them.
* **First seen** (a custom attribute ``keyledger: {first_seen: {group-by, field}}``).
  Sigma has no "never seen before" (Elastic calls it a new-terms rule). A rule with it
  fires only when the record's ``field`` value was never seen for its ``group-by``
  value in an earlier *successful* record (no ``errorCode``), and only when the group
  has been seen before at all (the first record of a principal is its baseline).

Evaluation is deterministic: records are processed in ledger ``seq`` order and time
windows use ``eventTime``, never the wall clock. Alerts carry only fields of the matched
CloudTrail record (which holds no plaintext, key material, ciphertext or tokens).
"""

from __future__ import annotations

import contextlib
import heapq
import importlib.resources
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from consumers.relay import AUDIT_TOPIC

log = logging.getLogger(__name__)

ALERTS_TOPIC = "keyledger.alerts.v1"
DEFAULT_GROUP = "keyledger-detect"
LOGSOURCE = {"product": "aws", "service": "cloudtrail"}
EXTENSION = "keyledger"

JSON = dict[str, Any]


class SigmaRuleError(ValueError):
    """A rule file is not valid Sigma, or uses Sigma this evaluator does not support."""


class DetectionError(RuntimeError):
    """The detector cannot keep its ordering guarantee (malformed record, bad topic)."""


# ============================================================ field access and matching


def field_values(record: Mapping[str, Any], path: str) -> list[Any]:
    """Every value at a dotted ``path`` (lists along the way are searched element-wise).

    A key that itself contains dots is found too. Missing fields and nulls give ``[]``.
    """
    if path in record:
        found = record[path]
        return [] if found is None else list(found) if isinstance(found, list) else [found]
    values: list[Any] = [record]
    for part in path.split("."):
        nxt: list[Any] = []
        for v in values:
            if isinstance(v, list):
                nxt.extend(e[part] for e in v if isinstance(e, Mapping) and part in e)
            elif isinstance(v, Mapping) and part in v:
                nxt.append(v[part])
        values = nxt
    flat: list[Any] = []
    for v in values:
        if isinstance(v, list):
            flat.extend(v)
        elif v is not None:
            flat.append(v)
    return flat


def _wildcard_regex(value: str) -> str:
    """Sigma string to regex: ``*`` any run, ``?`` one char, backslash escapes them."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in "*?\\":
            out.append(re.escape(value[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return "".join(out)


ValueTest = Callable[[Any], bool]


def _value_test(value: Any, modifiers: list[str]) -> ValueTest:
    """One rule value with its modifiers as a predicate over one record value."""
    if value is None:
        raise SigmaRuleError("null is only valid as the whole value of a field")
    if isinstance(value, bool):
        return lambda v: v is value or (isinstance(v, str) and v.lower() == str(value).lower())
    if isinstance(value, int | float):
        return lambda v: not isinstance(v, bool) and (v == value or str(v) == str(value))
    if not isinstance(value, str):
        raise SigmaRuleError(f"unsupported value type {type(value).__name__}")
    if "re" in modifiers:
        flags = 0
        for sub, flag in (("i", re.IGNORECASE), ("m", re.MULTILINE), ("s", re.DOTALL)):
            if sub in modifiers:
                flags |= flag
        try:
            pattern = re.compile(value, flags)
        except re.error as exc:
            raise SigmaRuleError(f"invalid regular expression {value!r}: {exc}") from exc
    else:
        body = _wildcard_regex(value)
        if "contains" in modifiers:
            body = f".*{body}.*"
        elif "startswith" in modifiers:
            body = f"{body}.*"
        elif "endswith" in modifiers:
            body = f".*{body}"
        flags = re.DOTALL | (0 if "cased" in modifiers else re.IGNORECASE)
        whole = re.compile(body, flags)
        return lambda v: (text := _scalar(v)) is not None and whole.fullmatch(text) is not None
    return lambda v: (text := _scalar(v)) is not None and pattern.search(text) is not None


def _scalar(v: Any) -> str | None:
    """A record value as the string Sigma matches against (None for objects)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int | float):
        return str(v)
    return None


SUPPORTED_MODIFIERS = frozenset(
    {"contains", "startswith", "endswith", "re", "i", "m", "s", "all", "exists", "cased"}
)

Matcher = Callable[[Mapping[str, Any]], bool]


def _field_matcher(spec: str, value: Any) -> Matcher:
    """``field|mod|mod: value`` as a predicate over a record."""
    path, *modifiers = spec.split("|")
    unknown = [m for m in modifiers if m not in SUPPORTED_MODIFIERS]
    if unknown:
        raise SigmaRuleError(f"unsupported modifier(s) {unknown} on field {path!r}")
    if "exists" in modifiers:
        if not isinstance(value, bool):
            raise SigmaRuleError("the exists modifier takes true or false")
        return lambda record: bool(field_values(record, path)) is value
    if value is None:
        return lambda record: not field_values(record, path)
    values = value if isinstance(value, list) else [value]
    if any(v is None for v in values):
        nonnull = [v for v in values if v is not None]
        rest = _field_matcher(spec, nonnull) if nonnull else None
        return lambda record: not field_values(record, path) or (rest is not None and rest(record))
    tests = [_value_test(v, modifiers) for v in values]
    combine = all if "all" in modifiers else any

    def match(record: Mapping[str, Any]) -> bool:
        found = field_values(record, path)
        return combine(any(test(v) for v in found) for test in tests)

    return match


def _search_matcher(name: str, definition: Any) -> Matcher:
    """One search identifier: a field map (AND) or a list of field maps (OR)."""
    if isinstance(definition, Mapping):
        parts = [_field_matcher(str(k), v) for k, v in definition.items()]
        return lambda record: all(p(record) for p in parts)
    if (
        isinstance(definition, list)
        and definition
        and all(isinstance(d, Mapping) for d in definition)
    ):
        maps = [_search_matcher(name, d) for d in definition]
        return lambda record: any(m(record) for m in maps)
    raise SigmaRuleError(f"search {name!r}: keyword searches are not supported, use field maps")


# ============================================================ conditions

_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def _tokens(condition: str) -> list[str]:
    pos, out = 0, []
    condition = condition.strip()
    while pos < len(condition):
        m = _TOKEN.match(condition, pos)
        if m is None:
            raise SigmaRuleError(f"cannot parse condition {condition!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


class _ConditionParser:
    """Recursive descent over ``or`` < ``and`` < ``not`` < atoms, as Sigma specifies."""

    def __init__(self, condition: str, searches: Mapping[str, Matcher]) -> None:
        self._tokens = _tokens(condition)
        self._pos = 0
        self._searches = searches
        self._text = condition

    def parse(self) -> Matcher:
        expr = self._or()
        if self._pos != len(self._tokens):
            raise SigmaRuleError(f"unexpected {self._tokens[self._pos]!r} in {self._text!r}")
        return expr

    def _peek(self) -> str | None:
        return self._tokens[self._pos].lower() if self._pos < len(self._tokens) else None

    def _take(self) -> str:
        if self._pos >= len(self._tokens):
            raise SigmaRuleError(f"condition {self._text!r} ends early")
        self._pos += 1
        return self._tokens[self._pos - 1]

    def _or(self) -> Matcher:
        parts = [self._and()]
        while self._peek() == "or":
            self._take()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def _and(self) -> Matcher:
        parts = [self._not()]
        while self._peek() == "and":
            self._take()
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def _not(self) -> Matcher:
        if self._peek() == "not":
            self._take()
            inner = self._not()
            return lambda r: not inner(r)
        return self._atom()

    def _atom(self) -> Matcher:
        word = self._take()
        if word == "(":
            inner = self._or()
            if self._take() != ")":
                raise SigmaRuleError(f"missing ')' in {self._text!r}")
            return inner
        if word.lower() in ("1", "all", "any") and self._peek() == "of":
            self._take()
            targets = self._targets(self._take())
            if word.lower() == "all":
                return lambda r: all(t(r) for t in targets)
            return lambda r: any(t(r) for t in targets)
        if word in self._searches:
            return self._searches[word]
        raise SigmaRuleError(f"condition {self._text!r} names unknown search {word!r}")

    def _targets(self, pattern: str) -> list[Matcher]:
        if pattern == "them":
            names = [n for n in self._searches if not n.startswith("_")]
        else:
            rx = re.compile(_wildcard_regex(pattern))
            names = [n for n in self._searches if rx.fullmatch(n)]
        if not names:
            raise SigmaRuleError(f"{pattern!r} in {self._text!r} matches no search")
        return [self._searches[n] for n in names]


def compile_detection(detection: Mapping[str, Any]) -> Matcher:
    """A Sigma ``detection`` section as a predicate. Raises SigmaRuleError."""
    if "condition" not in detection:
        raise SigmaRuleError("detection has no condition")
    if "timeframe" in detection:
        raise SigmaRuleError("timeframe is not supported; use a correlation rule")
    searches = {
        str(name): _search_matcher(str(name), d)
        for name, d in detection.items()
        if name != "condition"
    }
    conditions = detection["condition"]
    if isinstance(conditions, str):
        conditions = [conditions]
    if not isinstance(conditions, list) or not conditions:
        raise SigmaRuleError("condition must be a string or a list of strings")
    parsed = [_ConditionParser(str(c), searches).parse() for c in conditions]
    return parsed[0] if len(parsed) == 1 else (lambda r: any(p(r) for p in parsed))


# ============================================================ rules


@dataclass(frozen=True)
class FirstSeen:
    """KeyLedger extension: fire only on a value never seen before for its group."""

    group_by: tuple[str, ...]
    field: str


@dataclass(frozen=True)
class Rule:
    """A Sigma detection rule, compiled."""

    id: str
    name: str | None
    title: str
    level: str
    matcher: Matcher = field(repr=False)
    first_seen: FirstSeen | None = None
    generate: bool = True  # False when a correlation uses it and does not ask for alerts


@dataclass(frozen=True)
class Correlation:
    """A Sigma v2 correlation rule (``event_count`` or ``value_count``), compiled."""

    id: str
    name: str | None
    title: str
    level: str
    type: str
    rules: tuple[str, ...]  # ids of the referenced rules
    group_by: tuple[str, ...]
    timespan: int  # seconds
    condition: tuple[tuple[str, int], ...]
    field: str | None = None


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    correlations: tuple[Correlation, ...]


_TIMESPAN = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_OPERATORS: dict[str, Callable[[int, int], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
}


def timespan_seconds(text: str) -> int:
    """``"5m"`` -> 300. Raises SigmaRuleError for another form."""
    m = _TIMESPAN.match(str(text).strip())
    if m is None:
        raise SigmaRuleError(f"unsupported timespan {text!r} (use e.g. 30s, 5m, 1h, 1d)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SigmaRuleError(f"{what} must be a string or a list of strings")


def _header(doc: Mapping[str, Any], source: str) -> tuple[str, str | None, str, str]:
    for required in ("title", "id"):
        if not isinstance(doc.get(required), str):
            raise SigmaRuleError(f"{source}: rule has no {required}")
    name = doc.get("name")
    return (
        doc["id"],
        name if isinstance(name, str) else None,
        doc["title"],
        str(doc.get("level", "medium")),
    )


def _compile_rule(doc: Mapping[str, Any], source: str) -> Rule:
    rule_id, name, title, level = _header(doc, source)
    logsource = doc.get("logsource")
    if not isinstance(logsource, Mapping) or any(
        logsource.get(k) != v for k, v in LOGSOURCE.items()
    ):
        raise SigmaRuleError(f"{source}: logsource must be product aws, service cloudtrail")
    detection = doc.get("detection")
    if not isinstance(detection, Mapping):
        raise SigmaRuleError(f"{source}: rule has no detection")
    try:
        matcher = compile_detection(detection)
    except SigmaRuleError as exc:
        raise SigmaRuleError(f"{source}: {exc}") from exc
    first_seen = None
    ext = doc.get(EXTENSION)
    if isinstance(ext, Mapping) and "first_seen" in ext:
        spec = ext["first_seen"]
        if not isinstance(spec, Mapping) or not isinstance(spec.get("field"), str):
            raise SigmaRuleError(f"{source}: first_seen needs group-by and field")
        first_seen = FirstSeen(_str_list(spec.get("group-by"), "group-by"), spec["field"])
    return Rule(rule_id, name, title, level, matcher, first_seen)


def _compile_correlation(
    doc: Mapping[str, Any], source: str, refs: Mapping[str, str]
) -> tuple[Correlation, bool]:
    rule_id, name, title, level = _header(doc, source)
    spec = doc["correlation"]
    if not isinstance(spec, Mapping):
        raise SigmaRuleError(f"{source}: correlation must be a map")
    kind = spec.get("type")
    if kind not in ("event_count", "value_count"):
        raise SigmaRuleError(f"{source}: correlation type {kind!r} is not supported")
    referenced = []
    for ref in _str_list(spec.get("rules"), "correlation rules"):
        if ref not in refs:
            raise SigmaRuleError(f"{source}: correlation refers to unknown rule {ref!r}")
        referenced.append(refs[ref])
    cond = spec.get("condition")
    if not isinstance(cond, Mapping) or not cond:
        raise SigmaRuleError(f"{source}: correlation needs a condition")
    condition = []
    value_field = None
    for op, bound in cond.items():
        if op == "field" and kind == "value_count":
            value_field = str(bound)
            continue
        if op not in _OPERATORS or not isinstance(bound, int) or isinstance(bound, bool):
            raise SigmaRuleError(f"{source}: unsupported correlation condition {op!r}")
        condition.append((str(op), bound))
    if kind == "value_count" and value_field is None:
        raise SigmaRuleError(f"{source}: value_count needs condition.field")
    group_by = _str_list(spec["group-by"], "group-by") if "group-by" in spec else ()
    correlation = Correlation(
        id=rule_id,
        name=name,
        title=title,
        level=level,
        type=str(kind),
        rules=tuple(referenced),
        group_by=group_by,
        timespan=timespan_seconds(spec.get("timespan", "")),
        condition=tuple(condition),
        field=value_field,
    )
    return correlation, bool(spec.get("generate", False))


def load_documents(documents: Iterable[tuple[str, Mapping[str, Any]]]) -> RuleSet:
    """Compile ``(source, document)`` pairs into a RuleSet. Raises SigmaRuleError."""
    rules: list[Rule] = []
    pending: list[tuple[str, Mapping[str, Any]]] = []
    seen_ids: set[str] = set()
    for source, doc in documents:
        if not isinstance(doc, Mapping):
            raise SigmaRuleError(f"{source}: a rule is a YAML map")
        if doc.get("id") in seen_ids:
            raise SigmaRuleError(f"{source}: duplicate rule id {doc.get('id')}")
        seen_ids.add(str(doc.get("id")))
        if "correlation" in doc:
            pending.append((source, doc))
        else:
            rules.append(_compile_rule(doc, source))
    refs = {r.id: r.id for r in rules} | {r.name: r.id for r in rules if r.name}
    correlations = []
    silenced: set[str] = set()
    for source, doc in pending:
        correlation, generate = _compile_correlation(doc, source, refs)
        correlations.append(correlation)
        if not generate:
            silenced.update(correlation.rules)
    rules = [
        Rule(r.id, r.name, r.title, r.level, r.matcher, r.first_seen, generate=False)
        if r.id in silenced
        else r
        for r in rules
    ]
    return RuleSet(tuple(rules), tuple(correlations))


def default_rules_dir() -> Path:
    """The rules shipped with KeyLedger (``consumers/rules``)."""
    return Path(str(importlib.resources.files("consumers") / "rules"))


def load_rules(directory: Path | None = None) -> RuleSet:
    """Every ``*.yml``/``*.yaml`` file in ``directory`` (default: the shipped rules), in
    name order; a file may hold several YAML documents.

    Raises SigmaRuleError for invalid or unsupported rules, OSError if unreadable.
    """
    folder = directory or default_rules_dir()
    files = sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
    if not files:
        raise SigmaRuleError(f"no rule files in {folder}")
    documents: list[tuple[str, Mapping[str, Any]]] = []
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            raise SigmaRuleError(f"{path.name}: not valid YAML: {exc}") from exc
        documents.extend((path.name, d) for d in docs if d is not None)
    return load_documents(documents)


# ============================================================ derived policy fields


def _account_of_principal(principal: str) -> str | None:
    """The account an AWS principal names: an ARN's account field or a bare account id."""
    if re.fullmatch(r"\d{12}", principal):
        return principal
    parts = principal.split(":")
    if len(parts) >= 6 and parts[0] == "arn":
        return parts[4] or None
    return None


def policy_fields(record: Mapping[str, Any]) -> JSON | None:
    """The derived ``keyledger`` fields for a record carrying a key policy, else None.

    Only Allow statements count. ``Principal: "*"``, ``{"AWS": "*"}``, an account
    wildcard (``arn:aws:iam::*:root``) and ``NotPrincipal`` in an Allow statement make
    the key open to anyone; conditions are not evaluated (a conditioned ``*`` still
    alerts). A policy that is not valid JSON gives no fields.
    """
    params = record.get("requestParameters")
    policy = params.get("policy") if isinstance(params, Mapping) else None
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except ValueError:
            return None
    if not isinstance(policy, Mapping):
        return None
    key_accounts = set(field_values(record, "resources.accountId")) or set(
        field_values(record, "recipientAccountId")
    )
    statements = policy.get("Statement")
    if isinstance(statements, Mapping):
        statements = [statements]
    open_to_anyone = False
    foreign: set[str] = set()
    for st in statements if isinstance(statements, list) else []:
        if not isinstance(st, Mapping) or st.get("Effect") != "Allow":
            continue
        if "NotPrincipal" in st:
            open_to_anyone = True
        principal = st.get("Principal")
        names: list[Any] = []
        if principal == "*":
            open_to_anyone = True
        elif isinstance(principal, Mapping):
            aws = principal.get("AWS")
            names = aws if isinstance(aws, list) else [aws]
        for name in names:
            if not isinstance(name, str):
                continue
            account = _account_of_principal(name)
            if name == "*" or (account is not None and "*" in account):
                open_to_anyone = True
            elif account is not None and account not in key_accounts:
                foreign.add(account)
    fields: JSON = {"policyOpenToAnyone": open_to_anyone}
    if foreign:
        fields["policyForeignAccounts"] = sorted(foreign)
    return fields


def enrich(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record with the derived ``keyledger`` fields added (a copy; input unchanged)."""
    fields = policy_fields(record)
    if fields is None:
        return record
    return {**record, EXTENSION: fields}


# ============================================================ the detector


@dataclass(frozen=True)
class Alert:
    """One alert: the rule and the identifying fields of the record that fired it."""

    rule_id: str
    rule_name: str | None
    title: str
    level: str
    seq: int
    record_hash: str
    event_id: str | None
    event_time: str | None
    event_name: str | None
    principal: str | None
    key_arn: str | None
    source_ip: str | None
    correlated_seqs: tuple[int, ...] = ()

    def to_json(self) -> JSON:
        out: JSON = {
            "rule": self.rule_id,
            "name": self.rule_name,
            "title": self.title,
            "level": self.level,
            "seq": self.seq,
            "recordHash": self.record_hash,
            "eventID": self.event_id,
            "eventTime": self.event_time,
            "eventName": self.event_name,
            "principal": self.principal,
            "keyArn": self.key_arn,
            "sourceIPAddress": self.source_ip,
        }
        if self.correlated_seqs:
            out["correlatedSeqs"] = list(self.correlated_seqs)
        return out


def epoch_seconds(event_time: str) -> int:
    """RFC 3339 ``eventTime`` to whole epoch seconds. Raises ValueError if malformed."""
    parsed = datetime.fromisoformat(event_time.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("eventTime has no UTC offset")
    return int(parsed.astimezone(UTC).timestamp())


def _first(record: Mapping[str, Any], path: str) -> Any:
    values = field_values(record, path)
    return values[0] if values else None


@dataclass
class _Window:
    events: deque[tuple[int, int, Any]] = field(default_factory=deque)  # (time, seq, value)


class Detector:
    """Evaluates a RuleSet over enveloped CloudTrail records, one at a time, in order.

    State (correlation windows, first-seen values) depends only on the records fed in
    and their order, so feeding the same records in the same order rebuilds it exactly.
    Correlation windows: an event at time ``t`` counts together with the group's events
    at ``t - timespan`` or later (inclusive); after a correlation fires, its group's
    window is cleared, so the next alert needs a fresh set of events. Not thread-safe.
    """

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules
        self._windows: dict[tuple[str, tuple[Any, ...]], _Window] = {}
        self._seen: dict[tuple[str, tuple[Any, ...]], set[Any]] = {}

    def process(self, envelope: Mapping[str, Any]) -> list[Alert]:
        """Alerts for one published record ``{"seq", "recordHash", "record", ...}``.

        Raises DetectionError if the envelope has no ``seq``, ``record`` or a valid
        ``eventTime``.
        """
        record = envelope.get("record")
        seq = envelope.get("seq")
        if not isinstance(record, Mapping) or not isinstance(seq, int):
            raise DetectionError("published record has no seq or record")
        try:
            when = epoch_seconds(str(record.get("eventTime")))
        except ValueError as exc:
            raise DetectionError(f"record {seq} has no valid eventTime") from exc
        view = enrich(record)
        alerts: list[Alert] = []
        matched: set[str] = set()
        for rule in self._rules.rules:
            if not rule.matcher(view):
                continue
            if rule.first_seen is not None and not self._first_seen(rule.first_seen, view):
                continue
            matched.add(rule.id)
            if rule.generate:
                alerts.append(self._alert(rule.id, rule.name, rule.title, rule.level, envelope))
        for corr in self._rules.correlations:
            if matched.intersection(corr.rules):
                alert = self._correlate(corr, view, envelope, seq, when)
                if alert is not None:
                    alerts.append(alert)
        self._learn(view)
        return alerts

    # -- first seen

    def _first_seen_key(self, spec: FirstSeen, record: Mapping[str, Any]) -> Any:
        group = tuple(_first(record, f) for f in spec.group_by)
        return ("|".join(spec.group_by) + "->" + spec.field, group)

    def _first_seen(self, spec: FirstSeen, record: Mapping[str, Any]) -> bool:
        value = _first(record, spec.field)
        key = self._first_seen_key(spec, record)
        if value is None or None in key[1]:
            return False
        seen = self._seen.get(key)
        return seen is not None and value not in seen  # no baseline yet: not "new"

    def _learn(self, record: Mapping[str, Any]) -> None:
        if record.get("errorCode") is not None:
            return
        for rule in self._rules.rules:
            spec = rule.first_seen
            if spec is None:
                continue
            value = _first(record, spec.field)
            key = self._first_seen_key(spec, record)
            if value is not None and None not in key[1]:
                self._seen.setdefault(key, set()).add(value)

    # -- correlations

    def _correlate(
        self,
        corr: Correlation,
        record: Mapping[str, Any],
        envelope: Mapping[str, Any],
        seq: int,
        when: int,
    ) -> Alert | None:
        group = tuple(_first(record, f) for f in corr.group_by)
        window = self._windows.setdefault((corr.id, group), _Window())
        value = _first(record, corr.field) if corr.field else None
        if corr.type == "value_count" and value is None:
            return None
        window.events.append((when, seq, value))
        while window.events and window.events[0][0] < when - corr.timespan:
            window.events.popleft()
        if corr.type == "event_count":
            count = len(window.events)
        else:
            count = len({v for _, _, v in window.events})
        if not all(_OPERATORS[op](count, bound) for op, bound in corr.condition):
            return None
        seqs = tuple(s for _, s, _ in window.events)
        window.events.clear()
        alert = self._alert(corr.id, corr.name, corr.title, corr.level, envelope)
        return replace(alert, correlated_seqs=seqs)

    @staticmethod
    def _alert(
        rule_id: str, name: str | None, title: str, level: str, envelope: Mapping[str, Any]
    ) -> Alert:
        record: Mapping[str, Any] = envelope["record"]
        return Alert(
            rule_id=rule_id,
            rule_name=name,
            title=title,
            level=level,
            seq=int(envelope["seq"]),
            record_hash=str(envelope.get("recordHash", "")),
            event_id=record.get("eventID"),
            event_time=record.get("eventTime"),
            event_name=record.get("eventName"),
            principal=_first(record, "userIdentity.arn")
            or _first(record, "userIdentity.invokedBy"),
            key_arn=_first(record, "resources.ARN"),
            source_ip=record.get("sourceIPAddress"),
        )


# ============================================================ the Kafka consumer


@dataclass(frozen=True)
class DetectResult:
    """What one :meth:`DetectionConsumer.run` did."""

    evaluated: int  # new records evaluated (alerts possible)
    replayed: int  # records below the committed offsets, replayed to rebuild state
    alerts: int  # alerts published and confirmed


@dataclass(order=True)
class _Pending:
    seq: int
    partition: int
    offset: int
    envelope: JSON = field(compare=False, repr=False)


class DetectionConsumer:
    """Runs a Detector over the audit topic and publishes alerts to the alerts topic.

    Ordering: records are evaluated in ledger ``seq`` order (a merge across partitions
    of the contiguous seqs the relay publishes), so correlation and first-seen results
    do not depend on how partitions interleave. That needs every partition, so the
    consumer assigns all of them itself and uses ``group`` only to store its committed
    offsets: run one instance per group.

    Restart: state is not persisted; on start the consumer re-reads the topic from the
    beginning and replays records below the committed offsets into the detector
    without alerting, which rebuilds the same state deterministically. Offsets are
    committed only after the alerts of the processed records are confirmed by the
    broker, up to the contiguous processed seq. A crash between the two re-emits those
    alerts (at least once; the pair rule id + eventID identifies duplicates).

    Connections open in :meth:`run`, never in the constructor. Not thread-safe.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        rules: RuleSet,
        topic: str = AUDIT_TOPIC,
        alerts_topic: str = ALERTS_TOPIC,
        group: str = DEFAULT_GROUP,
        on_alert: Callable[[Alert], None] | None = None,
        max_buffered: int = 10_000,
        timeout: float = 30.0,
    ) -> None:
        """Configure; opens no connection. ``on_alert`` is called for each alert after
        the broker confirmed it (the CLI prints it). Raises ValueError for a
        non-positive ``max_buffered``."""
        if max_buffered < 1:
            raise ValueError("max_buffered must be positive")
        self._bootstrap = bootstrap
        self._rules = rules
        self._topic = topic
        self._alerts_topic = alerts_topic
        self._group = group
        self._on_alert = on_alert
        self._max_buffered = max_buffered
        self._timeout = timeout

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> DetectResult:
        """Evaluate records and publish alerts; return what was done.

        With ``once``, stop after every partition is read to its end as of the start
        (records past a seq gap, e.g. a relay batch still landing, wait for the next
        run). Otherwise run until ``stop`` is set.

        Raises DetectionError for a malformed record (evaluation stops there rather than
        skip it) or, with ``once``, a topic that does not exist within ``timeout``;
        KafkaError when the broker fails.
        """
        self._ensure_alerts_topic()
        consumer = KafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id="keyledger-detect",
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,  # the relay creates it, with its partitions
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
            fetch_max_wait_ms=100,
        )
        producer = KafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id="keyledger-detect",
            enable_idempotence=True,
            acks="all",
            max_in_flight_requests_per_connection=1,
        )
        try:
            return self._run(consumer, producer, once=once, stop=stop or threading.Event())
        finally:
            producer.close(timeout=self._timeout)
            consumer.close()

    def run_forever(self, stop: threading.Event, *, max_backoff: float = 30.0) -> None:
        """:meth:`run` until ``stop`` is set; broker errors (KafkaError) are logged and
        retried with a capped backoff (each retry rebuilds state from the topic). Other
        exceptions (DetectionError, ...) propagate."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self.run(stop=stop)
                return
            except KafkaError as exc:
                log.warning(
                    "detect %s: broker error %s, retrying in %.1f s",
                    self._topic,
                    type(exc).__name__,
                    backoff,
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, max_backoff)

    def _partitions(
        self, consumer: KafkaConsumer, *, once: bool, stop: threading.Event
    ) -> list[TopicPartition]:
        """The topic's partitions; waits for the topic (for ``timeout`` when ``once``,
        else until ``stop``; then none). Raises DetectionError if it does not appear in
        time."""
        deadline = time.monotonic() + self._timeout
        while True:
            ids = consumer.partitions_for_topic(self._topic)
            if ids:
                return [TopicPartition(self._topic, p) for p in sorted(ids)]
            if stop.is_set():
                return []
            if once and time.monotonic() > deadline:
                raise DetectionError(f"topic {self._topic} does not exist")
            stop.wait(0.5)

    def _run(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        *,
        once: bool,
        stop: threading.Event,
    ) -> DetectResult:
        tps = self._partitions(consumer, once=once, stop=stop)
        if not tps:
            return DetectResult(evaluated=0, replayed=0, alerts=0)
        consumer.assign(tps)
        committed = {tp: consumer.committed(tp) or 0 for tp in tps}
        consumer.seek_to_beginning(*tps)
        begin = consumer.beginning_offsets(tps)
        end = consumer.end_offsets(tps)
        # The seq to start from is the smallest first seq of the non-empty partitions.
        awaiting_first = {tp for tp in tps if end.get(tp, 0) > begin.get(tp, 0)}
        first_seqs: list[int] = []
        next_seq: int | None = None if awaiting_first else 1
        detector = Detector(self._rules)
        heap: list[_Pending] = []
        buffered = dict.fromkeys(tps, 0)
        processed: dict[TopicPartition, int] = {}
        replayed = evaluated = published = 0
        by_partition = {tp.partition: tp for tp in tps}
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=200)
            for tp, messages in batch.items():
                for message in messages:
                    try:
                        envelope = orjson.loads(message.value)
                        seq = int(envelope["seq"])
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                        raise DetectionError(
                            f"{tp.topic}[{tp.partition}]@{message.offset} is not an audit record"
                        ) from exc
                    if tp in awaiting_first:
                        awaiting_first.discard(tp)
                        first_seqs.append(seq)
                    heapq.heappush(heap, _Pending(seq, tp.partition, message.offset, envelope))
                    buffered[tp] += 1
            if next_seq is None and not awaiting_first:
                next_seq = min(first_seqs)
            alerts: list[Alert] = []
            advanced = False
            while next_seq is not None and heap and heap[0].seq <= next_seq:
                item = heapq.heappop(heap)
                tp = by_partition[item.partition]
                buffered[tp] -= 1
                processed[tp] = item.offset
                advanced = True
                if item.seq < next_seq:  # a duplicate copy of a seq already evaluated
                    continue
                next_seq += 1
                found = detector.process(item.envelope)
                if item.offset < committed[tp]:
                    replayed += 1  # already alerted before the restart: state only
                else:
                    evaluated += 1
                    alerts.extend(found)
            if advanced:
                published += self._publish(producer, alerts)
                self._commit(consumer, processed, committed)
            for tp in tps:  # bound memory while waiting for a seq from another partition
                if buffered[tp] >= self._max_buffered:
                    consumer.pause(tp)
                else:
                    consumer.resume(tp)
            if once and self._at_end(consumer, tps):
                if heap:
                    log.warning(
                        "detect %s: %d record(s) wait for seq %s; left for the next run",
                        self._topic,
                        len(heap),
                        next_seq,
                    )
                break
        log.info("detect %s: replayed %d record(s) to rebuild state", self._topic, replayed)
        return DetectResult(evaluated=evaluated, replayed=replayed, alerts=published)

    @staticmethod
    def _at_end(consumer: KafkaConsumer, tps: list[TopicPartition]) -> bool:
        for tp in tps:
            highwater = consumer.highwater(tp)
            if highwater is None or consumer.position(tp) < highwater:
                return False
        return True

    def _publish(self, producer: KafkaProducer, alerts: list[Alert]) -> int:
        """Send, flush and confirm every alert; then hand each to ``on_alert``.

        Raises KafkaError if any send fails (nothing is committed then).
        """
        if not alerts:
            return 0
        futures = [
            producer.send(
                self._alerts_topic,
                key=a.rule_id.encode("utf-8"),
                value=orjson.dumps(a.to_json(), option=orjson.OPT_SORT_KEYS),
            )
            for a in alerts
        ]
        producer.flush(timeout=self._timeout)
        for future in futures:
            future.get(timeout=self._timeout)
        if self._on_alert is not None:
            for a in alerts:
                self._on_alert(a)
        return len(alerts)

    @staticmethod
    def _commit(
        consumer: KafkaConsumer,
        processed: Mapping[TopicPartition, int],
        committed: dict[TopicPartition, int],
    ) -> None:
        offsets = {
            tp: OffsetAndMetadata(offset + 1, "", -1)
            for tp, offset in processed.items()
            if offset + 1 > committed[tp]
        }
        if offsets:
            consumer.commit(offsets)
            for tp, meta in offsets.items():
                committed[tp] = meta.offset

    def _ensure_alerts_topic(self) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self._bootstrap, client_id="keyledger-detect")
        try:
            if self._alerts_topic not in set(admin.list_topics()):
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(self._alerts_topic, 1, 1)])
        finally:
            admin.close()


def alert_line(alert: Alert) -> str:
    """The alert as one compact JSON line (what the console shows)."""
    return orjson.dumps(alert.to_json(), option=orjson.OPT_SORT_KEYS).decode()
