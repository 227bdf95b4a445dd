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


class FakeKeyStore:
    """KeyStore with ``cryptography``: a random in-memory domain key, RFC 5649 wrapping.

    Same contract and errors as ``Pkcs11KeyStore``. ``fail_next`` makes the next call
    raise HsmError, to test how the service handles an HSM failure.
    """

    def __init__(self) -> None:
        self._domain_key = AESGCM.generate_key(bit_length=256)
        self._lock = threading.Lock()
        self._cache: dict[str, AESGCM] = {}
        self._closed = False
        self.fail_next = False
        self.generated = 0

    def _maybe_fail(self) -> None:
        if self._closed:
            raise HsmError("the keystore is closed")
        if self.fail_next:
            self.fail_next = False
            raise HsmError("injected HSM failure")

    def _aead(self, material: MaterialRef) -> AESGCM:
        with self._lock:
            aead = self._cache.get(material.material_id)
        if aead is not None:
            return aead
        if hashlib.sha256(material.wrapped).hexdigest() != material.material_id:
            raise HsmError("wrapped key material does not match its material id")
        try:
            key = aes_key_unwrap_with_padding(self._domain_key, material.wrapped)
        except InvalidUnwrap:
            raise HsmError("cannot unwrap key material: WrappedKeyInvalid") from None
        aead = AESGCM(key)
        with self._lock:
            self._cache[material.material_id] = aead
        return aead

    def generate_symmetric_key(self) -> MaterialRef:
        self._maybe_fail()
        wrapped = aes_key_wrap_with_padding(self._domain_key, AESGCM.generate_key(bit_length=256))
        self.generated += 1
        return MaterialRef(material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped)

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

    def forget(self, material_id: str) -> None:
        with self._lock:
            self._cache.pop(material_id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cache.clear()
