"""Write a realistic ledger through the real service: keys, principals, 30 days of use,
lifecycle changes, rotations, a few percent failures and denied attempts.

    python bench/generate.py --events 100000 [--data-dir DIR | --database-url URL]
        [--keys 100] [--principals 50] [--days 30] [--seed 7]

The ledger uses the data dir's SoftHSM2 token (created on first use) and a clock that
moves from ``--start`` over ``--days`` as events are written. ``generate()`` is what
the tests call, on a small size.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger.clock import FixedClock
from ledger.errors import KeyLedgerError
from ledger.service import Caller, KeyLedger

ACCOUNT = "111122223333"
ROOT = Caller(principal=f"arn:aws:iam::{ACCOUNT}:root", source_ip="10.0.0.1")
START = datetime(2026, 10, 1, tzinfo=UTC)
ALLOW_ALL = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
    }
)
AGENTS = ["aws-cli/2.17.0", "Boto3/1.35.0 Python/3.11", "aws-sdk-java/2.25", "terraform/1.9"]


class Generator:
    """Drives a KeyLedger with a moving clock; counts what it wrote."""

    def __init__(
        self, ledger: KeyLedger, clock: FixedClock, *, seed: int, events: int, days: int
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.seed = seed
        self._local = threading.local()
        self._local.rng = random.Random(seed)
        self._clock_lock = threading.Lock()
        self.target = events
        self.step = timedelta(days=days) / max(events, 1)
        self.keys: list[str] = []  # key ARNs
        self.sign_keys: list[str] = []
        self.aliases: dict[str, str] = {}
        self.principals: list[Caller] = []
        self.blobs: list[tuple[bytes, dict[str, str], str]] = []  # blob, context, key ARN
        self.grants: list[tuple[str, str]] = []
        self.failures = 0
        # About 10 keys stay pending deletion over the run, whatever its size (a fixed
        # share of scheduled deletions would leave hundreds at a million events).
        scheduled = events * 0.01 * 0.10
        self.stay_pending = min(0.2, 10 / max(scheduled, 1.0))

    @property
    def rng(self) -> random.Random:
        """This thread's random source (the main thread's is seeded with ``seed``)."""
        rng: random.Random | None = getattr(self._local, "rng", None)
        if rng is None:
            rng = self._local.rng = random.Random(f"{self.seed}-{threading.get_ident()}")
        return rng

    def written(self) -> int:
        return self.ledger.db.head_seq()

    def tick(self) -> None:
        step = self.step * self.rng.uniform(0.5, 1.5)
        with self._clock_lock:
            self.clock.advance(step)

    def call(self, fn: Any, *, burst: bool = False, **kwargs: Any) -> Any:
        if burst:  # calls in quick succession
            step = timedelta(seconds=self.rng.uniform(0.5, 5))
            with self._clock_lock:
                self.clock.advance(step)
        else:
            self.tick()
        try:
            return fn(**kwargs)
        except KeyLedgerError:
            self.failures += 1
            return None

    def setup(self, n_keys: int, n_principals: int) -> None:
        for i in range(n_principals):
            name = f"user-{i:02d}"
            self.call(self.ledger.create_principal, caller=ROOT, name=name)
            if i % 5 != 4:  # one in five has no identity policy: denied
                self.call(
                    self.ledger.attach_principal_policy,
                    caller=ROOT,
                    name=name,
                    policy_name="kms-all",
                    policy=ALLOW_ALL,
                )
            ips = [f"10.{i}.{j}.{j + 1}" for j in range(2)]
            self.principals.append(
                Caller(
                    principal=f"arn:aws:iam::{ACCOUNT}:user/{name}",
                    source_ip=ips[0],
                    user_agent=AGENTS[i % len(AGENTS)],
                )
            )
        for i in range(n_keys):
            if i % 10 == 9:
                md = self.call(
                    self.ledger.create_key,
                    caller=ROOT,
                    description=f"signing {i}",
                    key_usage="SIGN_VERIFY",
                    key_spec="ECC_NIST_P256",
                )
                if md:
                    self.sign_keys.append(md["KeyMetadata"]["Arn"])
                continue
            md = self.call(self.ledger.create_key, caller=ROOT, description=f"app {i}")
            if md is None:
                continue
            arn = md["KeyMetadata"]["Arn"]
            self.keys.append(arn)
            alias = f"alias/app-{i:03d}"
            self.call(self.ledger.create_alias, caller=ROOT, alias_name=alias, target_key_id=arn)
            self.aliases[alias] = arn
            if i % 3 == 0:
                self.call(self.ledger.enable_key_rotation, caller=ROOT, key_id=arn)

    def retire_key(self, arn: str) -> None:
        """Stop using a key (disabled or pending deletion); its aliases are dropped."""
        self.keys.remove(arn)
        self.aliases = {a: k for a, k in self.aliases.items() if k != arn}
        # Its ciphertexts are still tried now and then (the pending-deletion check sees
        # them), but most are dropped from the pool.
        mine = [b for b in self.blobs if b[2] == arn]
        self.blobs = [b for b in self.blobs if b[2] != arn] + mine[:1]

    def add_key(self, i: int) -> None:
        md = self.call(self.ledger.create_key, caller=ROOT, description=f"app {i}")
        if md is None:
            return
        arn = md["KeyMetadata"]["Arn"]
        self.keys.append(arn)
        alias = f"alias/app-{i:03d}"
        if alias not in self.aliases:
            self.call(self.ledger.create_alias, caller=ROOT, alias_name=alias, target_key_id=arn)
            self.aliases[alias] = arn

    def who(self) -> Caller:
        # Principals without an identity policy (every fifth) call rarely: denied.
        if self.rng.random() < 0.02:
            c = self.rng.choice(self.principals[4::5])
        else:
            c = self.rng.choice([p for i, p in enumerate(self.principals) if i % 5 != 4])
        rare = self.rng.random() < 0.01  # a rare new source
        ip = f"203.0.113.{self.rng.randrange(1, 255)}" if rare else c.source_ip
        return Caller(principal=c.principal, source_ip=ip, user_agent=c.user_agent)

    def key_ref(self) -> str:
        arn = self.rng.choice(self.keys)
        r = self.rng.random()
        if r < 0.3:
            aliases = [a for a, k in self.aliases.items() if k == arn]
            if aliases:
                return aliases[0]
        if r < 0.6:
            return arn.rsplit("/", 1)[1]
        return arn

    def context(self) -> dict[str, str]:
        return {
            "app": f"app-{self.rng.randrange(20)}",
            "tenant": f"t{self.rng.randrange(50)}",
        }

    def use(self) -> None:
        r = self.rng.random()
        caller = self.who()
        if r < 0.35:
            ctx = self.context()
            out = self.call(
                self.ledger.encrypt,
                caller=caller,
                key_id=self.key_ref(),
                plaintext=b"payload",
                encryption_context=ctx,
            )
            if out and len(self.blobs) < 200:
                self.blobs.append((out["CiphertextBlob"], ctx, out["KeyId"]))
            elif out:  # the pool stays fresh: new ciphertexts replace old ones
                pool = self.blobs  # retire_key swaps in a new list, never shrinks this one
                pool[self.rng.randrange(len(pool))] = (out["CiphertextBlob"], ctx, out["KeyId"])
        elif r < 0.6 and self.blobs:
            blob, ctx, _ = self.rng.choice(self.blobs)
            if self.rng.random() < 0.02:
                ctx = {**ctx, "app": "wrong"}  # InvalidCiphertextException
            self.call(
                self.ledger.decrypt, caller=caller, ciphertext_blob=blob, encryption_context=ctx
            )
        elif r < 0.63 and self.blobs:
            blob, ctx, _ = self.rng.choice(self.blobs)
            self.call(
                self.ledger.re_encrypt,
                caller=caller,
                ciphertext_blob=blob,
                source_encryption_context=ctx,
                destination_key_id=self.key_ref(),
                destination_encryption_context=self.context(),
            )
        elif r < 0.85:
            self.call(
                self.ledger.generate_data_key,
                caller=caller,
                key_id=self.key_ref(),
                key_spec="AES_256",
                encryption_context=self.context(),
            )
        elif r < 0.93 and self.sign_keys:
            self.call(
                self.ledger.sign,
                caller=caller,
                key_id=self.rng.choice(self.sign_keys),
                message=b"digest me",
                signing_algorithm="ECDSA_SHA_256",
            )
        elif r < 0.97:
            self.call(self.ledger.describe_key, caller=caller, key_id=self.key_ref())
        else:  # an unknown key id or alias
            unknown = self.rng.choice(["alias/nope", "00000000-1111-4222-8333-444444444444"])
            self.call(self.ledger.encrypt, caller=caller, key_id=unknown, plaintext=b"x")

    def lifecycle(self) -> None:
        arn = self.rng.choice(self.keys)
        r = self.rng.random()
        if r < 0.25:
            self.call(self.ledger.disable_key, caller=ROOT, key_id=arn)
            self.call(self.ledger.encrypt, caller=self.who(), key_id=arn, plaintext=b"x")
            self.call(self.ledger.enable_key, caller=ROOT, key_id=arn)
        elif r < 0.45:
            self.call(self.ledger.rotate_key_on_demand, caller=ROOT, key_id=arn)
        elif r < 0.6:
            alias = self.rng.choice(sorted(self.aliases))
            out = self.call(
                self.ledger.update_alias, caller=ROOT, alias_name=alias, target_key_id=arn
            )
            if out is not None:
                self.aliases[alias] = arn
        elif r < 0.75:
            g = self.call(
                self.ledger.create_grant,
                caller=ROOT,
                key_id=arn,
                grantee_principal=self.rng.choice(self.principals).principal,
                operations=["Encrypt", "Decrypt"],
            )
            if g:
                self.grants.append((arn, g["GrantId"]))
        elif r < 0.85 and self.grants:
            key, gid = self.grants.pop(self.rng.randrange(len(self.grants)))
            self.call(self.ledger.revoke_grant, caller=ROOT, key_id=key, grant_id=gid)
        elif r < 0.95:
            self.call(self.ledger.schedule_key_deletion, caller=ROOT, key_id=arn)
            for _ in range(self.rng.randrange(1, 3)):  # someone still uses it
                self.call(self.ledger.encrypt, caller=self.who(), key_id=arn, plaintext=b"x")
            if self.rng.random() >= self.stay_pending or len(self.keys) <= 10:
                self.call(self.ledger.cancel_key_deletion, caller=ROOT, key_id=arn)
                self.call(self.ledger.enable_key, caller=ROOT, key_id=arn)
            else:  # it stays pending deletion: a new key takes its place
                self.retire_key(arn)
                self.add_key(len(self.keys) + len(self.aliases))
        else:  # a denied burst from one principal without a policy
            denied = [p for i, p in enumerate(self.principals) if i % 5 == 4]
            p = self.rng.choice(denied)
            for _ in range(6):
                self.call(self.ledger.encrypt, caller=p, key_id=arn, plaintext=b"x", burst=True)

    def wind_down(self) -> None:
        """Near the end: some keys disabled, some scheduled for deletion, and callers
        that still try them; one denied burst."""
        n = max(1, len(self.keys) // 50)
        picked = self.rng.sample(self.keys, min(len(self.keys), 2 * n))
        for i, arn in enumerate(picked):
            if i < n:
                self.call(self.ledger.disable_key, caller=ROOT, key_id=arn)
            else:
                self.call(self.ledger.schedule_key_deletion, caller=ROOT, key_id=arn)
            for _ in range(3):
                self.call(self.ledger.encrypt, caller=self.who(), key_id=arn, plaintext=b"x")
        for arn in picked:  # no more use of these keys
            self.retire_key(arn)
        key = self.keys[0]
        for end in ("retire", "revoke", None):  # grants that end each way, and one that stays
            g = self.call(
                self.ledger.create_grant,
                caller=ROOT,
                key_id=key,
                grantee_principal=self.principals[0].principal,
                retiring_principal=ROOT.principal,
                operations=["Decrypt"],
            )
            if g and end == "retire":
                self.call(self.ledger.retire_grant, caller=ROOT, key_id=key, grant_id=g["GrantId"])
            elif g and end == "revoke":
                self.call(self.ledger.revoke_grant, caller=ROOT, key_id=key, grant_id=g["GrantId"])
        denied = self.rng.choice(self.principals[4::5])
        for _ in range(6):
            self.call(
                self.ledger.encrypt, caller=denied, key_id=self.keys[0], plaintext=b"x", burst=True
            )

    def _loop(self, until: int) -> None:
        while self.written() < until:
            if self.rng.random() < 0.01:
                self.lifecycle()
            else:
                self.use()

    def run(self, threads: int = 1) -> int:
        """Write until the target; with ``threads`` > 1 the bulk is written by that many
        threads at once (the ledger's group commit), so the order is not reproducible."""
        bulk = int(self.target * 0.97)
        if threads <= 1:
            self._loop(bulk)
        else:
            workers = [
                threading.Thread(target=self._loop, args=(bulk,), daemon=True)
                for _ in range(threads)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        self.wind_down()
        self._loop(self.target)
        return self.written()


def generate(
    ledger: KeyLedger,
    clock: FixedClock,
    *,
    events: int,
    keys: int = 100,
    principals: int = 50,
    days: int = 30,
    seed: int = 7,
    threads: int = 1,
) -> Generator:
    """Fill ``ledger`` (whose clock is ``clock``) up to about ``events`` records."""
    gen = Generator(ledger, clock, seed=seed, events=events, days=days)
    gen.setup(keys, principals)
    gen.run(threads)
    return gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--principals", type=int, default=50)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="Writers at once (faster).")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    from ledger.bootstrap import open_ledger
    from ledger.settings import Settings

    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.database_url:
        overrides["database_url"] = args.database_url
    settings = Settings.from_env(**overrides)
    clock = FixedClock(START)
    ledger = open_ledger(settings, clock=clock)
    try:
        t0 = time.perf_counter()
        gen = generate(
            ledger,
            clock,
            events=args.events,
            keys=args.keys,
            principals=args.principals,
            days=args.days,
            seed=args.seed,
            threads=args.threads,
        )
        dt = time.perf_counter() - t0
        n = gen.written()
        print(
            f"wrote {n:,} events in {dt:.1f} s ({n / dt:,.0f}/s): {len(gen.keys)} keys, "
            f"{len(gen.sign_keys)} signing keys, {len(gen.principals)} principals, "
            f"{gen.failures:,} failed or denied calls; clock now {clock.now().isoformat()}"
        )
    finally:
        ledger.close()


if __name__ == "__main__":
    main()
