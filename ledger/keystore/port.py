"""The keystore port: the narrow interface the service needs from an HSM.

Security: implementations keep key material inside the HSM. Only blobs wrapped under
an HSM-resident wrapping key cross this interface; plaintext key material never does.
Each KMS key's material is wrapped under its own key-encryption key (KEK), a
non-extractable HSM token object; destroying the KEK when the key is deleted makes
every wrapped blob of that key, which the immutable log keeps, unrecoverable
(crypto-shredding). Material from before per-key KEKs has ``kek`` None: wrapped under
the domain key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class MaterialRef:
    """A backing key as the ledger stores it: an id and the HSM-wrapped blob.

    ``material_id`` is the lowercase hex SHA-256 of ``wrapped``; adapters use it
    to cache unwrapped handles. ``wrapped`` is never printed.
    """

    material_id: str
    wrapped: bytes = field(repr=False)
    kek: str | None = None
    kind: str = "AES"  # "AES" (symmetric encryption) or "HMAC_224/256/384/512"


class KeyStore(Protocol):
    """An HSM reached through some API (PKCS#11 in production, fakes in unit tests).

    All methods are safe to call from many threads at once.
    """

    def generate_symmetric_key(self, kek: str | None = None) -> MaterialRef:
        """Generate an AES-256 key inside the HSM and return it wrapped under the KEK
        labelled ``kek`` (created in the HSM on first use), or under the domain key
        when ``kek`` is None.

        Raises HsmError when the HSM fails or the KEK was destroyed.
        """
        ...

    def destroy_kek(self, kek: str) -> None:
        """Destroy the KEK labelled ``kek`` and every cached unwrapped key under it.

        Afterwards no material wrapped under it can be used again. Idempotent.
        Raises HsmError when the HSM fails.
        """
        ...

    def encrypt(self, material: MaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM inside the HSM; returns ``(iv12, ciphertext || tag16)``.

        Raises HsmError when the HSM fails.
        """
        ...

    def decrypt(self, material: MaterialRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM decryption inside the HSM.

        Raises InvalidCiphertextError for any authentication failure (the HSM does not
        say why) and HsmError when the HSM itself fails.
        """
        ...

    def generate_hmac_key(self, key_spec: str, kek: str) -> MaterialRef:
        """Generate an HMAC key (``HMAC_224``/``256``/``384``/``512``: 28/32/48/64 bytes)
        inside the HSM, wrapped under the KEK ``kek``; ``kind`` is the key spec.

        Raises HsmError (also for an unknown key spec).
        """
        ...

    def generate_mac(self, material: MaterialRef, mac_algorithm: str, message: bytes) -> bytes:
        """HMAC (``HMAC_SHA_224``/``256``/``384``/``512``) of ``message`` inside the HSM.

        Raises HsmError when the HSM fails or the material is not an HMAC key.
        """
        ...

    def generate_key_pair(
        self, key_spec: str, kek: str, key_usage: str = "SIGN_VERIFY"
    ) -> tuple[MaterialRef, bytes]:
        """Generate a key pair inside the HSM; return the private key wrapped under the
        KEK ``kek`` (created when missing) and the public key as DER
        SubjectPublicKeyInfo.

        ``key_usage``: ``SIGN_VERIFY`` (``RSA_2048``/``3072``/``4096``,
        ``ECC_NIST_P256``/``P384``/``P521``, ``ECC_SECG_P256K1``; ``kind`` is the key
        spec), ``ENCRYPT_DECRYPT`` (RSA only) or ``KEY_AGREEMENT`` (``ECC_NIST_*`` only);
        for the last two ``kind`` is ``f"{key_spec}:{key_usage}"``.

        Raises HsmError (also for an unknown key spec or usage, or a combination AWS KMS
        does not allow).
        """
        ...

    def decrypt_rsa(
        self, material: MaterialRef, encryption_algorithm: str, ciphertext: bytes
    ) -> bytes:
        """RSAES-OAEP decryption (``RSAES_OAEP_SHA_1``/``RSAES_OAEP_SHA_256``: MGF1 with the
        same hash, empty label) with an ``ENCRYPT_DECRYPT`` RSA private key; the private
        key never leaves the HSM.

        Raises InvalidCiphertextError (no detail) for any decryption failure (wrong key,
        bad padding, wrong length, unknown algorithm); HsmError when the material is not
        an ENCRYPT_DECRYPT RSA key, cannot be unwrapped, or the HSM fails.
        """
        ...

    def derive_shared_secret(self, material: MaterialRef, peer_public_key_der: bytes) -> bytes:
        """ECDH (as AWS KMS DeriveSharedSecret: the raw x-coordinate of the shared point)
        between the material's ``KEY_AGREEMENT`` private key, inside the HSM, and the
        peer's DER SubjectPublicKeyInfo.

        Security: the result is secret: never log or store it.
        Raises ValidationError when the peer key is not an EC public key on the same
        curve; HsmError when the material is not a KEY_AGREEMENT key, cannot be
        unwrapped, or the HSM fails.
        """
        ...

    def sign(self, material: MaterialRef, signing_algorithm: str, digest: bytes) -> bytes:
        """Sign ``digest`` (the message already hashed by the caller) with the material's
        private key inside the HSM: ``RSASSA_PSS_SHA_*`` (MGF1 with the same hash, salt
        length = digest length), ``RSASSA_PKCS1_V1_5_SHA_*``, ``ECDSA_SHA_*`` (DER
        signature; 256 for P-256/secp256k1, 384 for P-384, 512 for P-521).

        Raises HsmError when the material is not a signing key, the algorithm does not
        fit its key spec, the digest length does not match the hash, or the HSM fails.
        """
        ...

    def generate_data_key_pair(self, key_pair_spec: str) -> tuple[bytes, bytes]:
        """A data key pair for GenerateDataKeyPair (``RSA_2048``/``3072``/``4096``,
        ``ECC_NIST_P256``/``P384``/``P521``, ``ECC_SECG_P256K1``), generated in the HSM:
        ``(private key as DER PKCS#8, public key as DER SubjectPublicKeyInfo)``.

        Security: the one exception to this port's rule: the private key is returned
        in plaintext by design (a data key pair belongs to the caller, as in AWS KMS).
        Encrypt it at once; never log or store it in the clear. No HSM object remains.
        Raises HsmError for an unknown key pair spec or when the HSM fails.
        """
        ...

    def new_import_wrapping_key(self, wrapping_key_spec: str) -> tuple[MaterialRef, bytes]:
        """An RSA key pair (``RSA_2048``/``3072``/``4096``) made in the HSM for
        GetParametersForImport: the private key (DECRYPT/UNWRAP only) wrapped under the
        domain key (``kek`` None, ``kind`` ``"IMPORT:<spec>"``), the public key as DER.

        Raises HsmError.
        """
        ...

    def import_key_material(
        self,
        wrapping: MaterialRef,
        wrapping_algorithm: str,
        encrypted_key_material: bytes,
        kind: str,
        kek: str,
    ) -> MaterialRef:
        """Unwrap imported key material with the import wrapping key and store it as a
        backing key of ``kind`` (``"AES"`` 32 bytes, or ``HMAC_224``/``256``/``384``/
        ``512``), wrapped under the KEK ``kek``.

        ``wrapping_algorithm``: RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256,
        RSA_AES_KEY_WRAP_SHA_1, RSA_AES_KEY_WRAP_SHA_256. Raises InvalidCiphertextError
        when the material does not unwrap (wrong wrapping key or corrupted),
        ValidationError when its length is wrong for ``kind``, HsmError otherwise.
        """
        ...

    def generate_random(self, number_of_bytes: int) -> bytes:
        """``number_of_bytes`` random bytes from the HSM's RNG (C_GenerateRandom).

        Security: the result is secret (data keys, GenerateRandom): never log or store it.
        Raises HsmError when the HSM fails.
        """
        ...

    def generate_ledger_signing_key(self, label: str) -> bytes:
        """Generate an Ed25519 key pair on the token: the private key a token object
        labelled ``label``, sensitive, non-extractable, CKA_SIGN only; the public key also
        a token object with the same label. Returns the raw 32-byte public key.

        ``label``: printable ASCII, at most 64 characters, starting with
        ``keyledger-ledger-signing-``. Unlike backing keys, the ledger's own signing key
        (for checkpoints, C2SP signed notes) stays on the token and is never wrapped.
        Raises HsmError if the label is invalid (the message does not repeat it), a key
        with that label already exists, or the token cannot do it.
        """
        ...

    def ledger_public_key(self, label: str) -> bytes:
        """The raw 32-byte Ed25519 public key of the ledger signing key ``label``.

        Raises HsmError if the label is invalid, the key does not exist, or the HSM fails.
        """
        ...

    def ledger_sign(self, label: str, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (pure Ed25519, RFC 8032, CKM_EDDSA;
        deterministic) by the ledger signing key ``label``, computed in the HSM.

        Raises HsmError if the label is invalid, the key does not exist, or the HSM fails.
        """
        ...

    def destroy_ledger_signing_key(self, label: str) -> None:
        """Destroy both objects of the ledger signing key ``label``. Idempotent: no error
        if absent.

        Raises HsmError if the label is invalid or the HSM fails.
        """
        ...

    def forget(self, material_id: str) -> None:
        """Destroy any unwrapped copy of this material held by the HSM session (after
        key deletion). The wrapped blob stays in the ledger's history; see the README's
        note on crypto-shredding."""
        ...

    def close(self) -> None:
        """Release sessions and cached handles."""
        ...
