"""In-memory fakes that implement the ports, for unit tests of the service (no I/O)."""

from __future__ import annotations

import hashlib
import os
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from ledger.errors import HsmError, InvalidCiphertextError
from ledger.keystore.port import MaterialRef

IV_LEN = 12
TAG_LEN = 16
KEK_LABEL_PREFIX = "keyledger-kek-"
KEK_LABEL_MAX_LEN = 128


def check_kek_label(kek: object) -> str:
    """The same rule as the PKCS#11 adapter's: printable ASCII, <= 128 characters,
    ``keyledger-kek-`` followed by at least one character; else HsmError."""
    if (
        not isinstance(kek, str)
        or len(kek) > KEK_LABEL_MAX_LEN
        or len(kek) <= len(KEK_LABEL_PREFIX)
        or not kek.startswith(KEK_LABEL_PREFIX)
        or not (kek.isascii() and kek.isprintable())
    ):
        raise HsmError("invalid KEK label")
    return kek


class FakeKeyStore:
    """KeyStore with ``cryptography``: a random in-memory domain key and one random
    in-memory KEK per label, RFC 5649 wrapping.

    Same contract and errors as ``Pkcs11KeyStore``: ``generate_symmetric_key(kek)``
    creates a missing KEK (also after ``destroy_kek``); using material whose KEK was
    destroyed raises HsmError("key material was destroyed"); ``destroy_kek`` also
    evicts the cached keys unwrapped under it. ``fail_next`` makes the next call raise
    HsmError, to test how the service handles an HSM failure. ``keks`` lists the
    labels of the KEKs that exist.
    """

    def __init__(self) -> None:
        self._domain_key = AESGCM.generate_key(bit_length=256)
        self._lock = threading.Lock()
        self._keks: dict[str, bytes] = {}
        # material_id -> (unwrapped key, the KEK label it was wrapped under)
        self._cache: dict[str, tuple[AESGCM, str | None]] = {}
        self._closed = False
        self.fail_next = False
        self.generated = 0

    @property
    def keks(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._keks)

    def _maybe_fail(self) -> None:
        if self._closed:
            raise HsmError("the keystore is closed")
        if self.fail_next:
            self.fail_next = False
            raise HsmError("injected HSM failure")

    def _aead(self, material: MaterialRef) -> AESGCM:
        with self._lock:
            cached = self._cache.get(material.material_id)
        if cached is None:
            if hashlib.sha256(material.wrapped).hexdigest() != material.material_id:
                raise HsmError("wrapped key material does not match its material id")
            if material.kek is None:
                wrapping = self._domain_key
            else:
                check_kek_label(material.kek)
                with self._lock:
                    kek_key = self._keks.get(material.kek)
                if kek_key is None:
                    raise HsmError("key material was destroyed")
                wrapping = kek_key
            try:
                key = aes_key_unwrap_with_padding(wrapping, material.wrapped)
            except InvalidUnwrap:
                raise HsmError("cannot unwrap key material: WrappedKeyInvalid") from None
            cached = (AESGCM(key), material.kek)
            with self._lock:
                if material.kek is not None and material.kek not in self._keks:
                    raise HsmError("key material was destroyed")  # destroyed meanwhile
                self._cache[material.material_id] = cached
        aead, kek = cached
        if kek != material.kek:
            raise HsmError("cannot unwrap key material: WrappedKeyInvalid")
        return aead

    def generate_symmetric_key(self, kek: str | None = None) -> MaterialRef:
        self._maybe_fail()
        if kek is None:
            wrapping = self._domain_key
        else:
            check_kek_label(kek)
            with self._lock:
                wrapping = self._keks.setdefault(kek, AESGCM.generate_key(bit_length=256))
        wrapped = aes_key_wrap_with_padding(wrapping, AESGCM.generate_key(bit_length=256))
        self.generated += 1
        return MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped, kek=kek
        )

    def destroy_kek(self, kek: str) -> None:
        check_kek_label(kek)
        self._maybe_fail()
        with self._lock:
            self._keks.pop(kek, None)
            for material_id in [m for m, (_, k) in self._cache.items() if k == kek]:
                del self._cache[material_id]

    def encrypt(self, material: MaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        self._maybe_fail()
        iv = os.urandom(IV_LEN)
        return iv, self._aead(material).encrypt(iv, plaintext, aad)

    def decrypt(self, material: MaterialRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        if len(iv) != IV_LEN or len(ciphertext) < TAG_LEN:
            raise InvalidCiphertextError("")
        self._maybe_fail()
        aead = self._aead(material)
        try:
            return aead.decrypt(iv, ciphertext, aad)
        except InvalidTag:
            raise InvalidCiphertextError("") from None

    def generate_random(self, number_of_bytes: int) -> bytes:
        self._maybe_fail()
        return os.urandom(number_of_bytes)

    def forget(self, material_id: str) -> None:
        with self._lock:
            self._cache.pop(material_id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cache.clear()
