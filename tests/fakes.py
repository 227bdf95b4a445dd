"""In-memory fakes that implement the ports, for unit tests of the service (no I/O)."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from ledger.errors import HsmError, InvalidCiphertextError, ValidationError
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
    in-memory KEK per label, RFC 5649 wrapping; HMAC keys and MACs with ``hmac``;
    signing key pairs and signatures with ``cryptography`` (PKCS#8 DER wrapped); ledger
    signing keys as in-memory ``Ed25519PrivateKey`` objects by label (like token objects,
    they survive ``close``, which makes every call raise HsmError).

    Same contract and errors as ``Pkcs11KeyStore``: ``generate_symmetric_key(kek)``
    creates a missing KEK (also after ``destroy_kek``); using material whose KEK was
    destroyed raises HsmError("key material was destroyed"); ``destroy_kek`` also
    evicts the cached keys unwrapped under it. ``fail_next`` makes the next call raise
    HsmError, to test how the service handles an HSM failure. ``keks`` lists the
    labels of the KEKs that exist.
    """

    RSA_KEY_BITS: ClassVar[dict[str, int]] = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
    EC_CURVES: ClassVar[dict[str, Callable[[], ec.EllipticCurve]]] = {
        "ECC_NIST_P256": ec.SECP256R1,
        "ECC_NIST_P384": ec.SECP384R1,
        "ECC_NIST_P521": ec.SECP521R1,
        "ECC_SECG_P256K1": ec.SECP256K1,
    }
    # signing algorithm -> (scheme, hash, the key specs it may be used with)
    SIGNING_ALGORITHMS: ClassVar[dict[str, tuple[str, hashes.HashAlgorithm, frozenset[str]]]] = {
        **{
            f"RSASSA_{scheme}_SHA_{bits}": (
                scheme,
                hash_,
                frozenset({"RSA_2048", "RSA_3072", "RSA_4096"}),
            )
            for scheme in ("PSS", "PKCS1_V1_5")
            for bits, hash_ in (
                (256, hashes.SHA256()),
                (384, hashes.SHA384()),
                (512, hashes.SHA512()),
            )
        },
        "ECDSA_SHA_256": (
            "ECDSA",
            hashes.SHA256(),
            frozenset({"ECC_NIST_P256", "ECC_SECG_P256K1"}),
        ),
        "ECDSA_SHA_384": ("ECDSA", hashes.SHA384(), frozenset({"ECC_NIST_P384"})),
        "ECDSA_SHA_512": ("ECDSA", hashes.SHA512(), frozenset({"ECC_NIST_P521"})),
    }

    # key usage -> the key specs it may be used with (as the adapter's KEY_USAGE_SPECS)
    KEY_USAGE_SPECS: ClassVar[dict[str, frozenset[str]]] = {
        "SIGN_VERIFY": frozenset(
            {"RSA_2048", "RSA_3072", "RSA_4096"}
            | {"ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521", "ECC_SECG_P256K1"}
        ),
        "ENCRYPT_DECRYPT": frozenset({"RSA_2048", "RSA_3072", "RSA_4096"}),
        "KEY_AGREEMENT": frozenset({"ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521"}),
    }
    RSA_ENCRYPTION_ALGORITHMS: ClassVar[dict[str, hashes.HashAlgorithm]] = {
        "RSAES_OAEP_SHA_1": hashes.SHA1(),
        "RSAES_OAEP_SHA_256": hashes.SHA256(),
    }

    HMAC_KEY_BYTES: ClassVar[dict[str, int]] = {
        "HMAC_224": 28,
        "HMAC_256": 32,
        "HMAC_384": 48,
        "HMAC_512": 64,
    }
    # MAC algorithm -> (hash, the key spec it belongs to)
    HMAC_ALGORITHMS: ClassVar[dict[str, tuple[Callable[[], Any], str]]] = {
        "HMAC_SHA_224": (hashlib.sha224, "HMAC_224"),
        "HMAC_SHA_256": (hashlib.sha256, "HMAC_256"),
        "HMAC_SHA_384": (hashlib.sha384, "HMAC_384"),
        "HMAC_SHA_512": (hashlib.sha512, "HMAC_512"),
    }

    # Imported material kind -> (minimum, maximum length in bytes, as AWS KMS imports).
    IMPORT_KEY_LENGTHS: ClassVar[dict[str, tuple[int, int, None]]] = {
        "AES": (32, 32, None),
        "HMAC_224": (28, 64, None),
        "HMAC_256": (32, 64, None),
        "HMAC_384": (48, 128, None),
        "HMAC_512": (64, 128, None),
    }
    # wrapping algorithm -> (OAEP hash, AES key wrap with padding follows)
    IMPORT_WRAPPING_ALGORITHMS: ClassVar[dict[str, tuple[hashes.HashAlgorithm, bool]]] = {
        "RSAES_OAEP_SHA_1": (hashes.SHA1(), False),
        "RSAES_OAEP_SHA_256": (hashes.SHA256(), False),
        "RSA_AES_KEY_WRAP_SHA_1": (hashes.SHA1(), True),
        "RSA_AES_KEY_WRAP_SHA_256": (hashes.SHA256(), True),
    }

    LEDGER_SIGNING_LABEL_PREFIX: ClassVar[str] = "keyledger-ledger-signing-"
    LEDGER_SIGNING_LABEL_MAX_LEN: ClassVar[int] = 64

    def __init__(self) -> None:
        self._domain_key = AESGCM.generate_key(bit_length=256)
        # ledger signing key label -> its private key (a token object in the HSM)
        self._ledger_keys: dict[str, Ed25519PrivateKey] = {}
        self._lock = threading.Lock()
        self._keks: dict[str, bytes] = {}
        # material_id -> (unwrapped key, the KEK label it was wrapped under)
        self._cache: dict[str, tuple[AESGCM, str | None]] = {}
        # material_id -> (unwrapped HMAC key, its KEK label, its key spec)
        self._mac_cache: dict[str, tuple[bytes, str | None, str]] = {}
        # material_id -> (unwrapped private key, its KEK label, its key spec)
        self._sign_cache: dict[str, tuple[Any, str | None, str]] = {}
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

    def _unwrap_raw(self, material: MaterialRef) -> bytes:
        """The unwrapped key bytes of ``material`` (not cached); HsmError as the adapter."""
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
            return aes_key_unwrap_with_padding(wrapping, material.wrapped)
        except InvalidUnwrap:
            raise HsmError("cannot unwrap key material: WrappedKeyInvalid") from None

    def _aead(self, material: MaterialRef) -> AESGCM:
        if material.kind != "AES":
            raise HsmError("key material is not an AES encryption key")
        with self._lock:
            cached = self._cache.get(material.material_id)
        if cached is None:
            key = self._unwrap_raw(material)
            if len(key) != 32:
                raise HsmError("key material is not of the claimed kind")
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

    def generate_hmac_key(self, key_spec: str, kek: str) -> MaterialRef:
        size = self.HMAC_KEY_BYTES.get(key_spec) if isinstance(key_spec, str) else None
        if size is None:
            raise HsmError("unsupported HMAC key spec")
        check_kek_label(kek)
        self._maybe_fail()
        with self._lock:
            wrapping = self._keks.setdefault(kek, AESGCM.generate_key(bit_length=256))
        wrapped = aes_key_wrap_with_padding(wrapping, os.urandom(size))
        self.generated += 1
        return MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped, kek=kek, kind=key_spec
        )

    def generate_mac(self, material: MaterialRef, mac_algorithm: str, message: bytes) -> bytes:
        if material.kind not in self.HMAC_KEY_BYTES:
            raise HsmError("key material is not an HMAC key")
        entry = self.HMAC_ALGORITHMS.get(mac_algorithm) if isinstance(mac_algorithm, str) else None
        if entry is None:
            raise HsmError("unsupported MAC algorithm")
        digest, key_spec = entry
        if key_spec != material.kind:
            raise HsmError("the MAC algorithm does not match the HMAC key spec")
        self._maybe_fail()
        with self._lock:
            cached = self._mac_cache.get(material.material_id)
        if cached is None:
            key = self._unwrap_raw(material)
            low, high, _ = self.IMPORT_KEY_LENGTHS[material.kind]
            if not low <= len(key) <= high:  # generated: the spec's size; imported: range
                raise HsmError("key material is not of the claimed kind")
            cached = (key, material.kek, material.kind)
            with self._lock:
                if material.kek is not None and material.kek not in self._keks:
                    raise HsmError("key material was destroyed")  # destroyed meanwhile
                self._mac_cache[material.material_id] = cached
        key, kek, kind = cached
        if kek != material.kek:
            raise HsmError("cannot unwrap key material: WrappedKeyInvalid")
        if kind != material.kind:
            raise HsmError("key material is not of the claimed kind")
        return hmac.new(key, message, digest).digest()

    def _asymmetric_kind(self, key_spec: str, key_usage: str) -> str:
        """As the adapter's ``asymmetric_kind``: the material kind, or HsmError."""
        specs = self.KEY_USAGE_SPECS.get(key_usage) if isinstance(key_usage, str) else None
        if specs is None:
            raise HsmError("unsupported key usage")
        if not isinstance(key_spec, str) or key_spec not in specs:
            raise HsmError("unsupported key spec for this key usage")
        return key_spec if key_usage == "SIGN_VERIFY" else f"{key_spec}:{key_usage}"

    def generate_key_pair(
        self, key_spec: str, kek: str, key_usage: str = "SIGN_VERIFY"
    ) -> tuple[MaterialRef, bytes]:
        """As the adapter: the private key's PKCS#8 DER wrapped (RFC 5649) under the KEK,
        and the DER SubjectPublicKeyInfo; ``kind`` is the key spec for SIGN_VERIFY,
        ``"<spec>:<usage>"`` for ENCRYPT_DECRYPT (RSA) and KEY_AGREEMENT (ECC_NIST_*)."""
        kind = self._asymmetric_kind(key_spec, key_usage)
        check_kek_label(kek)
        self._maybe_fail()
        private: Any
        if key_spec in self.RSA_KEY_BITS:
            private = rsa.generate_private_key(65537, self.RSA_KEY_BITS[key_spec])
        else:
            private = ec.generate_private_key(self.EC_CURVES[key_spec]())
        pkcs8 = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with self._lock:
            wrapping = self._keks.setdefault(kek, AESGCM.generate_key(bit_length=256))
        wrapped = aes_key_wrap_with_padding(wrapping, pkcs8)
        self.generated += 1
        material = MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped, kek=kek, kind=kind
        )
        return material, public_der

    def generate_data_key_pair(self, key_pair_spec: str) -> tuple[bytes, bytes]:
        """As the adapter: ``(PKCS#8 DER private key, DER SubjectPublicKeyInfo)``, made with
        ``cryptography`` (RSA with e = 65537); HsmError for an unknown key pair spec.

        Security: returns the private key in plaintext, by design (as AWS KMS does)."""
        if not isinstance(key_pair_spec, str) or (
            key_pair_spec not in self.RSA_KEY_BITS and key_pair_spec not in self.EC_CURVES
        ):
            raise HsmError("unsupported key pair spec")
        self._maybe_fail()
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if key_pair_spec in self.RSA_KEY_BITS:
            private = rsa.generate_private_key(65537, self.RSA_KEY_BITS[key_pair_spec])
        else:
            private = ec.generate_private_key(self.EC_CURVES[key_pair_spec]())
        private_der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return private_der, public_der

    def sign(self, material: MaterialRef, signing_algorithm: str, digest: bytes) -> bytes:
        """As the adapter: PSS with MGF1(hash) and salt length = digest length,
        PKCS#1 v1.5, or ECDSA (DER), on the caller's digest."""
        kind = material.kind
        if kind not in self.RSA_KEY_BITS and kind not in self.EC_CURVES:
            raise HsmError("key material is not an asymmetric signing key")
        entry = (
            self.SIGNING_ALGORITHMS.get(signing_algorithm)
            if isinstance(signing_algorithm, str)
            else None
        )
        if entry is None:
            raise HsmError("unsupported signing algorithm")
        scheme, hash_, key_specs = entry
        if kind not in key_specs:
            raise HsmError("the signing algorithm does not match the key spec")
        if not isinstance(digest, bytes) or len(digest) != hash_.digest_size:
            raise HsmError("the digest length does not match the signing algorithm")
        self._maybe_fail()
        private = self._private_key(material)
        prehashed = Prehashed(hash_)
        if scheme == "ECDSA" and isinstance(private, ec.EllipticCurvePrivateKey):
            return private.sign(digest, ec.ECDSA(prehashed))
        if scheme != "ECDSA" and isinstance(private, rsa.RSAPrivateKey):
            pad: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
                if scheme == "PSS"
                else padding.PKCS1v15()
            )
            return private.sign(digest, pad, prehashed)
        raise HsmError("key material is not of the claimed kind")

    def _private_key(self, material: MaterialRef) -> Any:
        """The material's unwrapped private key (cached like the adapter's handles)."""
        kind = material.kind
        with self._lock:
            cached = self._sign_cache.get(material.material_id)
        if cached is None:
            try:
                loaded = serialization.load_der_private_key(self._unwrap_raw(material), None)
            except ValueError:
                raise HsmError("key material is not of the claimed kind") from None
            cached = (loaded, material.kek, kind)
            with self._lock:
                if material.kek is not None and material.kek not in self._keks:
                    raise HsmError("key material was destroyed")  # destroyed meanwhile
                self._sign_cache[material.material_id] = cached
        private, kek, cached_kind = cached
        if kek != material.kek:
            raise HsmError("cannot unwrap key material: WrappedKeyInvalid")
        if cached_kind != kind:
            raise HsmError("key material is not of the claimed kind")
        return private

    def decrypt_rsa(
        self, material: MaterialRef, encryption_algorithm: str, ciphertext: bytes
    ) -> bytes:
        """As the adapter: RSAES-OAEP with MGF1 of the same hash and an empty label;
        InvalidCiphertextError (no detail) for any decryption failure."""
        spec, _, usage = material.kind.partition(":")
        if usage != "ENCRYPT_DECRYPT" or spec not in self.RSA_KEY_BITS:
            raise HsmError("key material is not an RSA decryption key")
        hash_ = (
            self.RSA_ENCRYPTION_ALGORITHMS.get(encryption_algorithm)
            if isinstance(encryption_algorithm, str)
            else None
        )
        if (
            hash_ is None
            or not isinstance(ciphertext, bytes)
            or len(ciphertext) != self.RSA_KEY_BITS[spec] // 8
        ):
            raise InvalidCiphertextError("")
        self._maybe_fail()
        private = self._private_key(material)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise HsmError("key material is not of the claimed kind")
        try:
            return private.decrypt(
                ciphertext, padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)
            )
        except ValueError:
            raise InvalidCiphertextError("") from None

    def new_import_wrapping_key(self, wrapping_key_spec: str) -> tuple[MaterialRef, bytes]:
        """As the adapter: an RSA key pair whose private key's PKCS#8 DER is wrapped
        (RFC 5649) under the domain key, ``kek`` None, ``kind`` ``"IMPORT:<spec>"``."""
        if not isinstance(wrapping_key_spec, str) or wrapping_key_spec not in self.RSA_KEY_BITS:
            raise HsmError("unsupported wrapping key spec")
        self._maybe_fail()
        private = rsa.generate_private_key(65537, self.RSA_KEY_BITS[wrapping_key_spec])
        pkcs8 = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        wrapped = aes_key_wrap_with_padding(self._domain_key, pkcs8)
        material = MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(),
            wrapped=wrapped,
            kek=None,
            kind=f"IMPORT:{wrapping_key_spec}",
        )
        return material, public_der

    def import_key_material(
        self,
        wrapping: MaterialRef,
        wrapping_algorithm: str,
        encrypted_key_material: bytes,
        kind: str,
        kek: str,
    ) -> MaterialRef:
        """As the adapter: RSA-OAEP (MGF1 of the same hash, no label) of the material, or
        for RSA_AES_KEY_WRAP_* RSA-OAEP of an ephemeral AES-256 key followed by the
        material wrapped under it (RFC 5649); the material is re-wrapped under the KEK
        ``kek`` (created when missing). InvalidCiphertextError("") when it does not
        unwrap, ValidationError for a wrong length, HsmError otherwise."""
        spec = wrapping.kind.removeprefix("IMPORT:") if isinstance(wrapping.kind, str) else ""
        if (
            not isinstance(wrapping.kind, str)
            or not wrapping.kind.startswith("IMPORT:")
            or spec not in self.RSA_KEY_BITS
            or wrapping.kek is not None
        ):
            raise HsmError("key material is not an import wrapping key")
        entry = (
            self.IMPORT_WRAPPING_ALGORITHMS.get(wrapping_algorithm)
            if isinstance(wrapping_algorithm, str)
            else None
        )
        if entry is None:
            raise HsmError("unsupported wrapping algorithm")
        lengths = self.IMPORT_KEY_LENGTHS.get(kind) if isinstance(kind, str) else None
        if lengths is None:
            raise HsmError("unsupported kind of imported key material")
        check_kek_label(kek)
        if not isinstance(encrypted_key_material, bytes | bytearray | memoryview):
            raise InvalidCiphertextError("")
        self._maybe_fail()
        hash_, aes_wrapped = entry
        low, high, _ = lengths
        private = self._private_key(wrapping)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise HsmError("key material is not of the claimed kind")
        k = self.RSA_KEY_BITS[spec] // 8
        data = bytes(encrypted_key_material)
        rsa_part, rest = data[:k], data[k:]
        if len(rsa_part) != k or (rest and not aes_wrapped):
            raise InvalidCiphertextError("")
        oaep = padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)
        try:
            secret = private.decrypt(rsa_part, oaep)
            if aes_wrapped:
                if len(secret) != 32:
                    raise InvalidCiphertextError("")
                secret = aes_key_unwrap_with_padding(secret, rest)
        except (ValueError, InvalidUnwrap):
            raise InvalidCiphertextError("") from None
        if not low <= len(secret) <= high:
            raise ValidationError(
                f"imported key material for {kind} must be {low} bytes long"
                if low == high
                else f"imported key material for {kind} must be {low} to {high} bytes long"
            )
        with self._lock:
            wrapping_key = self._keks.setdefault(kek, AESGCM.generate_key(bit_length=256))
        wrapped = aes_key_wrap_with_padding(wrapping_key, secret)
        return MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped, kek=kek, kind=kind
        )

    def derive_shared_secret(self, material: MaterialRef, peer_public_key_der: bytes) -> bytes:
        """As the adapter: ECDH, the raw x-coordinate; ValidationError for a peer key that
        is not an EC key on the material's curve."""
        spec, _, usage = material.kind.partition(":")
        if usage != "KEY_AGREEMENT" or spec not in self.KEY_USAGE_SPECS["KEY_AGREEMENT"]:
            raise HsmError("key material is not a key agreement key")
        try:
            peer = serialization.load_der_public_key(bytes(peer_public_key_der))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValidationError(
                "the public key must be a DER-encoded SubjectPublicKeyInfo"
            ) from None
        curve = self.EC_CURVES[spec]()
        if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != curve.name:
            raise ValidationError(
                f"the public key must be an EC public key on the curve of the key spec {spec}"
            )
        self._maybe_fail()
        private = self._private_key(material)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise HsmError("key material is not of the claimed kind")
        return private.exchange(ec.ECDH(), peer)

    def destroy_kek(self, kek: str) -> None:
        check_kek_label(kek)
        self._maybe_fail()
        with self._lock:
            self._keks.pop(kek, None)
            for material_id in [m for m, (_, k) in self._cache.items() if k == kek]:
                del self._cache[material_id]
            for material_id in [m for m, (_, k, _) in self._mac_cache.items() if k == kek]:
                del self._mac_cache[material_id]
            for material_id in [m for m, (_, k, _) in self._sign_cache.items() if k == kek]:
                del self._sign_cache[material_id]

    @classmethod
    def _check_ledger_signing_label(cls, label: object) -> str:
        """The adapter's rule: printable ASCII, <= 64 characters, ``keyledger-ledger-
        signing-`` followed by at least one character; else HsmError (no echo)."""
        if (
            not isinstance(label, str)
            or len(label) > cls.LEDGER_SIGNING_LABEL_MAX_LEN
            or len(label) <= len(cls.LEDGER_SIGNING_LABEL_PREFIX)
            or not label.startswith(cls.LEDGER_SIGNING_LABEL_PREFIX)
            or not (label.isascii() and label.isprintable())
        ):
            raise HsmError("invalid ledger signing key label")
        return label

    def _ledger_key(self, label: str) -> Ed25519PrivateKey:
        self._check_ledger_signing_label(label)
        self._maybe_fail()
        with self._lock:
            key = self._ledger_keys.get(label)
        if key is None:
            raise HsmError("ledger signing key not found")
        return key

    def generate_ledger_signing_key(self, label: str) -> bytes:
        self._check_ledger_signing_label(label)
        self._maybe_fail()
        key = Ed25519PrivateKey.generate()
        with self._lock:
            if label in self._ledger_keys:
                raise HsmError("a ledger signing key with that label already exists")
            self._ledger_keys[label] = key
        return key.public_key().public_bytes_raw()

    def ledger_public_key(self, label: str) -> bytes:
        return self._ledger_key(label).public_key().public_bytes_raw()

    def ledger_sign(self, label: str, message: bytes) -> bytes:
        if not isinstance(message, bytes | bytearray | memoryview):
            raise HsmError("the message to sign must be bytes")
        return self._ledger_key(label).sign(bytes(message))

    def destroy_ledger_signing_key(self, label: str) -> None:
        self._check_ledger_signing_label(label)
        self._maybe_fail()
        with self._lock:
            self._ledger_keys.pop(label, None)

    def encrypt(self, material: MaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        self._maybe_fail()
        iv = os.urandom(IV_LEN)
        return iv, self._aead(material).encrypt(iv, plaintext, aad)

    def decrypt(self, material: MaterialRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        if material.kind != "AES":
            raise HsmError("key material is not an AES encryption key")
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
            self._mac_cache.pop(material_id, None)
            self._sign_cache.pop(material_id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cache.clear()
            self._mac_cache.clear()
            self._sign_cache.clear()
