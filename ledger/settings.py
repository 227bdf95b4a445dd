"""Configuration from ``KEYLEDGER_*`` environment variables (CLI flags override).

Security: the HSM PIN is read from the environment or from the 0600 PIN file in the
data dir; it is never logged and ``Settings.__repr__`` hides it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN_LABEL = "keyledger"  # noqa: S105 - a label, not a secret
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "111122223333"


def default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("KEYLEDGER_DATA_DIR"):
        return Path(env["KEYLEDGER_DATA_DIR"])
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "keyledger"


@dataclass(frozen=True)
class Settings:
    """Everything the composition root needs to wire a ledger.

    ``pkcs11_module`` None means the embedded SoftHSM2 token in the data dir.
    ``database_url`` None means the SQLite file in the data dir.
    """

    data_dir: Path
    database_url: str | None = None
    pkcs11_module: str | None = None
    hsm_token: str = DEFAULT_TOKEN_LABEL
    hsm_pin: str | None = field(default=None, repr=False)
    kafka_bootstrap: str | None = None
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT
    principal: str | None = None
    on_demand_rotation_limit: int = 25
    checkpoint_every_seconds: int = 300
    checkpoint_every_events: int = 10_000
    checkpoint_heartbeat_seconds: int = 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``KEYLEDGER_*`` variables; keyword overrides that are not None win."""
        e = os.environ if env is None else env
        s = cls(
            data_dir=default_data_dir(e),
            database_url=e.get("KEYLEDGER_DATABASE_URL") or None,
            pkcs11_module=e.get("KEYLEDGER_PKCS11_MODULE") or None,
            hsm_token=e.get("KEYLEDGER_HSM_TOKEN") or DEFAULT_TOKEN_LABEL,
            hsm_pin=e.get("KEYLEDGER_HSM_PIN") or None,
            kafka_bootstrap=e.get("KEYLEDGER_KAFKA_BOOTSTRAP") or None,
            region=e.get("KEYLEDGER_REGION") or DEFAULT_REGION,
            account_id=e.get("KEYLEDGER_ACCOUNT_ID") or DEFAULT_ACCOUNT,
            principal=e.get("KEYLEDGER_PRINCIPAL") or None,
            on_demand_rotation_limit=int(e.get("KEYLEDGER_ON_DEMAND_ROTATION_LIMIT") or 25),
            checkpoint_every_seconds=int(e.get("KEYLEDGER_CHECKPOINT_EVERY_SECONDS") or 300),
            checkpoint_every_events=int(e.get("KEYLEDGER_CHECKPOINT_EVERY_EVENTS") or 10_000),
            checkpoint_heartbeat_seconds=int(
                e.get("KEYLEDGER_CHECKPOINT_HEARTBEAT_SECONDS") or 3600
            ),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "data_dir" in given:
            given["data_dir"] = Path(str(given["data_dir"]))
        return replace(s, **given)  # type: ignore[arg-type]

    @property
    def uses_embedded_hsm(self) -> bool:
        return self.pkcs11_module is None

    @property
    def caller_arn(self) -> str:
        """The principal recorded for local (CLI/library) callers."""
        if self.principal:
            return self.principal
        return f"arn:aws:iam::{self.account_id}:root"

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"
