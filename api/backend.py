"""What the HTTP API calls: the KeyLedger service plus the account-wide list operations
that the key catalog projection answers (ListKeys, ListAliases, ListRetirableGrants).

Every list call is authorized (identity side: ``kms:ListKeys`` ...) and recorded, a
success as a read-only call and a refusal or failure with its error code, as for any
other operation; the catalog is caught up before it answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ledger.service import Caller, KeyLedger
from projections.catalog import KeyCatalog

if TYPE_CHECKING:
    from projections.usage import UsageIndex

JSON = dict[str, Any]


class KmsBackend:
    """Delegates every operation to the ledger; adds the catalog-backed list calls."""

    def __init__(self, ledger: KeyLedger) -> None:
        self.ledger = ledger
        self.catalog = KeyCatalog(ledger.db)
        self._usage: UsageIndex | None = None
        self._usage_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)

    def _listing(
        self, operation: str, caller: Caller, request: JSON, answer: Callable[[str], JSON]
    ) -> JSON:
        """Authorize, catch the catalog up, answer with ``answer(arn_prefix)`` and record
        the call (a success as a read-only call).

        Raises AccessDeniedError and the catalog's KeyLedgerErrors (recorded)."""
        account, region = self.ledger.scope_of(caller)
        prefix = f"arn:aws:kms:{region}:{account}:"

        def run() -> JSON:
            self.catalog.catch_up()
            return answer(prefix)

        out: JSON = self.ledger.run_read(
            caller=caller, operation=operation, request=request, answer=run
        )
        return out

    def list_keys(self, *, caller: Caller, limit: int | None = None, marker: str | None = None
                  ) -> JSON:  # fmt: skip
        """ListKeys of the caller's account and region."""
        return self._listing(
            "ListKeys", caller, {"limit": limit, "marker": marker},
            lambda prefix: self.catalog.list_keys(limit=limit, marker=marker, arn_prefix=prefix),
        )  # fmt: skip

    def list_aliases(
        self,
        *,
        caller: Caller,
        key_id: str | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> JSON:
        """ListAliases of the caller's account and region, all or of one key.

        Raises AccessDeniedError, NotFoundError (an unknown or deleted key),
        InvalidMarkerError (all recorded)."""

        def answer(prefix: str) -> JSON:
            key_uuid = None
            if key_id is not None:  # a key of the caller's account that exists
                key_uuid = self.ledger.resolve_key_id(key_id)
                self.ledger.load_key(key_uuid)  # NotFoundError, as AWS answers
            return self.catalog.list_aliases(
                key_uuid=key_uuid, limit=limit, marker=marker, arn_prefix=prefix
            )

        request: JSON = {"keyId": key_id, "limit": limit, "marker": marker}
        return self._listing("ListAliases", caller, request, answer)

    def list_retirable_grants(
        self,
        *,
        caller: Caller,
        retiring_principal: str,
        limit: int | None = None,
        marker: str | None = None,
    ) -> JSON:
        """ListRetirableGrants for one retiring principal."""
        request: JSON = {"retiringPrincipal": retiring_principal, "limit": limit, "marker": marker}
        return self._listing(
            "ListRetirableGrants", caller, request,
            lambda _prefix: self.catalog.list_retirable_grants(
                retiring_principal=retiring_principal, limit=limit, marker=marker
            ),
        )  # fmt: skip

    def get_key_last_usage(self, *, caller: Caller, key_id: str) -> JSON:
        """GetKeyLastUsage, answered by the usage index (caught up first, in this
        process: a threaded server never forks decode workers).

        Raises NotFoundError, AccessDeniedError (recorded)."""
        from consumers.cloudtrail import event_id

        def last_used(key_arn: str) -> JSON | None:
            row = self._usage_index().last_used(key_arn, workers=0)
            if row is None:
                return None
            return {
                "Operation": row["operation"],
                "Timestamp": datetime.fromisoformat(row["time"]),
                "CloudTrailEventId": event_id(self.ledger.ledger_id, int(row["seq"])),
                "KmsRequestId": row["request_id"],
            }

        out: JSON = self.ledger.key_last_usage(caller=caller, key_id=key_id, last_used=last_used)
        return out

    def _usage_index(self) -> UsageIndex:
        """The usage index, opened at the first call that needs it (its tables are made
        then, not at start-up)."""
        with self._usage_lock:
            if self._usage is None:
                from projections.usage import UsageIndex

                self._usage = UsageIndex(self.ledger.db)
            return self._usage
