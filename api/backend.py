"""What the HTTP API calls: the KeyLedger service plus the account-wide list operations
that the key catalog projection answers (ListKeys, ListAliases, ListRetirableGrants).

Every list call is authorized (identity side: ``kms:ListKeys`` ...) and a refusal is
recorded, as for any other operation; the catalog is caught up before it answers.
"""

from __future__ import annotations

from typing import Any

from ledger.errors import KeyLedgerError
from ledger.service import Caller, KeyLedger
from projections.catalog import KeyCatalog

JSON = dict[str, Any]


class KmsBackend:
    """Delegates every operation to the ledger; adds the catalog-backed list calls."""

    def __init__(self, ledger: KeyLedger) -> None:
        self.ledger = ledger
        self.catalog = KeyCatalog(ledger.db)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)

    def _listing(self, operation: str, caller: Caller, request: JSON) -> str:
        """Authorize, catch the catalog up, return the caller's ARN prefix.

        Raises AccessDeniedError (recorded)."""
        self.ledger.authorize_listing(caller=caller, operation=operation, request=request)
        self.catalog.catch_up()
        account, region = self.ledger.scope_of(caller)
        return f"arn:aws:kms:{region}:{account}:"

    def list_keys(self, *, caller: Caller, limit: int | None = None, marker: str | None = None
                  ) -> JSON:  # fmt: skip
        """ListKeys of the caller's account and region."""
        prefix = self._listing("ListKeys", caller, {"limit": limit, "marker": marker})
        return self._recorded(
            "ListKeys", caller, {"limit": limit},
            lambda: self.catalog.list_keys(limit=limit, marker=marker, arn_prefix=prefix),
        )  # fmt: skip

    def list_aliases(
        self,
        *,
        caller: Caller,
        key_id: str | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> JSON:
        """ListAliases of the caller's account and region, all or of one key."""
        request: JSON = {"limit": limit}
        if key_id is not None:
            request["keyId"] = key_id
        prefix = self._listing("ListAliases", caller, request)

        def answer() -> JSON:
            key_uuid = None
            if key_id is not None:
                key_uuid = self.ledger.resolve_key_id_as(caller, key_id, "ListAliases")
            return self.catalog.list_aliases(
                key_uuid=key_uuid, limit=limit, marker=marker, arn_prefix=prefix
            )

        return self._recorded("ListAliases", caller, request, answer)

    def list_retirable_grants(
        self,
        *,
        caller: Caller,
        retiring_principal: str,
        limit: int | None = None,
        marker: str | None = None,
    ) -> JSON:
        """ListRetirableGrants for one retiring principal."""
        request: JSON = {"retiringPrincipal": retiring_principal, "limit": limit}
        self._listing("ListRetirableGrants", caller, request)
        return self._recorded(
            "ListRetirableGrants", caller, request,
            lambda: self.catalog.list_retirable_grants(
                retiring_principal=retiring_principal, limit=limit, marker=marker
            ),
        )  # fmt: skip

    def _recorded(self, operation: str, caller: Caller, request: JSON, fn: Any) -> JSON:
        try:
            result: JSON = fn()
        except KeyLedgerError as err:
            self.ledger.record_rejected(
                operation=operation, caller=caller, request=request, error=err
            )
            raise
        return result
