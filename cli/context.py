"""Lazily opened resources for one CLI invocation (nothing opens at import time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from ledger.keystore.port import MaterialRef
from ledger.settings import Settings

if TYPE_CHECKING:
    from ledger.clock import Clock
    from ledger.service import Caller, KeyLedger
    from projections.catalog import KeyCatalog

USER_AGENT = "keyledger-cli/0.1.0"


@dataclass
class CliContext:
    settings: Settings
    json_output: bool = False
    clock: Clock | None = None  # set before first use to fix the ledger's time
    as_principal: str | None = None  # --as NAME: act as that principal, not the root
    _ledger: KeyLedger | None = field(default=None, repr=False)
    _catalog: KeyCatalog | None = field(default=None, repr=False)

    @property
    def ledger(self) -> KeyLedger:
        if self._ledger is None:
            from ledger.bootstrap import open_ledger

            self._ledger = open_ledger(self.settings, clock=self.clock)
        return self._ledger

    @property
    def ledger_without_hsm(self) -> KeyLedger:
        """The ledger for read-only audit commands: the HSM is not opened."""
        if self._ledger is None:
            from ledger.bootstrap import ledger_env
            from ledger.service import KeyLedger

            self._ledger = KeyLedger(
                settings=self.settings,
                keystore=_NoKeyStore(),
                env=ledger_env(self.settings),
                clock=self.clock,
            )
        return self._ledger

    @property
    def catalog(self) -> KeyCatalog:
        if self._catalog is None:
            from projections.catalog import KeyCatalog

            self._catalog = KeyCatalog(self.ledger_without_hsm.db)
        return self._catalog

    @property
    def caller(self) -> Caller:
        """The CLI's principal: the account root, or ``--as NAME`` (which must exist and
        be enabled; raises NotFoundError / AccessDeniedError otherwise)."""
        from ledger.service import Caller

        if self.as_principal:
            from ledger.errors import AccessDeniedError

            doc = (
                self.ledger_without_hsm.describe_principal(
                    name=self.as_principal, account=self.settings.account_id
                )
                if self._ledger is None
                else self._ledger.describe_principal(
                    name=self.as_principal, account=self.settings.account_id
                )
            )
            if not doc["Enabled"]:
                raise AccessDeniedError(f"The principal {doc['Arn']} is disabled.")
            return Caller(principal=doc["Arn"], user_agent=USER_AGENT)
        return Caller(principal=self.settings.caller_arn, user_agent=USER_AGENT)

    def admin_caller(self, account: str | None) -> Caller:
        """For principal management: the target account's root unless ``--as``."""
        from ledger.domain.principals import root_arn
        from ledger.service import Caller

        if self.as_principal:
            return self.caller
        return Caller(
            principal=root_arn(account or self.settings.account_id), user_agent=USER_AGENT
        )

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.keystore.close()
            self._ledger.close()


class _NoKeyStore:
    """Stands in for the HSM in commands that never use key material."""

    def _refuse(self) -> NoReturn:
        from ledger.errors import HsmError

        raise HsmError("This command does not open the HSM.")

    def generate_symmetric_key(self, kek: str | None = None) -> MaterialRef:
        self._refuse()

    def destroy_kek(self, kek: str) -> None:
        self._refuse()

    def generate_random(self, number_of_bytes: int) -> bytes:
        self._refuse()

    def generate_hmac_key(self, key_spec: str, kek: str) -> MaterialRef:
        self._refuse()

    def generate_mac(self, material: MaterialRef, mac_algorithm: str, message: bytes) -> bytes:
        self._refuse()

    def generate_key_pair(
        self, key_spec: str, kek: str, key_usage: str = "SIGN_VERIFY"
    ) -> tuple[MaterialRef, bytes]:
        self._refuse()

    def decrypt_rsa(
        self, material: MaterialRef, encryption_algorithm: str, ciphertext: bytes
    ) -> bytes:
        self._refuse()

    def derive_shared_secret(self, material: MaterialRef, peer_public_key_der: bytes) -> bytes:
        self._refuse()

    def sign(self, material: MaterialRef, signing_algorithm: str, digest: bytes) -> bytes:
        self._refuse()

    def generate_data_key_pair(self, key_pair_spec: str) -> tuple[bytes, bytes]:
        self._refuse()

    def generate_ledger_signing_key(self, label: str) -> bytes:
        self._refuse()

    def ledger_public_key(self, label: str) -> bytes:
        self._refuse()

    def ledger_sign(self, label: str, message: bytes) -> bytes:
        self._refuse()

    def destroy_ledger_signing_key(self, label: str) -> None:
        self._refuse()

    def new_import_wrapping_key(self, wrapping_key_spec: str) -> tuple[MaterialRef, bytes]:
        self._refuse()

    def import_key_material(
        self,
        wrapping: MaterialRef,
        wrapping_algorithm: str,
        encrypted_key_material: bytes,
        kind: str,
        kek: str,
    ) -> MaterialRef:
        self._refuse()

    def encrypt(self, material: MaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        self._refuse()

    def decrypt(self, material: MaterialRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        self._refuse()

    def forget(self, material_id: str) -> None:
        pass

    def close(self) -> None:
        pass
