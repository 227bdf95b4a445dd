"""``keyledger maintenance run``: everything due at the ledger clock's now.

The catalog finds candidate keys; the service re-checks each against its write model
and records service events (RotateKey, DeleteKey), so a stale catalog never causes a
wrong action.
"""

from __future__ import annotations

from ledger.service import KeyLedger
from projections.catalog import KeyCatalog


def run_maintenance(ledger: KeyLedger, catalog: KeyCatalog) -> list[tuple[str, str]]:
    """Perform due automatic rotations and deletions; return ``(event name, key ARN)``.

    Raises LedgerUnavailableError or HsmError; work already recorded stays recorded.
    """
    done: list[tuple[str, str]] = []
    for key_uuid in catalog.due_keys(ledger.clock.now()):
        for name in ledger.perform_due(key_uuid):
            done.append((name, ledger.settings.key_arn(str(key_uuid))))
    return done
