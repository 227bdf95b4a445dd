"""The KeyStore port over PKCS#11 (python-pkcs11). The only module that imports ``pkcs11``.

Model: every backing key is generated inside the HSM as a session object, wrapped
(CKM_AES_KEY_WRAP_PAD) under a wrapping key that never leaves the token, destroyed, and
handed to the ledger only as that wrapped blob. To use a key, the blob is unwrapped into
a sensitive, non-extractable session object whose handle is cached by ``material_id``.

Wrapping keys are AES-256 token objects, sensitive, non-extractable, WRAP/UNWRAP only:

* the *domain key* labelled ``keyledger-domain-wrap``, created when a store opens;
  material with ``kek`` None (from before per-key KEKs) is wrapped under it;
* one *key-encryption key* (KEK) per KMS key, labelled by the caller (``keyledger-kek-``
  followed by the key's id), created by the first ``generate_symmetric_key(kek=...)``
  or ``generate_hmac_key``
  (the CreateKey path: one token-object keygen, about 10 ms). ``destroy_kek`` destroys
  it when the KMS key is deleted, which makes every blob wrapped under it, kept forever
  by the immutable log, unrecoverable (crypto-shredding).

KEK handles are cached per store by label: a label is looked up on the token once per
store (about 1 ms), never per operation. After ``destroy_kek`` a *new* KEK with the same
label would be created by ``generate_symmetric_key(kek=label)``: labels carry the KMS
key id and a deleted key is never used again, so the service never asks for that.

Threading: python-pkcs11 initialises modules with ``C_Initialize(NULL)`` and releases the
GIL on every call; SoftHSM2 then runs without its own mutexes and crashes under threads.
:class:`_OsLockingLib` initialises the module with ``CKF_OS_LOCKING_OK`` instead, after
which concurrent calls on *different* sessions are safe. Operations therefore run on
sessions borrowed from a per-store pool (one session per concurrent caller, reused,
never shared between threads at the same time). A single long-lived read/write session
holds the login for the store's lifetime and owns the cached unwrapped keys.

Process caveats:

* A module is initialised once per process and never finalised (other stores in the
  process may still use it). After ``fork()`` the child re-initialises the module and
  must open its own stores; a store inherited from the parent raises HsmError.
* PKCS#11 login state is per token and process: stores on the same token share one
  login session (reference-counted); closing the last one logs the token out.
* Creating the domain key is not atomic across processes: if two processes open a
  fresh token at the same moment, both may create one, and opening then fails with
  HsmError (two domain keys). The embedded token is always opened through
  ``open_keystore``, which runs on one machine; create the domain key once, at setup,
  for shared HSMs.
* KEK creation is serialised within the process (per token), not across processes:
  two processes creating the *same* KEK at the same instant may both create one. A
  later lookup then finds both (wrapping uses the one with the smaller CKA_ID, unwrapping
  tries each) and ``destroy_kek`` destroys all of them; only the two creators' caches
  each know one. In practice a KMS key's first material (hence its KEK) is generated
  once, by the process serving CreateKey.
* SoftHSM2 looks objects up by scanning every token object (about 20 us each), so a
  label lookup, done once per KEK per store (first use after opening, and on CreateKey),
  costs about 2 ms with 100 KEKs on the token and 22 ms with 1000.
* ``destroy_kek`` evicts the cached unwrapped keys of every store of *this process* on
  the token. Another process that already unwrapped material under that KEK keeps its
  session copy until it calls ``forget``/``destroy_kek`` or closes; it can unwrap
  nothing new under the destroyed KEK.
* The cache of unwrapped handles grows with the number of distinct backing keys used
  (each costs the HSM a few hundred bytes) until ``close()``.

HMAC keys (``generate_hmac_key``, ``generate_mac``): CKK_GENERIC_SECRET keys of 28, 32,
48 or 64 bytes (CKM_GENERIC_SECRET_KEY_GEN), SIGN/VERIFY only, wrapped under the
per-key KEK like AES keys; MACs are CKM_SHA224/256/384/512_HMAC computed in the HSM.
``MaterialRef.kind`` says how a blob is unwrapped (AES with ENCRYPT/DECRYPT, or generic
secret with SIGN); the blob itself does not record it, so the ledger's ``kind`` is
trusted. SoftHSM2 2.6 quirks, measured:

* CKK_SHA256_HMAC etc. are not needed (and CKK_SHA256_HMAC refuses lengths other than
  32 bytes); every CKM_SHAn_HMAC accepts a generic secret.
* CKM_SHAn_HMAC refuses keys shorter than the hash output (KeySizeRange): 28/32/48/64
  bytes minimum, which the AWS KMS key specs meet exactly.
* CKM_AES_KEY_WRAP_PAD zero-pads a key whose length is not a multiple of 8 *before*
  RFC 5649 wrapping, so a 28-byte HMAC_224 key comes back from unwrapping as 32 bytes,
  the key followed by four zero bytes. The MAC is the same: HMAC zero-pads any key
  shorter than the hash's block (64 bytes for SHA-224) anyway. The blob is not the
  RFC 5649 wrapping of the 28-byte key, though: another HSM unwrapping it also gets
  32 bytes (same MAC, by the same argument).

Asymmetric signing keys (``generate_key_pair``, ``sign``; AWS KMS SIGN_VERIFY keys
RSA_2048/3072/4096, ECC_NIST_P256/P384/P521, ECC_SECG_P256K1): the pair is generated in
the HSM as session objects (CKM_RSA_PKCS_KEY_PAIR_GEN with e = 65537, or
CKM_EC_KEY_PAIR_GEN with the curve's named-curve OID as CKA_EC_PARAMS), the private key
(sensitive, SIGN only) is wrapped with CKM_AES_KEY_WRAP_PAD under the per-key KEK like
secret keys (SoftHSM2 wraps its PKCS#8 encoding), both objects are destroyed, and the
public key leaves as DER SubjectPublicKeyInfo. To sign, the blob is unwrapped into a
sensitive, non-extractable SIGN-only private-key session object (cached like the other
kinds) and the HSM runs the raw mechanism on the caller's digest: CKM_RSA_PKCS_PSS
(hash, MGF1 with the same hash, salt length = digest length), CKM_RSA_PKCS on a
DigestInfo, or CKM_ECDSA. SoftHSM2 2.6 quirks, measured:

* python-pkcs11's ``unwrap_key`` adds every capability attribute (ENCRYPT, WRAP,
  VERIFY = False) to the template, which SoftHSM2 refuses for a private key
  (AttributeTypeInvalid); the adapter drops them with ``pkcs11.constants.DEFAULT``.
* An unwrapped private key gets CKA_SIGN_RECOVER True unless the template says False.
* secp256k1 works (generation, wrapping, CKM_ECDSA) with the OpenSSL backend.

RSA decryption keys (``generate_key_pair(..., key_usage="ENCRYPT_DECRYPT")``, kind
``"<spec>:ENCRYPT_DECRYPT"``, private key DECRYPT only) and ECDH keys (``KEY_AGREEMENT``,
kind ``"<spec>:KEY_AGREEMENT"``, private key DERIVE only) are generated, wrapped and
cached like signing keys; SIGN_VERIFY materials keep ``kind`` = key spec. ``decrypt_rsa``
and ``derive_shared_secret`` document their mechanisms. SoftHSM2 2.6, measured:

* CKM_RSA_PKCS_OAEP accepts only SHA-1/MGF1-SHA-1 without a label; SHA-256 parameters
  fail C_DecryptInit with CKR_ARGUMENTS_BAD. CKM_RSA_X_509 decryption works and returns
  the modulus-length integer (leading zeros kept); a ciphertext >= n or of the wrong
  length fails with CKR_GENERAL_ERROR.
* CKM_ECDH1_DERIVE (KDF NULL) takes the peer point as raw uncompressed X9.62 bytes and
  yields the x-coordinate; a point of another curve fails with CKR_GENERAL_ERROR.
* An unwrapped private key with DECRYPT or DERIVE capability only works with the same
  ``DEFAULT`` template trick as signing keys; SIGN is then False.
Data key pairs (``generate_data_key_pair``, AWS GenerateDataKeyPair) are the one
exception to "key material never leaves the HSM": the pair is generated in the HSM as
non-sensitive, extractable session objects without capabilities, its components are
read and encoded as PKCS#8 on the host, and both objects are destroyed. The plaintext
private key is returned to the caller by design (it is the caller's key, as in AWS).

Ledger signing keys (``generate_ledger_signing_key``, ``ledger_sign``; Ed25519, for
signing the ledger's checkpoints as C2SP signed notes) are the one kind of key pair kept
*on the token*: both halves are token objects labelled ``keyledger-ledger-signing-...``
with a shared random CKA_ID, generated with CKM_EC_EDWARDS_KEY_PAIR_GEN (CKK_EC_EDWARDS,
CKA_EC_PARAMS the DER of OID 1.3.101.112, id-Ed25519); the private key is sensitive,
non-extractable, non-modifiable and SIGN only. Signatures are CKM_EDDSA without
parameters, i.e. pure Ed25519 (RFC 8032: deterministic, 64 bytes). The raw 32-byte
public key and the private key's handle are cached per store by label (a label lookup
costs about 1 ms); a lookup checks the pair (attributes, and a probe signature verified
with the public key on the host). Generation, lookup and destruction are serialised per
token in the process (the KEK lock), not across processes; ``destroy_ledger_signing_key``
evicts the label from every store of this process. SoftHSM2 2.6, measured: it accepts
both the OID and the PrintableString "edwards25519" as CKA_EC_PARAMS; the public key
keeps what the template said, the private key always gets the PrintableString (so
lookups accept either); CKA_EC_POINT comes back as a DER OCTET STRING (``04 20``
followed by the 32-byte key); CKM_EDDSA without parameters is pure Ed25519.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import (
    KDF,
    MGF,
    Attribute,
    GCMParams,
    KeyType,
    Mechanism,
    MechanismFlag,
    ObjectClass,
)
from pkcs11 import _pkcs11 as _p11
from pkcs11 import exceptions as p11e
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from ledger.errors import HsmError, InvalidCiphertextError, ValidationError
from ledger.keystore import softhsm
from ledger.keystore.port import MaterialRef
from ledger.settings import DEFAULT_SOFTHSM_MODULE, Settings

DOMAIN_KEY_LABEL = "keyledger-domain-wrap"
KEK_LABEL_PREFIX = "keyledger-kek-"
KEK_LABEL_MAX_LEN = 128
KEK_ID_LEN = 16  # random CKA_ID: a deterministic order among duplicate KEKs
LEDGER_SIGNING_LABEL_PREFIX = "keyledger-ledger-signing-"
LEDGER_SIGNING_LABEL_MAX_LEN = 64
# CKA_EC_PARAMS of Ed25519: the DER of OID 1.3.101.112 (RFC 8410), as generated; tokens
# may also report the PrintableString "edwards25519" (PKCS#11 3.0), accepted on lookup.
ED25519_EC_PARAMS = bytes.fromhex("06032b6570")
_ED25519_EC_PARAMS_ACCEPTED = frozenset(
    {ED25519_EC_PARAMS, bytes.fromhex("130c656477617264733235353139")}
)
ED25519_PUBLIC_KEY_LEN = 32
ED25519_SIGNATURE_LEN = 64
# Signed when a ledger signing key is looked up, to check its two halves belong together.
_LEDGER_PAIR_PROBE = b"keyledger ledger signing key pair check"
WRAP_MECHANISM = Mechanism.AES_KEY_WRAP_PAD  # 0x210A; 32-byte key -> 40-byte blob
IV_LEN = 12
TAG_LEN = 16

AES_KIND = "AES"
# AWS KMS HMAC key spec -> key length in bytes (generated in the HSM).
HMAC_KEY_BYTES: dict[str, int] = {
    "HMAC_224": 28,
    "HMAC_256": 32,
    "HMAC_384": 48,
    "HMAC_512": 64,
}
# AWS KMS MAC algorithm -> (PKCS#11 mechanism, the key spec it belongs to, MAC length).
HMAC_MECHANISMS: dict[str, tuple[Mechanism, str, int]] = {
    "HMAC_SHA_224": (Mechanism.SHA224_HMAC, "HMAC_224", 28),
    "HMAC_SHA_256": (Mechanism.SHA256_HMAC, "HMAC_256", 32),
    "HMAC_SHA_384": (Mechanism.SHA384_HMAC, "HMAC_384", 48),
    "HMAC_SHA_512": (Mechanism.SHA512_HMAC, "HMAC_512", 64),
}

# AWS KMS asymmetric (SIGN_VERIFY) key specs.
RSA_KEY_BITS: dict[str, int] = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
# key spec -> (curve name for the named-curve OID, coordinate length in bytes)
EC_CURVES: dict[str, tuple[str, int]] = {
    "ECC_NIST_P256": ("secp256r1", 32),
    "ECC_NIST_P384": ("secp384r1", 48),
    "ECC_NIST_P521": ("secp521r1", 66),
    "ECC_SECG_P256K1": ("secp256k1", 32),
}
ASYMMETRIC_KEY_SPECS: frozenset[str] = frozenset(RSA_KEY_BITS) | frozenset(EC_CURVES)
RSA_PUBLIC_EXPONENT = 65537

# AWS KMS key usages of asymmetric keys. SIGN_VERIFY materials have ``kind`` = key spec
# (as before usages existed); the others ``kind`` = f"{key_spec}:{key_usage}".
SIGN_VERIFY = "SIGN_VERIFY"
ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
KEY_AGREEMENT = "KEY_AGREEMENT"
# key usage -> the key specs AWS KMS allows with it (SM2 is not supported here).
KEY_USAGE_SPECS: dict[str, frozenset[str]] = {
    SIGN_VERIFY: ASYMMETRIC_KEY_SPECS,
    ENCRYPT_DECRYPT: frozenset(RSA_KEY_BITS),
    KEY_AGREEMENT: frozenset({"ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521"}),
}
# AWS KMS RSA encryption algorithm -> (hashlib name, hash length, hash mechanism, MGF).
RSA_ENCRYPTION_ALGORITHMS: dict[str, tuple[str, int, Mechanism, MGF]] = {
    "RSAES_OAEP_SHA_1": ("sha1", 20, Mechanism.SHA_1, MGF.SHA1),
    "RSAES_OAEP_SHA_256": ("sha256", 32, Mechanism.SHA256, MGF.SHA256),
}
# C_DecryptInit errors meaning "this OAEP parameter set is not supported" (SoftHSM2 2.6
# answers CKR_ARGUMENTS_BAD for any hash but SHA-1).
_OAEP_REFUSED: tuple[type[Exception], ...] = (
    p11e.ArgumentsBad,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
)


# Import wrapping keys (GetParametersForImport): ``kind`` = f"IMPORT:{key_spec}".
IMPORT_KIND_PREFIX = "IMPORT:"
# AWS KMS wrapping algorithm -> (OAEP algorithm of the RSA part, AES key wrap follows).
IMPORT_WRAPPING_ALGORITHMS: dict[str, tuple[str, bool]] = {
    "RSAES_OAEP_SHA_1": ("RSAES_OAEP_SHA_1", False),
    "RSAES_OAEP_SHA_256": ("RSAES_OAEP_SHA_256", False),
    "RSA_AES_KEY_WRAP_SHA_1": ("RSAES_OAEP_SHA_1", True),
    "RSA_AES_KEY_WRAP_SHA_256": ("RSAES_OAEP_SHA_256", True),
}
# Imported material kind -> (minimum, maximum length in bytes, as AWS KMS allows for
# import; the HMAC mechanism whose minimum key size is the minimum length).
IMPORT_KEY_LENGTHS: dict[str, tuple[int, int, Mechanism]] = {
    AES_KIND: (32, 32, Mechanism.SHA256_HMAC),
    "HMAC_224": (28, 64, Mechanism.SHA224_HMAC),
    "HMAC_256": (32, 64, Mechanism.SHA256_HMAC),
    "HMAC_384": (48, 128, Mechanism.SHA384_HMAC),
    "HMAC_512": (64, 128, Mechanism.SHA512_HMAC),
}
EPHEMERAL_KEY_BYTES = 32  # RSA_AES_KEY_WRAP_*: the ephemeral AES-256 key
KWP_OVERHEAD = 8  # RFC 5649: the alternative IV block


def import_wrapping_spec(kind: str) -> str | None:
    """The RSA key spec of an import wrapping key's ``kind``, None for other kinds."""
    if not kind.startswith(IMPORT_KIND_PREFIX):
        return None
    spec = kind[len(IMPORT_KIND_PREFIX) :]
    return spec if spec in RSA_KEY_BITS else None


def asymmetric_kind(key_spec: str, key_usage: str) -> str:
    """The ``MaterialRef.kind`` of an asymmetric key, after checking that AWS KMS allows
    ``key_spec`` with ``key_usage``; else HsmError."""
    specs = KEY_USAGE_SPECS.get(key_usage) if isinstance(key_usage, str) else None
    if specs is None:
        raise HsmError("unsupported key usage")
    if not isinstance(key_spec, str) or key_spec not in specs:
        raise HsmError("unsupported key spec for this key usage")
    return key_spec if key_usage == SIGN_VERIFY else f"{key_spec}:{key_usage}"


def split_asymmetric_kind(kind: str) -> tuple[str, str] | None:
    """``(key_spec, key_usage)`` of an asymmetric material kind, None for other kinds."""
    key_spec, _, key_usage = kind.partition(":")
    key_usage = key_usage or SIGN_VERIFY
    if key_usage == SIGN_VERIFY and kind != key_spec:
        return None  # "X:SIGN_VERIFY" is never produced
    specs = KEY_USAGE_SPECS.get(key_usage)
    if specs is None or key_spec not in specs:
        return None
    return key_spec, key_usage


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 appendix B.2.1)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def oaep_decode(encoded: bytes, k: int, hash_name: str) -> bytes | None:
    """EME-OAEP decoding (RFC 8017 section 7.1.2, step 3) of the k-byte encoded message
    with MGF1 of the same hash and an empty label; None when it is not valid.

    Every check runs over the whole message without an early exit and the failure is a
    single None, so neither the result nor (as far as CPython allows: there is no
    constant-time integer arithmetic in Python) the timing says which check failed.
    """
    h_len = hashlib.new(hash_name).digest_size
    if k < 2 * h_len + 2 or len(encoded) != k:
        return None
    l_hash = hashlib.new(hash_name, b"").digest()
    y = encoded[0]
    masked_seed = encoded[1 : 1 + h_len]
    masked_db = encoded[1 + h_len :]
    seed = _xor(masked_seed, _mgf1(masked_db, h_len, hash_name))
    db = _xor(masked_db, _mgf1(seed, k - h_len - 1, hash_name))
    bad = int(not hmac.compare_digest(db[:h_len], l_hash))
    bad |= (((y - 1) >> 8) & 1) ^ 1  # 1 unless y == 0
    found = 0
    separator = 0
    for i in range(h_len, len(db)):
        b = db[i]
        is_zero = ((b - 1) >> 8) & 1
        is_one = (((b ^ 1) - 1) >> 8) & 1
        looking = found ^ 1
        separator |= (looking & is_one) * i
        bad |= looking & (is_zero ^ 1) & (is_one ^ 1)  # PS holds a byte other than 0/1
        found |= is_one
    bad |= found ^ 1
    if bad:
        return None
    return db[separator + 1 :]


@dataclass(frozen=True)
class SigningAlgorithm:
    """How an AWS KMS signing algorithm runs in the HSM.

    ``scheme`` is ``"PSS"``, ``"PKCS1"`` or ``"ECDSA"``; ``key_specs`` the key specs it
    may be used with; ``digest_info`` the DER DigestInfo prefix (PKCS1 only).
    """

    scheme: str
    digest_len: int
    hash_mechanism: Mechanism
    mgf: MGF
    key_specs: frozenset[str]
    digest_info: bytes = b""


# RFC 8017 section 9.2, note 1: DER of DigestInfo up to (excluding) the digest value.
DIGEST_INFO_PREFIXES: dict[int, bytes] = {
    32: bytes.fromhex("3031300d060960864801650304020105000420"),  # SHA-256
    48: bytes.fromhex("3041300d060960864801650304020205000430"),  # SHA-384
    64: bytes.fromhex("3051300d060960864801650304020305000440"),  # SHA-512
}
_HASHES: dict[int, tuple[str, Mechanism, MGF]] = {
    32: ("256", Mechanism.SHA256, MGF.SHA256),
    48: ("384", Mechanism.SHA384, MGF.SHA384),
    64: ("512", Mechanism.SHA512, MGF.SHA512),
}
_RSA_SPECS = frozenset(RSA_KEY_BITS)
# AWS KMS: each ECC key spec has exactly one ECDSA algorithm.
_ECDSA_SPECS: dict[int, frozenset[str]] = {
    32: frozenset({"ECC_NIST_P256", "ECC_SECG_P256K1"}),
    48: frozenset({"ECC_NIST_P384"}),
    64: frozenset({"ECC_NIST_P521"}),
}


def _signing_algorithms() -> dict[str, SigningAlgorithm]:
    table: dict[str, SigningAlgorithm] = {}
    for size, (bits, hash_mechanism, mgf) in _HASHES.items():
        table[f"RSASSA_PSS_SHA_{bits}"] = SigningAlgorithm(
            "PSS", size, hash_mechanism, mgf, _RSA_SPECS
        )
        table[f"RSASSA_PKCS1_V1_5_SHA_{bits}"] = SigningAlgorithm(
            "PKCS1", size, hash_mechanism, mgf, _RSA_SPECS, DIGEST_INFO_PREFIXES[size]
        )
        table[f"ECDSA_SHA_{bits}"] = SigningAlgorithm(
            "ECDSA", size, hash_mechanism, mgf, _ECDSA_SPECS[size]
        )
    return table


# AWS KMS signing algorithm -> how it runs (digest length, mechanism parameters).
SIGNING_ALGORITHMS: dict[str, SigningAlgorithm] = _signing_algorithms()

_CKF_OS_LOCKING_OK = 0x00000002
_CKR_OK = 0x0
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x00000191

# Errors that mean the HSM (or our session with it) failed, as opposed to "this
# ciphertext does not authenticate". Everything else raised by C_Decrypt is treated as
# an authentication failure (SoftHSM2 reports a bad GCM tag as CKR_GENERAL_ERROR).
_HSM_FAILURES: tuple[type[Exception], ...] = (
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.DeviceRemoved,
    p11e.HostMemory,
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.SessionCount,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
    p11e.OperationActive,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
)
# After these the pooled session is not reused.
_SESSION_BROKEN: tuple[type[Exception], ...] = (
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.OperationActive,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
)


# --- module initialisation with OS locking -------------------------------------------


class _CInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _FunctionListHead(ctypes.Structure):
    """The first members of CK_FUNCTION_LIST: the version, C_Initialize, C_Finalize."""

    _fields_ = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", ctypes.c_void_p),
        ("C_Finalize", ctypes.c_void_p),
    ]


_CK_FUNC = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


def _function_list(so: str) -> _FunctionListHead:
    # dlopen of the same path returns the handle python-pkcs11 already holds, hence the
    # same module instance and the same function table.
    dll = ctypes.CDLL(so)
    head = ctypes.POINTER(_FunctionListHead)()
    rv = dll.C_GetFunctionList(ctypes.byref(head))
    if rv != _CKR_OK or not head:
        raise HsmError(f"C_GetFunctionList failed with 0x{rv:x}")
    return head.contents


def _c_initialize_os_locking(so: str) -> None:
    args = _CInitializeArgs(flags=_CKF_OS_LOCKING_OK)
    rv = _CK_FUNC(_function_list(so).C_Initialize)(ctypes.addressof(args))
    if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise HsmError(f"C_Initialize with OS locking failed with 0x{rv:x}")


def _c_finalize(so: str) -> None:
    _CK_FUNC(_function_list(so).C_Finalize)(None)


class _OsLockingLib(_p11.lib):
    """``pkcs11.lib`` whose ``initialize`` passes CKF_OS_LOCKING_OK to C_Initialize.

    ``initialize`` is a ``cpdef`` method, so the Cython ``__init__`` dispatches to this
    override. ``initialized`` stays False (it is read-only from Python), which also
    keeps python-pkcs11 from ever calling ``C_Finalize`` on this module.
    """

    def initialize(self) -> None:
        _c_initialize_os_locking(self.so)


# --- process-wide registry: one module instance, one login per token -----------------


@dataclass
class _Login:
    """The login session of one token, shared by every store on that token."""

    token: Any
    session: Any
    pin_digest: bytes = field(repr=False)
    refs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Serialises KEK and ledger signing key lookup, creation and destruction on this
    # token in this process. Lock order: kek_lock before lock.
    kek_lock: threading.Lock = field(default_factory=threading.Lock)
    # The open stores on this token, so destroy_kek (and destroy_ledger_signing_key)
    # can evict their caches.
    stores: weakref.WeakSet[Pkcs11KeyStore] = field(default_factory=weakref.WeakSet)


_registry_lock = threading.Lock()
_registry_pid = os.getpid()
_libs: dict[str, Any] = {}
_logins: dict[tuple[str, str], _Login] = {}


def _reset_after_fork() -> None:
    """In a forked child: drop the parent's sessions and re-initialise each module."""
    global _registry_pid
    for so in _libs:
        _c_finalize(so)
        _c_initialize_os_locking(so)
    _logins.clear()
    _registry_pid = os.getpid()


def _load_lib(so: str) -> Any:
    """Return the module ``so``, initialised with OS locking (caller holds the lock)."""
    if _registry_pid != os.getpid():
        _reset_after_fork()
    lib = _libs.get(so)
    if lib is None:
        if not os.path.exists(so):
            if so == DEFAULT_SOFTHSM_MODULE:
                raise HsmError("SoftHSM2 is not installed: apt-get install softhsm2")
            raise HsmError(f"PKCS#11 module not found: {so}")
        try:
            lib = _OsLockingLib(so)
        except p11e.PKCS11Error as exc:
            raise HsmError(f"cannot load PKCS#11 module {so}: {type(exc).__name__}") from None
        _libs[so] = lib
        softhsm.note_module_initialised()
    return lib


def _pin_digest(module: str, label: str, pin: str) -> bytes:
    return hashlib.sha256(f"{module}\0{label}\0{pin}".encode()).digest()


def _acquire_login(module: str, token_label: str, pin: str) -> _Login:
    with _registry_lock:
        lib = _load_lib(module)
        key = (module, token_label)
        digest = _pin_digest(module, token_label, pin)
        login = _logins.get(key)
        if login is not None:
            if not hmac.compare_digest(login.pin_digest, digest):
                raise HsmError(f"wrong PIN for token {token_label!r}")
            login.refs += 1
            return login
        try:
            token = lib.get_token(token_label=token_label)
        except p11e.NoSuchToken:
            raise HsmError(f"no PKCS#11 token labelled {token_label!r} in {module}") from None
        except p11e.MultipleTokensReturned:
            raise HsmError(f"more than one token labelled {token_label!r} in {module}") from None
        try:
            session = token.open(rw=True, user_pin=pin)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise HsmError(f"wrong PIN for token {token_label!r}") from None
        except p11e.PinLocked:
            raise HsmError(f"the PIN of token {token_label!r} is locked") from None
        except p11e.PKCS11Error as exc:
            raise HsmError(
                f"cannot log in to token {token_label!r}: {type(exc).__name__}"
            ) from None
        login = _Login(token=token, session=session, pin_digest=digest, refs=1)
        _logins[key] = login
        return login


def _release_login(module: str, token_label: str, login: _Login) -> None:
    with _registry_lock:
        if _logins.get((module, token_label)) is not login:
            return  # already gone (fork reset)
        login.refs -= 1
        if login.refs == 0:
            del _logins[(module, token_label)]
            # Closing the login session logs the token out and destroys every session
            # object it owns (our unwrapped keys).
            with login.lock, suppress(p11e.PKCS11Error):
                login.session.close()


# --- KEKs -----------------------------------------------------------------------------


def check_kek_label(kek: object) -> str:
    """Return ``kek`` if it is a valid KEK label, else raise HsmError.

    Valid: printable ASCII, at most 128 characters, ``keyledger-kek-`` followed by at
    least one character. Callers therefore cannot address the domain key or any object
    KeyLedger did not create. The message never repeats the label.
    """
    if (
        not isinstance(kek, str)
        or len(kek) > KEK_LABEL_MAX_LEN
        or len(kek) <= len(KEK_LABEL_PREFIX)
        or not kek.startswith(KEK_LABEL_PREFIX)
        or not (kek.isascii() and kek.isprintable())
    ):
        raise HsmError(
            f"invalid KEK label: printable ASCII, at most {KEK_LABEL_MAX_LEN} characters, "
            f"starting with {KEK_LABEL_PREFIX!r}"
        )
    return kek


def _find_keks(session: Any, label: str) -> list[tuple[bytes, int]]:
    """``(CKA_ID, handle)`` of every KEK labelled ``label``, sorted by CKA_ID.

    Raises HsmError when an object with the label is not a sensitive, non-extractable
    AES key with WRAP and UNWRAP.
    """
    found: list[tuple[bytes, int]] = []
    for key in session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
    ):
        attrs = key.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.WRAP,
                Attribute.UNWRAP,
                Attribute.ID,
            ]
        )
        ok = (
            attrs.get(Attribute.KEY_TYPE) == KeyType.AES
            and attrs.get(Attribute.SENSITIVE) is True
            and attrs.get(Attribute.EXTRACTABLE) is False
            and attrs.get(Attribute.WRAP) is True
            and attrs.get(Attribute.UNWRAP) is True
        )
        if not ok:
            raise HsmError(
                "a key-encryption key on the token is not a sensitive, non-extractable "
                "AES key with WRAP and UNWRAP"
            )
        found.append((bytes(attrs.get(Attribute.ID) or b""), int(key.handle)))
    found.sort()
    return found


# --- ledger signing keys (Ed25519 token objects) --------------------------------------


def check_ledger_signing_label(label: object) -> str:
    """Return ``label`` if it is a valid ledger signing key label, else raise HsmError.

    Valid: printable ASCII, at most 64 characters, ``keyledger-ledger-signing-``
    followed by at least one character. The message never repeats the label.
    """
    if (
        not isinstance(label, str)
        or len(label) > LEDGER_SIGNING_LABEL_MAX_LEN
        or len(label) <= len(LEDGER_SIGNING_LABEL_PREFIX)
        or not label.startswith(LEDGER_SIGNING_LABEL_PREFIX)
        or not (label.isascii() and label.isprintable())
    ):
        raise HsmError(
            "invalid ledger signing key label: printable ASCII, at most "
            f"{LEDGER_SIGNING_LABEL_MAX_LEN} characters, starting with "
            f"{LEDGER_SIGNING_LABEL_PREFIX!r}"
        )
    return label


def ed25519_public_key(ec_point: object) -> bytes:
    """The raw 32-byte Ed25519 public key from a CKA_EC_POINT value: a DER OCTET STRING
    (``04 20`` || key, as SoftHSM2 returns it) or the raw key. Raises HsmError."""
    value = bytes(ec_point) if isinstance(ec_point, bytes | bytearray | memoryview) else b""
    if len(value) == ED25519_PUBLIC_KEY_LEN + 2 and value[:2] == b"\x04\x20":
        value = value[2:]
    if len(value) != ED25519_PUBLIC_KEY_LEN:
        raise HsmError("the HSM returned an invalid Ed25519 public key")
    return value


@dataclass(frozen=True)
class _LedgerKey:
    """A ledger signing key as a store caches it: the private key object's handle and
    the raw public key."""

    private: int
    public_key: bytes


def _find_ledger_objects(session: Any, label: str) -> tuple[list[Any], list[Any]]:
    """``(private keys, public keys)`` on the token labelled ``label``."""
    private = list(
        session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
    )
    public = list(
        session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label})
    )
    return private, public


def _find_ledger_key(session: Any, label: str) -> _LedgerKey | None:
    """The ledger signing key labelled ``label`` on the token, None when there is none.

    Raises HsmError when the label names more or fewer than one private and one public
    key, when the private key is not a sensitive, non-extractable Ed25519 key with SIGN,
    or when the public key is not its Ed25519 public key (a probe signature must
    verify). Lets PKCS11Error through (callers map it).
    """
    private, public = _find_ledger_objects(session, label)
    if not private and not public:
        return None
    if len(private) != 1 or len(public) != 1:
        raise HsmError(
            "the token holds an incomplete or duplicated ledger signing key with that "
            "label; destroy it"
        )
    attrs = private[0].get_attributes(
        [
            Attribute.KEY_TYPE,
            Attribute.EC_PARAMS,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.SIGN,
        ]
    )
    ok = (
        attrs.get(Attribute.KEY_TYPE) == KeyType.EC_EDWARDS
        and bytes(attrs.get(Attribute.EC_PARAMS) or b"") in _ED25519_EC_PARAMS_ACCEPTED
        and attrs.get(Attribute.SENSITIVE) is True
        and attrs.get(Attribute.EXTRACTABLE) is False
        and attrs.get(Attribute.SIGN) is True
    )
    if not ok:
        raise HsmError(
            "a ledger signing key on the token is not a sensitive, non-extractable "
            "Ed25519 key with SIGN"
        )
    public_attrs = public[0].get_attributes(
        [Attribute.KEY_TYPE, Attribute.EC_PARAMS, Attribute.EC_POINT]
    )
    if not (
        public_attrs.get(Attribute.KEY_TYPE) == KeyType.EC_EDWARDS
        and bytes(public_attrs.get(Attribute.EC_PARAMS) or b"") in _ED25519_EC_PARAMS_ACCEPTED
    ):
        raise HsmError("a ledger signing public key on the token is not an Ed25519 key")
    key = _LedgerKey(
        int(private[0].handle), ed25519_public_key(public_attrs.get(Attribute.EC_POINT))
    )
    _check_ledger_pair(session, key)
    return key


def ed25519_sign(session: Any, handle: int, message: bytes) -> bytes:
    """Pure Ed25519 (CKM_EDDSA without parameters) of ``message`` with the private key
    object ``handle``, in the HSM through ``session``.

    Raises HsmError for a signature of the wrong length; lets PKCS11Error through
    (callers map it).
    """
    view = _PrivateKeyView(session, handle, KeyType.EC_EDWARDS)
    signature: bytes = view.sign(bytes(message), mechanism=Mechanism.EDDSA)
    if len(signature) != ED25519_SIGNATURE_LEN:
        raise HsmError("the HSM returned a signature of the wrong length")
    return bytes(signature)


def _check_ledger_pair(session: Any, key: _LedgerKey) -> None:
    """Sign a probe with the private key in the HSM and verify it on the host with the
    public key. Raises HsmError when it does not verify; lets PKCS11Error through."""
    signature = ed25519_sign(session, key.private, _LEDGER_PAIR_PROBE)
    try:
        Ed25519PublicKey.from_public_bytes(key.public_key).verify(signature, _LEDGER_PAIR_PROBE)
    except (InvalidSignature, ValueError):
        raise HsmError(
            "the ledger signing public key on the token does not match its private key"
        ) from None


@dataclass
class _Unwrapped:
    """A cached unwrapped session key, the KEK its blob was wrapped under and its kind."""

    key: Any
    kek: str | None
    kind: str


# --- key views: a key handle used through another session -----------------------------


class _BoundHandle:
    """The plumbing every key view shares: the pooled session and the object handle,
    the attributes python-pkcs11's operation mixins read (no HSM round trip)."""

    def __init__(self, session: Any, handle: int) -> None:
        self._session = session
        self._handle = handle

    @property
    def session(self) -> Any:
        return self._session

    @property
    def handle(self) -> int:
        return self._handle


class _KeyView(
    _BoundHandle,
    _p11.EncryptMixin,  # type: ignore[misc,name-defined]
    _p11.DecryptMixin,  # type: ignore[misc,name-defined]
    _p11.WrapMixin,  # type: ignore[misc,name-defined]
    _p11.UnwrapMixin,  # type: ignore[misc,name-defined]
):
    """An AES key handle bound to a pooled session.

    PKCS#11 object handles are valid in every session of the process, but python-pkcs11
    binds each key object to the session that produced it. This view supplies the
    three attributes its operation code reads (``session``, ``handle``, ``key_type``)
    without an attribute round trip to the HSM.
    """

    key_type = KeyType.AES


class _MacKeyView(_BoundHandle, _p11.SignMixin):  # type: ignore[misc,name-defined]
    """A generic-secret (HMAC) key handle bound to a pooled session; see :class:`_KeyView`."""

    key_type = KeyType.GENERIC_SECRET


def hmac_mechanism(mac_algorithm: str) -> tuple[Mechanism, str, int]:
    """``(mechanism, key spec, MAC length)`` of an AWS KMS MAC algorithm, else HsmError."""
    entry = HMAC_MECHANISMS.get(mac_algorithm) if isinstance(mac_algorithm, str) else None
    if entry is None:
        raise HsmError("unsupported MAC algorithm")
    return entry


def hmac_sign(session: Any, handle: int, mac_algorithm: str, message: bytes) -> bytes:
    """The HMAC of ``message`` under the key object ``handle``, computed in the HSM through
    ``session`` with the mechanism of ``mac_algorithm`` (passed explicitly).

    The one MAC path of this module; tests run it on imported known keys (RFC 4231).
    Raises HsmError for an unknown algorithm or a MAC of the wrong length, and lets
    PKCS11Error through (callers map it).
    """
    mechanism, _, mac_len = hmac_mechanism(mac_algorithm)
    mac: bytes = _MacKeyView(session, handle).sign(bytes(message), mechanism=mechanism)
    if len(mac) != mac_len:
        raise HsmError("the HSM returned a MAC of the wrong length")
    return mac


class _UnwrapKeyView(
    _BoundHandle,
    _p11.DecryptMixin,  # type: ignore[misc,name-defined]
    _p11.UnwrapMixin,  # type: ignore[misc,name-defined]
):
    """A key handle (RSA private key or AES key) bound to a pooled session, for
    C_Decrypt and C_UnwrapKey; see :class:`_KeyView`."""

    def __init__(self, session: Any, handle: int, key_type: KeyType) -> None:
        super().__init__(session, handle)
        self.key_type = key_type


class _PrivateKeyView(
    _BoundHandle,
    _p11.SignMixin,  # type: ignore[misc,name-defined]
    _p11.DecryptMixin,  # type: ignore[misc,name-defined]
    _p11.DeriveMixin,  # type: ignore[misc,name-defined]
):
    """An RSA or EC private key handle bound to a pooled session; see :class:`_KeyView`.
    What it may do is decided by the HSM object's attributes (SIGN, DECRYPT, DERIVE)."""

    def __init__(self, session: Any, handle: int, key_type: KeyType) -> None:
        super().__init__(session, handle)
        self.key_type = key_type


def check_signing_algorithm(key_spec: str, algorithm: str, digest: bytes) -> SigningAlgorithm:
    """The entry of ``algorithm`` after checking it is allowed for ``key_spec`` (RSA
    algorithms for RSA keys; ECDSA_SHA_256 for P-256 and secp256k1, _384 for P-384,
    _512 for P-521) and that ``digest`` has its hash's length. Else HsmError."""
    if key_spec not in ASYMMETRIC_KEY_SPECS:
        raise HsmError("key material is not an asymmetric signing key")
    entry = SIGNING_ALGORITHMS.get(algorithm) if isinstance(algorithm, str) else None
    if entry is None:
        raise HsmError("unsupported signing algorithm")
    if key_spec not in entry.key_specs:
        raise HsmError("the signing algorithm does not match the key spec")
    if not isinstance(digest, bytes | bytearray | memoryview) or len(digest) != entry.digest_len:
        raise HsmError("the digest length does not match the signing algorithm")
    return entry


def private_key_sign(
    session: Any, handle: int, key_spec: str, algorithm: str, digest: bytes
) -> bytes:
    """Sign ``digest`` with the private key object ``handle`` in the HSM through
    ``session``; the caller hashed the message.

    On the host: the checks of :func:`check_signing_algorithm`, the DigestInfo prefix for
    RSASSA-PKCS1-v1_5, and the DER encoding of ECDSA's r||s. In the HSM: the private-key
    operation (CKM_RSA_PKCS_PSS with hash, MGF1(hash) and salt length = digest length;
    CKM_RSA_PKCS on DigestInfo || digest; CKM_ECDSA on the digest). Returns the
    signature as AWS KMS does (RSA: modulus-length bytes; ECDSA: DER Ecdsa-Sig-Value).

    Raises HsmError for a bad algorithm, key spec or digest, or an output of the wrong
    length; lets PKCS11Error through (callers map it).
    """
    entry = check_signing_algorithm(key_spec, algorithm, digest)
    data = bytes(digest)
    if entry.scheme == "ECDSA":
        view = _PrivateKeyView(session, handle, KeyType.EC)
        raw: bytes = view.sign(data, mechanism=Mechanism.ECDSA)
        if len(raw) != 2 * EC_CURVES[key_spec][1]:
            raise HsmError("the HSM returned a signature of the wrong length")
        return bytes(encode_ecdsa_signature(raw))
    view = _PrivateKeyView(session, handle, KeyType.RSA)
    if entry.scheme == "PSS":
        out: bytes = view.sign(
            data,
            mechanism=Mechanism.RSA_PKCS_PSS,
            mechanism_param=(entry.hash_mechanism, entry.mgf, entry.digest_len),
        )
    else:
        out = view.sign(entry.digest_info + data, mechanism=Mechanism.RSA_PKCS)
    if len(out) != RSA_KEY_BITS[key_spec] // 8:
        raise HsmError("the HSM returned a signature of the wrong length")
    return out


def _public_key_der(key_spec: str, public_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of the HSM public key object, checked by loading it
    with ``cryptography`` (type and size must match ``key_spec``). Raises HsmError."""
    try:
        if key_spec in RSA_KEY_BITS:
            attrs = public_key.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(attrs[Attribute.MODULUS], "big"),
            )
            der: bytes = numbers.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
        else:
            der = bytes(encode_ec_public_key(public_key))
        loaded = load_der_public_key(der)
    except (ValueError, KeyError, TypeError):
        raise HsmError("the HSM returned an invalid public key") from None
    if key_spec in RSA_KEY_BITS:
        ok = (
            isinstance(loaded, rsa.RSAPublicKey)
            and loaded.key_size == RSA_KEY_BITS[key_spec]
            and loaded.public_numbers().e == RSA_PUBLIC_EXPONENT
        )
    else:
        ok = isinstance(loaded, ec.EllipticCurvePublicKey) and (
            loaded.curve.name == EC_CURVES[key_spec][0]
        )
    if not ok:
        raise HsmError("the HSM returned a public key that does not match the key spec")
    return der


# key spec -> the ``cryptography`` curve of an EC key spec (as EC_CURVES names it).
_EC_CURVE_TYPES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}


def _read_private_key(
    key_spec: str, private: Any
) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The ``cryptography`` private key built from the components of the HSM private key
    object (which must be non-sensitive and extractable). RSA components are checked for
    consistency by ``cryptography``; the key size, e = 65537, and the EC curve are
    checked against ``key_spec``.

    Security: returns private key material. Raises HsmError (the message never holds
    key material); lets PKCS11Error through (callers map it).
    """
    if key_spec in RSA_KEY_BITS:
        attrs = private.get_attributes(
            [
                Attribute.MODULUS,
                Attribute.PUBLIC_EXPONENT,
                Attribute.PRIVATE_EXPONENT,
                Attribute.PRIME_1,
                Attribute.PRIME_2,
                Attribute.EXPONENT_1,
                Attribute.EXPONENT_2,
                Attribute.COEFFICIENT,
            ]
        )
        try:
            ints = {attr: int.from_bytes(bytes(value), "big") for attr, value in attrs.items()}
            numbers = rsa.RSAPrivateNumbers(
                p=ints[Attribute.PRIME_1],
                q=ints[Attribute.PRIME_2],
                d=ints[Attribute.PRIVATE_EXPONENT],
                dmp1=ints[Attribute.EXPONENT_1],
                dmq1=ints[Attribute.EXPONENT_2],
                iqmp=ints[Attribute.COEFFICIENT],
                public_numbers=rsa.RSAPublicNumbers(
                    ints[Attribute.PUBLIC_EXPONENT], ints[Attribute.MODULUS]
                ),
            )
            key = numbers.private_key()
        except (ValueError, KeyError, TypeError):
            raise HsmError("the HSM returned an invalid RSA private key") from None
        if key.key_size != RSA_KEY_BITS[key_spec] or ints[Attribute.PUBLIC_EXPONENT] != (
            RSA_PUBLIC_EXPONENT
        ):
            raise HsmError("the HSM returned a private key that does not match the key spec")
        return key
    attrs = private.get_attributes([Attribute.EC_PARAMS, Attribute.VALUE])
    expected_params = encode_named_curve_parameters(EC_CURVES[key_spec][0])
    if bytes(attrs.get(Attribute.EC_PARAMS) or b"") != bytes(expected_params):
        raise HsmError("the HSM returned a private key that does not match the key spec")
    try:
        return ec.derive_private_key(
            int.from_bytes(bytes(attrs[Attribute.VALUE]), "big"), _EC_CURVE_TYPES[key_spec]()
        )
    except (ValueError, KeyError, TypeError):
        raise HsmError("the HSM returned an invalid EC private key") from None


# --- the store -------------------------------------------------------------------------


def _generate_pair(
    session: Any, key_spec: str, capabilities: Any, private_template: dict[Attribute, Any]
) -> tuple[Any, Any]:
    """An RSA (e = 65537) or EC key pair of ``key_spec`` as session objects."""
    if key_spec in RSA_KEY_BITS:
        return session.generate_keypair(  # type: ignore[no-any-return]
            KeyType.RSA,
            RSA_KEY_BITS[key_spec],
            store=False,
            mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
            capabilities=capabilities,
            public_template={
                Attribute.PUBLIC_EXPONENT: RSA_PUBLIC_EXPONENT.to_bytes(3, "big"),
                Attribute.VERIFY_RECOVER: False,
            },
            private_template=private_template,
        )
    params = session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: encode_named_curve_parameters(EC_CURVES[key_spec][0])},
        local=True,
    )
    return params.generate_keypair(  # type: ignore[no-any-return]
        store=False,
        mechanism=Mechanism.EC_KEY_PAIR_GEN,
        capabilities=capabilities,
        private_template=private_template,
    )


class Pkcs11KeyStore:
    """KeyStore over a PKCS#11 token (SoftHSM2 embedded, or any HSM with AES-GCM and
    CKM_AES_KEY_WRAP_PAD).

    All methods are safe to call from many threads at once. Several stores may be open
    on the same token in one process; they share the login.

    Security: backing keys exist in plaintext only inside the HSM. The wrapped blobs
    returned are as secret as their wrapping key (domain key or KEK) is safe; whoever
    can log in to the token can unwrap them until that KEK is destroyed. Error
    messages name PKCS#11 error classes, never data.
    """

    def __init__(self, *, module: str, token_label: str, pin: str) -> None:
        """Log in to the token labelled ``token_label`` and find (or create) the domain key.

        Raises HsmError when the module cannot be loaded, the token is missing or
        ambiguous, the PIN is wrong, or the domain key is missing and cannot be created
        or is not what it must be (sensitive, non-extractable, WRAP/UNWRAP).
        """
        self._module = module
        self._token_label = token_label
        self._pid = os.getpid()
        self._login = _acquire_login(module, token_label, pin)
        self._closed = False
        self._pool_lock = threading.Lock()
        self._idle: list[Any] = []
        self._opened: list[Any] = []
        self._cache_lock = threading.Lock()
        self._unwrapped: dict[str, _Unwrapped] = {}
        # KEK label -> handles of the KEK objects with that label (wrap under the first).
        self._keks: dict[str, tuple[int, ...]] = {}
        # Ledger signing key label -> its private key handle and raw public key.
        self._ledger_keys: dict[str, _LedgerKey] = {}
        # OAEP hashes the HSM refused in C_DecryptInit (then decoded on the host).
        self._oaep_refused: dict[str, bool] = {}
        try:
            self._domain_handle = self._find_or_create_domain_key()
        except BaseException:
            _release_login(module, token_label, self._login)
            raise
        with self._login.kek_lock:
            self._login.stores.add(self)

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore(module={self._module!r}, token_label={self._token_label!r})"

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup ------------------------------------------------------------------------

    def _find_or_create_domain_key(self) -> int:
        login = self._login
        with login.lock:
            try:
                found = list(
                    login.session.get_objects(
                        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: DOMAIN_KEY_LABEL}
                    )
                )
                if not found:
                    key = login.session.generate_key(
                        KeyType.AES,
                        256,
                        label=DOMAIN_KEY_LABEL,
                        store=True,
                        mechanism=Mechanism.AES_KEY_GEN,
                        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                        template={
                            Attribute.PRIVATE: True,
                            Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False,
                            Attribute.MODIFIABLE: False,
                        },
                    )
                    found = [key]
                if len(found) > 1:
                    raise HsmError(f"more than one {DOMAIN_KEY_LABEL!r} key on the token")
                key = found[0]
                attrs = key.get_attributes(
                    [
                        Attribute.KEY_TYPE,
                        Attribute.SENSITIVE,
                        Attribute.EXTRACTABLE,
                        Attribute.WRAP,
                        Attribute.UNWRAP,
                    ]
                )
            except p11e.PKCS11Error as exc:
                raise HsmError(f"cannot set up the domain key: {type(exc).__name__}") from None
        ok = (
            attrs.get(Attribute.KEY_TYPE) == KeyType.AES
            and attrs.get(Attribute.SENSITIVE) is True
            and attrs.get(Attribute.EXTRACTABLE) is False
            and attrs.get(Attribute.WRAP) is True
            and attrs.get(Attribute.UNWRAP) is True
        )
        if not ok:
            raise HsmError(
                f"{DOMAIN_KEY_LABEL!r} must be a sensitive, non-extractable AES key "
                "with WRAP and UNWRAP"
            )
        handle: int = key.handle
        return handle

    # -- sessions ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise HsmError("the keystore is closed")
        if self._pid != os.getpid():
            raise HsmError("the keystore was opened before fork(); open a new one in this process")

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """Borrow a session (never used by two threads at once); opens one if none idle."""
        self._check_open()
        with self._pool_lock:
            session = self._idle.pop() if self._idle else None
        if session is None:
            try:
                # Logged in already: login state is per token, not per session.
                session = self._login.token.open()
            except p11e.PKCS11Error as exc:
                raise HsmError(f"cannot open a session: {type(exc).__name__}") from None
            with self._pool_lock:
                self._opened.append(session)
        broken = False
        try:
            yield session
        except _SESSION_BROKEN:
            broken = True
            raise
        finally:
            with self._pool_lock:
                if broken or self._closed:
                    self._discard(session)
                else:
                    self._idle.append(session)

    def _discard(self, session: Any) -> None:
        """Close ``session`` (caller holds the pool lock)."""
        if session in self._opened:
            self._opened.remove(session)
        with suppress(p11e.PKCS11Error):
            session.close()

    def _rw_session(self) -> Any:
        """A fresh read/write session (token objects need one); the caller closes it."""
        return self._login.token.open(rw=True)

    def _kek_handles(self, kek: str, *, create: bool) -> tuple[int, ...]:
        """Handles of the KEK labelled ``kek``: cached, else looked up once (and created
        when missing and ``create``).

        Raises HsmError when the label is invalid, the KEK is missing and not to be
        created ("key material was destroyed"), or the HSM fails.
        """
        check_kek_label(kek)
        with self._cache_lock:
            handles = self._keks.get(kek)
        if handles is not None:
            return handles
        self._check_open()
        login = self._login
        with login.kek_lock:
            with self._cache_lock:
                handles = self._keks.get(kek)
            if handles is not None:
                return handles
            try:
                session = self._rw_session()
                try:
                    found = _find_keks(session, kek)
                    if not found and create:
                        key = session.generate_key(
                            KeyType.AES,
                            256,
                            id=os.urandom(KEK_ID_LEN),
                            label=kek,
                            store=True,
                            mechanism=Mechanism.AES_KEY_GEN,
                            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                            template={
                                Attribute.PRIVATE: True,
                                Attribute.SENSITIVE: True,
                                Attribute.EXTRACTABLE: False,
                                Attribute.MODIFIABLE: False,
                            },
                        )
                        # No second lookup to catch another process creating the same
                        # label meanwhile: SoftHSM2's find scans every token object
                        # (about 20 us each), and the CreateKey path is one process.
                        found = [(b"", int(key.handle))]
                finally:
                    with suppress(p11e.PKCS11Error):
                        session.close()
            except p11e.PKCS11Error as exc:
                raise HsmError(
                    f"cannot set up the key-encryption key: {type(exc).__name__}"
                ) from None
            if not found:
                raise HsmError("key material was destroyed")
            handles = tuple(handle for _, handle in found)
            with self._cache_lock:
                self._keks[kek] = handles
        return handles

    def _key_handle(self, material: MaterialRef) -> int:
        """The cached unwrapped handle for ``material``; unwraps on first use, under
        ``material.kek``'s KEK, or the domain key when it is None, as an AES key
        (ENCRYPT/DECRYPT), for an ``HMAC_*`` kind a generic secret (SIGN), or for an
        asymmetric kind an RSA or EC private key with SIGN (SIGN_VERIFY), DECRYPT
        (``:ENCRYPT_DECRYPT``) or DERIVE (``:KEY_AGREEMENT``) only.

        Raises HsmError when the blob does not match its id, its KEK was destroyed, it
        cannot be unwrapped (for instance under another key's KEK), or it was unwrapped
        before as another kind.
        """
        with self._cache_lock:
            cached = self._unwrapped.get(material.material_id)
        if cached is None:
            if hashlib.sha256(material.wrapped).hexdigest() != material.material_id:
                raise HsmError("wrapped key material does not match its material id")
            self._check_open()
            if material.kek is None:
                wrapping: tuple[int, ...] = (self._domain_handle,)
            else:
                wrapping = self._kek_handles(material.kek, create=False)
            login = self._login
            with login.lock:
                # Re-check: another thread may have unwrapped it while we waited.
                with self._cache_lock:
                    cached = self._unwrapped.get(material.material_id)
                if cached is None:
                    cached = _Unwrapped(
                        self._unwrap(material.wrapped, wrapping, material.kind),
                        material.kek,
                        material.kind,
                    )
                    with self._cache_lock:
                        self._unwrapped[material.material_id] = cached
        if cached.kek != material.kek:
            # The blob was wrapped under another key (its id is its hash): refuse, as
            # unwrapping it under the claimed KEK would.
            raise HsmError("cannot unwrap key material: WrappedKeyInvalid")
        if cached.kind != material.kind:
            raise HsmError("key material is not of the claimed kind")
        handle: int = cached.key.handle
        return handle

    def _unwrap(self, wrapped: bytes, wrapping: tuple[int, ...], kind: str) -> Any:
        """Unwrap into a session object of the login session (caller holds its lock),
        trying each wrapping key in turn. Raises HsmError when none unwraps it or
        ``kind`` is unknown."""
        object_class = ObjectClass.SECRET_KEY
        template: dict[Attribute, Any] = {
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        }
        if kind == AES_KIND:
            key_type, capabilities = KeyType.AES, MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
        elif kind in HMAC_KEY_BYTES:
            key_type, capabilities = KeyType.GENERIC_SECRET, MechanismFlag.SIGN
        elif import_wrapping_spec(kind) is not None:
            # An import wrapping key: RSA private key, DECRYPT (raw RSA for the host
            # OAEP path) and UNWRAP only.
            object_class, key_type = ObjectClass.PRIVATE_KEY, KeyType.RSA
            capabilities = MechanismFlag.DECRYPT | MechanismFlag.UNWRAP
            template.update(
                {
                    Attribute.ENCRYPT: DEFAULT,
                    Attribute.WRAP: DEFAULT,
                    Attribute.VERIFY: DEFAULT,
                    Attribute.SIGN_RECOVER: False,
                }
            )
        elif (asymmetric := split_asymmetric_kind(kind)) is not None:
            key_spec, key_usage = asymmetric
            object_class = ObjectClass.PRIVATE_KEY
            key_type = KeyType.RSA if key_spec in RSA_KEY_BITS else KeyType.EC
            capabilities = {
                SIGN_VERIFY: MechanismFlag.SIGN,
                ENCRYPT_DECRYPT: MechanismFlag.DECRYPT,
                KEY_AGREEMENT: MechanismFlag.DERIVE,
            }[key_usage]
            # python-pkcs11 sets every capability attribute; SoftHSM2 refuses the
            # public-key ones on a private key. SIGN_RECOVER defaults to True there.
            template.update(
                {
                    Attribute.ENCRYPT: DEFAULT,
                    Attribute.WRAP: DEFAULT,
                    Attribute.VERIFY: DEFAULT,
                    Attribute.SIGN_RECOVER: False,
                }
            )
        else:
            raise HsmError("unknown kind of key material")
        error = "WrappedKeyInvalid"
        for wrapping_handle in wrapping:
            try:
                # Owned by the login session, so the key lives as long as the store.
                return _KeyView(self._login.session, wrapping_handle).unwrap_key(
                    object_class,
                    key_type,
                    wrapped,
                    mechanism=WRAP_MECHANISM,
                    store=False,
                    capabilities=capabilities,
                    template=template,
                )
            except p11e.PKCS11Error as exc:
                error = type(exc).__name__
        raise HsmError(f"cannot unwrap key material: {error}")

    def _evict_kek(self, kek: str) -> None:
        """Drop the KEK's cached handles and destroy every cached key unwrapped under it
        (caller holds the login's ``kek_lock``)."""
        if self._pid != os.getpid():
            return
        with self._login.lock, self._cache_lock:
            self._keks.pop(kek, None)
            doomed = [mid for mid, cached in self._unwrapped.items() if cached.kek == kek]
            for material_id in doomed:
                with suppress(p11e.PKCS11Error):
                    self._unwrapped.pop(material_id).key.destroy()

    # -- KeyStore ---------------------------------------------------------------------

    def generate_symmetric_key(self, kek: str | None = None) -> MaterialRef:
        """Generate an AES-256 key in the HSM and return it wrapped under the KEK
        labelled ``kek``, or under the domain key when ``kek`` is None.

        A missing KEK is created first (a token object: about 10 ms, once per KMS key),
        also after ``destroy_kek`` (see the module notes). The key exists in plaintext
        only inside the HSM, as a transient session object destroyed right after
        wrapping. Raises HsmError when the label is invalid or the HSM fails.
        """
        return self._generate_wrapped(
            kek, KeyType.AES, 256, Mechanism.AES_KEY_GEN, MechanismFlag(0), AES_KIND
        )

    def generate_hmac_key(self, key_spec: str, kek: str) -> MaterialRef:
        """Generate an HMAC key (``HMAC_224``/``256``/``384``/``512``: a generic secret of
        28/32/48/64 bytes) in the HSM and return it wrapped under the KEK labelled
        ``kek`` (created when missing, as by ``generate_symmetric_key``); ``kind`` is
        ``key_spec``.

        The key exists in plaintext only inside the HSM, as a sensitive SIGN/VERIFY
        session object destroyed right after wrapping. Raises HsmError for an unknown
        key spec, an invalid label, or when the HSM fails.
        """
        size = HMAC_KEY_BYTES.get(key_spec) if isinstance(key_spec, str) else None
        if size is None:
            raise HsmError("unsupported HMAC key spec")
        check_kek_label(kek)
        return self._generate_wrapped(
            kek,
            KeyType.GENERIC_SECRET,
            size * 8,
            Mechanism.GENERIC_SECRET_KEY_GEN,
            MechanismFlag.SIGN | MechanismFlag.VERIFY,
            key_spec,
        )

    def _generate_wrapped(
        self,
        kek: str | None,
        key_type: KeyType,
        bits: int,
        mechanism: Mechanism,
        capabilities: MechanismFlag,
        kind: str,
    ) -> MaterialRef:
        """Generate a transient sensitive session key, wrap it under the KEK ``kek``
        (created when missing) or the domain key, destroy it. Raises HsmError."""
        wrapping = self._domain_handle if kek is None else self._kek_handles(kek, create=True)[0]
        try:
            with self._session() as session:
                key = session.generate_key(
                    key_type,
                    bits,
                    store=False,
                    mechanism=mechanism,
                    capabilities=capabilities,
                    template={
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: True,  # by wrapping only: it is sensitive
                    },
                )
                try:
                    wrapped: bytes = _KeyView(session, wrapping).wrap_key(
                        key, mechanism=WRAP_MECHANISM
                    )
                finally:
                    with suppress(p11e.PKCS11Error):
                        key.destroy()  # a session object: dies with the session at the latest
        except p11e.PKCS11Error as exc:
            raise HsmError(f"key generation failed: {type(exc).__name__}") from None
        return MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped, kek=kek, kind=kind
        )

    def generate_key_pair(
        self, key_spec: str, kek: str, key_usage: str = SIGN_VERIFY
    ) -> tuple[MaterialRef, bytes]:
        """Generate a key pair in the HSM; return the private key wrapped under the KEK
        labelled ``kek`` (created when missing, as by ``generate_symmetric_key``) and the
        public key as DER SubjectPublicKeyInfo.

        ``key_usage`` (AWS KMS KeyUsage): ``SIGN_VERIFY`` (``RSA_2048``/``3072``/``4096``,
        ``ECC_NIST_P256``/``P384``/``P521``, ``ECC_SECG_P256K1``; private key SIGN only;
        ``kind`` = ``key_spec``), ``ENCRYPT_DECRYPT`` (RSA only; DECRYPT only; ``kind`` =
        ``"<spec>:ENCRYPT_DECRYPT"``), ``KEY_AGREEMENT`` (``ECC_NIST_*`` only; DERIVE
        only; ``kind`` = ``"<spec>:KEY_AGREEMENT"``).

        Both keys exist only as session objects, destroyed right after wrapping; the
        private key is sensitive and extractable only so that it can be wrapped. RSA
        keys have e = 65537. Raises HsmError for an unknown key spec or usage, a
        combination AWS KMS does not allow, an invalid label, or when the HSM fails.
        """
        kind = asymmetric_kind(key_spec, key_usage)
        check_kek_label(kek)
        wrapping = self._kek_handles(kek, create=True)[0]
        private_template: dict[Attribute, Any] = {
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,  # by wrapping only: it is sensitive
            Attribute.SIGN_RECOVER: False,
        }
        capabilities = {
            SIGN_VERIFY: MechanismFlag.SIGN | MechanismFlag.VERIFY,
            ENCRYPT_DECRYPT: MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            KEY_AGREEMENT: MechanismFlag.DERIVE,
        }[key_usage]
        try:
            with self._session() as session:
                public, private = _generate_pair(session, key_spec, capabilities, private_template)
                try:
                    public_der = _public_key_der(key_spec, public)
                    wrapped: bytes = _KeyView(session, wrapping).wrap_key(
                        private, mechanism=WRAP_MECHANISM
                    )
                finally:
                    for key in (private, public):
                        with suppress(p11e.PKCS11Error):
                            key.destroy()  # session objects: die with the session at the latest
        except p11e.PKCS11Error as exc:
            raise HsmError(f"key pair generation failed: {type(exc).__name__}") from None
        material = MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(),
            wrapped=wrapped,
            kek=kek,
            kind=kind,
        )
        return material, public_der

    def generate_data_key_pair(self, key_pair_spec: str) -> tuple[bytes, bytes]:
        """A data key pair as AWS KMS GenerateDataKeyPair makes it: ``(private key as
        DER PKCS#8, public key as DER SubjectPublicKeyInfo)`` for ``RSA_2048``/``3072``/
        ``4096`` (e = 65537), ``ECC_NIST_P256``/``P384``/``P521`` or ``ECC_SECG_P256K1``.

        The pair is generated in the HSM (its RNG) as session objects; the private key
        is created non-sensitive and extractable, with no capabilities, so that its
        components can be read (RSA: n, e, d, p, q, d mod (p-1), d mod (q-1), q^-1 mod
        p; EC: the private value, whose curve is checked), and ``cryptography`` builds
        the PKCS#8 encoding from them (checking the RSA components are consistent).
        The public key DER read from the HSM's public object must equal the one derived
        from the private key. Both objects are destroyed before returning, also on
        failure (session objects: they die with the session at the latest).

        Security: unlike every other method of this store, this one returns private
        key material **in plaintext, by design**: a data key pair belongs to the
        caller, as in AWS KMS, which returns it in plaintext too. The caller encrypts it
        at once and never logs or stores it in the clear. The components pass through
        host memory as Python bytes and ints, which cannot be wiped.

        Raises HsmError for an unknown key pair spec, when the HSM fails, or when what
        it returns is inconsistent (the public key does not match the private key).
        """
        if not isinstance(key_pair_spec, str) or key_pair_spec not in ASYMMETRIC_KEY_SPECS:
            raise HsmError("unsupported key pair spec")
        private_template: dict[Attribute, Any] = {
            Attribute.PRIVATE: True,
            # A data key handed to the caller: readable so that it can be returned.
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
            Attribute.SIGN_RECOVER: False,
        }
        try:
            with self._session() as session:
                public, private = _generate_pair(
                    session, key_pair_spec, MechanismFlag(0), private_template
                )
                try:
                    public_der = _public_key_der(key_pair_spec, public)
                    private_key = _read_private_key(key_pair_spec, private)
                finally:
                    for key in (private, public):
                        with suppress(p11e.PKCS11Error):
                            key.destroy()
        except p11e.PKCS11Error as exc:
            raise HsmError(f"data key pair generation failed: {type(exc).__name__}") from None
        derived_public = private_key.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        if not hmac.compare_digest(derived_public, public_der):
            raise HsmError("the HSM returned a public key that does not match the private key")
        private_der = private_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        return private_der, public_der

    def sign(self, material: MaterialRef, signing_algorithm: str, digest: bytes) -> bytes:
        """Sign ``digest`` (the caller hashed the message) with the material's private key
        in the HSM, unwrapped (once, then cached) as a sensitive, non-extractable
        SIGN-only session object. The private key never leaves the HSM.

        Algorithms: ``RSASSA_PSS_SHA_256``/``384``/``512`` (CKM_RSA_PKCS_PSS, MGF1 with
        the same hash, salt length = digest length), ``RSASSA_PKCS1_V1_5_SHA_*``
        (CKM_RSA_PKCS on DigestInfo || digest), ``ECDSA_SHA_256``/``384``/``512``
        (CKM_ECDSA; only with P-256 or secp256k1, P-384, P-521 respectively). Done on the
        host: hashing (by the caller), the DigestInfo prefix, the DER encoding of the
        ECDSA r||s. Returns RSA signatures of modulus length, ECDSA signatures as DER.

        Raises HsmError when the material is not a signing key, the algorithm is unknown
        or not allowed for its key spec, the digest has the wrong length, the material
        cannot be unwrapped (destroyed KEK), or the HSM fails.
        """
        check_signing_algorithm(material.kind, signing_algorithm, digest)
        handle = self._key_handle(material)
        try:
            with self._session() as session:
                return private_key_sign(session, handle, material.kind, signing_algorithm, digest)
        except p11e.PKCS11Error as exc:
            raise HsmError(f"signing failed: {type(exc).__name__}") from None

    def decrypt_rsa(
        self, material: MaterialRef, encryption_algorithm: str, ciphertext: bytes
    ) -> bytes:
        """RSAES-OAEP decryption as AWS KMS does it (``RSAES_OAEP_SHA_1``/``_SHA_256``:
        MGF1 with the same hash, empty label) with an ``ENCRYPT_DECRYPT`` RSA material,
        unwrapped (once, then cached) as a sensitive, non-extractable DECRYPT-only
        session object. The private key never leaves the HSM.

        SHA-1: CKM_RSA_PKCS_OAEP in the HSM. SHA-256: CKM_RSA_PKCS_OAEP with SHA-256
        parameters in the HSM if it accepts them; SoftHSM2 2.6 refuses any hash but
        SHA-1 (CKR_ARGUMENTS_BAD at C_DecryptInit; the refusal is remembered per store),
        and then the HSM performs only the raw private-key operation (CKM_RSA_X_509:
        c^d mod n) and the host does the EME-OAEP decoding (RFC 8017 section 7.1.2,
        :func:`oaep_decode`, without early exits). In that case the padded message
        exists briefly in host memory (as the plaintext always does), never the key.

        Raises InvalidCiphertextError (no detail) when the algorithm is unknown, the
        ciphertext does not have the modulus length, or decryption fails (wrong key, bad
        padding, c >= n). Raises HsmError when the material is not an ENCRYPT_DECRYPT RSA
        key or cannot be unwrapped, or the HSM itself fails.
        """
        asymmetric = split_asymmetric_kind(material.kind)
        if asymmetric is None or asymmetric[1] != ENCRYPT_DECRYPT:
            raise HsmError("key material is not an RSA decryption key")
        entry = (
            RSA_ENCRYPTION_ALGORITHMS.get(encryption_algorithm)
            if isinstance(encryption_algorithm, str)
            else None
        )
        k = RSA_KEY_BITS[asymmetric[0]] // 8
        if (
            entry is None
            or not isinstance(ciphertext, bytes | bytearray | memoryview)
            or len(ciphertext) != k
        ):
            raise InvalidCiphertextError("")
        hash_name, _, hash_mechanism, mgf = entry
        data = bytes(ciphertext)
        handle = self._key_handle(material)
        try:
            with self._session() as session:
                view = _PrivateKeyView(session, handle, KeyType.RSA)
                if hash_name == "sha1" or not self._oaep_refused.get(hash_name, False):
                    try:
                        out: bytes = view.decrypt(
                            data,
                            mechanism=Mechanism.RSA_PKCS_OAEP,
                            mechanism_param=(hash_mechanism, mgf, None),
                        )
                        return out
                    except _OAEP_REFUSED:
                        if hash_name == "sha1":
                            raise
                        self._oaep_refused[hash_name] = True
                raw: bytes = view.decrypt(data, mechanism=Mechanism.RSA_X_509)
        except _HSM_FAILURES as exc:
            raise HsmError(f"decryption failed in the HSM: {type(exc).__name__}") from None
        except p11e.PKCS11Error:
            raise InvalidCiphertextError("") from None
        if len(raw) < k:  # an HSM may strip leading zero bytes of the integer
            raw = bytes(k - len(raw)) + raw
        plaintext = oaep_decode(raw, k, hash_name)
        if plaintext is None:
            raise InvalidCiphertextError("")
        return plaintext

    # -- importing key material (GetParametersForImport / ImportKeyMaterial) -----------

    def new_import_wrapping_key(self, wrapping_key_spec: str) -> tuple[MaterialRef, bytes]:
        """An RSA key pair (``RSA_2048``/``3072``/``4096``, e = 65537) generated in the
        HSM for GetParametersForImport. The private key (sensitive, DECRYPT and UNWRAP
        only, extractable only so that it can be wrapped) is wrapped under the *domain
        key* (``kek`` None: the import token outlives any one KMS key's KEK lookups and
        must survive restarts; the ledger keeps the blob), ``kind`` is
        ``"IMPORT:<spec>"``; the public key leaves as DER SubjectPublicKeyInfo. Both
        session objects are destroyed right after wrapping.

        Raises HsmError for an unknown key spec or when the HSM fails.
        """
        if not isinstance(wrapping_key_spec, str) or wrapping_key_spec not in RSA_KEY_BITS:
            raise HsmError("unsupported wrapping key spec")
        self._check_open()
        try:
            with self._session() as session:
                public, private = session.generate_keypair(
                    KeyType.RSA,
                    RSA_KEY_BITS[wrapping_key_spec],
                    store=False,
                    mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                    capabilities=MechanismFlag.ENCRYPT
                    | MechanismFlag.WRAP
                    | MechanismFlag.DECRYPT
                    | MechanismFlag.UNWRAP,
                    public_template={
                        Attribute.PUBLIC_EXPONENT: RSA_PUBLIC_EXPONENT.to_bytes(3, "big"),
                        Attribute.VERIFY_RECOVER: False,
                    },
                    private_template={
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: True,  # by wrapping only: it is sensitive
                        Attribute.SIGN_RECOVER: False,
                    },
                )
                try:
                    public_der = _public_key_der(wrapping_key_spec, public)
                    wrapped: bytes = _KeyView(session, self._domain_handle).wrap_key(
                        private, mechanism=WRAP_MECHANISM
                    )
                finally:
                    for key in (private, public):
                        with suppress(p11e.PKCS11Error):
                            key.destroy()
        except p11e.PKCS11Error as exc:
            raise HsmError(f"import wrapping key generation failed: {type(exc).__name__}") from None
        material = MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(),
            wrapped=wrapped,
            kek=None,
            kind=f"{IMPORT_KIND_PREFIX}{wrapping_key_spec}",
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
        """Unwrap imported key material with the import wrapping key ``wrapping`` and
        return it wrapped under the KEK ``kek`` (created when missing), as a backing key
        of ``kind`` (``"AES"``: 32 bytes; ``HMAC_224`` 28-64, ``HMAC_256`` 32-64,
        ``HMAC_384`` 48-128, ``HMAC_512`` 64-128 bytes, the lengths AWS KMS imports).

        How each wrapping algorithm runs (SoftHSM2 2.6 has no CKM_RSA_AES_KEY_WRAP and
        no OAEP with SHA-256, measured):

        * ``RSAES_OAEP_SHA_1``: C_UnwrapKey with CKM_RSA_PKCS_OAEP (SHA-1, MGF1-SHA-1, no
          label) straight into a sensitive session object. The material never exists
          in plaintext on the host.
        * ``RSAES_OAEP_SHA_256``: C_UnwrapKey with SHA-256 OAEP parameters if the HSM
          accepts them; otherwise (SoftHSM2, remembered per store) the HSM does only the
          raw RSA operation (CKM_RSA_X_509), the host decodes EME-OAEP
          (:func:`oaep_decode`) and creates the sensitive session object from the bytes
          (C_CreateObject). **For this path the imported material passes through host
          memory briefly**: the host's own copy is a bytearray zeroed right after, but
          the immutable intermediates of the decoding and of python-pkcs11's template
          encoding are freed, not wiped. Prefer the SHA-1 algorithms for that reason.
        * ``RSA_AES_KEY_WRAP_SHA_1``/``_256`` (AWS's format: the first modulus-length
          bytes are the RSA-OAEP encryption of an ephemeral AES-256 key, the rest the
          material wrapped under it with RFC 5649): the ephemeral key is unwrapped into
          the HSM as above (SHA-256: through the host, so the *ephemeral key*, not the
          material, passes through host memory), then the material is unwrapped in the
          HSM with CKM_AES_KEY_WRAP_PAD. SoftHSM2's 0x210A *unwrap* is exact RFC 5649
          for every length, also those that are not a multiple of 8 (measured: 28, 29,
          100 bytes come back exactly); only its *wrap* zero-pads such keys (see the
          module notes), so no host-side RFC 5649 unwrap is needed.

        Length check without reading the key (SoftHSM2 reports CKA_VALUE_LEN 0 for
        unwrapped keys and refuses it in unwrap templates): the lower bound is the
        minimum key size of the HMAC mechanism of the same length (C_SignInit with
        CKM_SHA256_HMAC refuses keys shorter than 32 bytes, etc.; AWS's minimums equal
        the hash lengths), the upper bound is read from the length of the wrapped blob
        (RFC 5649 pads to a multiple of 8; the maxima are multiples of 8). An HSM
        without HMAC minimum key sizes would accept material shorter than the minimum.

        Every transient object (ephemeral key, unwrapped material) is a session object
        destroyed before returning. Raises InvalidCiphertextError("") when the material
        does not unwrap (wrong wrapping key, corrupted, wrong length of the encrypted
        data); ValidationError when the material's length is wrong for ``kind``;
        HsmError for an unknown algorithm or kind, a ``wrapping`` that is not an import
        wrapping key, an invalid KEK label, or when the HSM fails.
        """
        spec = import_wrapping_spec(wrapping.kind) if isinstance(wrapping.kind, str) else None
        if spec is None or wrapping.kek is not None:
            raise HsmError("key material is not an import wrapping key")
        entry = (
            IMPORT_WRAPPING_ALGORITHMS.get(wrapping_algorithm)
            if isinstance(wrapping_algorithm, str)
            else None
        )
        if entry is None:
            raise HsmError("unsupported wrapping algorithm")
        lengths = IMPORT_KEY_LENGTHS.get(kind) if isinstance(kind, str) else None
        if lengths is None:
            raise HsmError("unsupported kind of imported key material")
        check_kek_label(kek)
        if not isinstance(encrypted_key_material, bytes | bytearray | memoryview):
            raise InvalidCiphertextError("")
        oaep_algorithm, aes_wrapped = entry
        min_len, max_len, size_mechanism = lengths
        k = RSA_KEY_BITS[spec] // 8
        data = bytes(encrypted_key_material)
        rsa_part, kwp_part = data[:k], data[k:]
        if (
            len(rsa_part) != k
            or (aes_wrapped and (len(kwp_part) < 2 * KWP_OVERHEAD or len(kwp_part) % KWP_OVERHEAD))
            or (not aes_wrapped and kwp_part)
        ):
            raise InvalidCiphertextError("")
        private = self._key_handle(wrapping)
        kek_handle = self._kek_handles(kek, create=True)[0]
        with self._session() as session:
            transient: list[Any] = []
            try:
                if aes_wrapped:
                    ephemeral = self._rsa_unwrap_secret(
                        session, private, oaep_algorithm, rsa_part, KeyType.AES, None
                    )
                    transient.append(ephemeral)
                    secret = self._aes_unwrap_secret(session, int(ephemeral.handle), kwp_part)
                else:
                    secret = self._rsa_unwrap_secret(
                        session,
                        private,
                        oaep_algorithm,
                        rsa_part,
                        KeyType.GENERIC_SECRET,
                        (kind, min_len, max_len),
                    )
                transient.append(secret)
                try:
                    _MacKeyView(session, int(secret.handle)).sign(b"", mechanism=size_mechanism)
                except p11e.KeySizeRange:
                    raise ValidationError(_import_length_message(kind, min_len, max_len)) from None
                wrapped: bytes = _KeyView(session, kek_handle).wrap_key(
                    secret, mechanism=WRAP_MECHANISM
                )
            except p11e.PKCS11Error as exc:
                raise HsmError(f"importing key material failed: {type(exc).__name__}") from None
            finally:
                for key in reversed(transient):
                    with suppress(p11e.PKCS11Error):
                        key.destroy()
        if len(wrapped) - KWP_OVERHEAD > max_len:
            raise ValidationError(_import_length_message(kind, min_len, max_len))
        return MaterialRef(
            material_id=hashlib.sha256(wrapped).hexdigest(), wrapped=wrapped, kek=kek, kind=kind
        )

    def _rsa_unwrap_secret(
        self,
        session: Any,
        private: int,
        oaep_algorithm: str,
        ciphertext: bytes,
        key_type: KeyType,
        host_lengths: tuple[str, int, int] | None,
    ) -> Any:
        """RSA-OAEP-unwrap ``ciphertext`` with the import private key into a sensitive
        session secret key: a generic secret with SIGN (the material; extractable only
        by wrapping) or, with ``key_type`` AES, the ephemeral key (UNWRAP only,
        non-extractable, must be 32 bytes on the host path). See
        :meth:`import_key_material` for the SHA-256 host path. ``host_lengths`` is
        ``(kind, minimum, maximum)``, checked when the host sees the bytes.

        Raises InvalidCiphertextError("") when unwrapping fails, ValidationError for a
        wrong length seen on the host, HsmError when the HSM itself fails.
        """
        hash_name, _, hash_mechanism, mgf = RSA_ENCRYPTION_ALGORITHMS[oaep_algorithm]
        if key_type == KeyType.AES:
            capabilities = MechanismFlag.UNWRAP
            template: dict[Attribute, Any] = {
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            }
        else:
            capabilities = MechanismFlag.SIGN
            template = {
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True,  # by wrapping only: it is sensitive
            }
        view = _UnwrapKeyView(session, private, KeyType.RSA)
        try:
            if hash_name == "sha1" or not self._oaep_refused.get(hash_name, False):
                try:
                    return view.unwrap_key(
                        ObjectClass.SECRET_KEY,
                        key_type,
                        ciphertext,
                        mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=(hash_mechanism, mgf, None),
                        store=False,
                        capabilities=capabilities,
                        template=template,
                    )
                except _OAEP_REFUSED:
                    if hash_name == "sha1":
                        raise
                    self._oaep_refused[hash_name] = True
            raw: bytes = view.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509)
        except _HSM_FAILURES as exc:
            raise HsmError(f"unwrapping failed in the HSM: {type(exc).__name__}") from None
        except p11e.PKCS11Error:
            raise InvalidCiphertextError("") from None
        k = len(ciphertext)
        if len(raw) < k:  # an HSM may strip leading zero bytes of the integer
            raw = bytes(k - len(raw)) + raw
        decoded = oaep_decode(raw, k, hash_name)
        del raw
        if decoded is None:
            raise InvalidCiphertextError("")
        value = bytearray(decoded)
        del decoded
        try:
            if key_type == KeyType.AES and len(value) != EPHEMERAL_KEY_BYTES:
                raise InvalidCiphertextError("")
            if host_lengths is not None and not host_lengths[1] <= len(value) <= host_lengths[2]:
                raise ValidationError(_import_length_message(*host_lengths))
            template.update(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: key_type,
                    Attribute.TOKEN: False,
                    Attribute.VALUE: value,
                    **{attr: attr == _CAPABILITY_ATTRIBUTE[capabilities] for attr in _SECRET_CAPS},
                }
            )
            try:
                return session.create_object(template)
            except p11e.PKCS11Error as exc:
                raise HsmError(
                    f"cannot create the imported key in the HSM: {type(exc).__name__}"
                ) from None
        finally:
            value[:] = bytes(len(value))

    def _aes_unwrap_secret(self, session: Any, ephemeral: int, wrapped: bytes) -> Any:
        """C_UnwrapKey (CKM_AES_KEY_WRAP_PAD, RFC 5649) of the material under the
        ephemeral key into a sensitive generic secret with SIGN, extractable only by
        wrapping. Raises InvalidCiphertextError("") or HsmError (HSM failure)."""
        try:
            return _UnwrapKeyView(session, ephemeral, KeyType.AES).unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                wrapped,
                mechanism=WRAP_MECHANISM,
                store=False,
                capabilities=MechanismFlag.SIGN,
                template={
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True,  # by wrapping only: it is sensitive
                },
            )
        except _HSM_FAILURES as exc:
            raise HsmError(f"unwrapping failed in the HSM: {type(exc).__name__}") from None
        except p11e.PKCS11Error:
            raise InvalidCiphertextError("") from None

    def derive_shared_secret(self, material: MaterialRef, peer_public_key_der: bytes) -> bytes:
        """ECDH as AWS KMS DeriveSharedSecret: CKM_ECDH1_DERIVE with KDF NULL in the HSM,
        between the ``KEY_AGREEMENT`` material's private key (unwrapped once, then cached,
        as a sensitive, non-extractable DERIVE-only session object) and the peer's
        public key; returns the raw shared secret (the x-coordinate of the shared point,
        32/48/66 bytes for P-256/384/521).

        The secret is derived as a generic-secret session object, created non-sensitive
        and extractable only so that its value can be read (returning it is the point
        of the operation), with no capabilities; it is destroyed right after reading.

        Security: the result is secret: never log or store it.
        Raises ValidationError when ``peer_public_key_der`` is not a DER
        SubjectPublicKeyInfo of an EC key on the material's curve; HsmError when the
        material is not a KEY_AGREEMENT key or cannot be unwrapped, or the HSM fails.
        """
        asymmetric = split_asymmetric_kind(material.kind)
        if asymmetric is None or asymmetric[1] != KEY_AGREEMENT:
            raise HsmError("key material is not a key agreement key")
        curve_name, coordinate_len = EC_CURVES[asymmetric[0]]
        try:
            peer = load_der_public_key(bytes(peer_public_key_der))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValidationError(
                "the public key must be a DER-encoded SubjectPublicKeyInfo"
            ) from None
        if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != curve_name:
            raise ValidationError(
                f"the public key must be an EC public key on the curve of the key spec "
                f"{asymmetric[0]}"
            )
        # cryptography has checked the point is on the curve; the HSM gets it uncompressed.
        point = peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        handle = self._key_handle(material)
        try:
            with self._session() as session:
                secret = _PrivateKeyView(session, handle, KeyType.EC).derive_key(
                    KeyType.GENERIC_SECRET,
                    coordinate_len * 8,
                    store=False,
                    capabilities=MechanismFlag(0),
                    mechanism=Mechanism.ECDH1_DERIVE,
                    mechanism_param=(KDF.NULL, None, point),
                    template={
                        Attribute.PRIVATE: True,
                        # Readable only so that the value can be returned, then destroyed.
                        Attribute.SENSITIVE: False,
                        Attribute.EXTRACTABLE: True,
                    },
                )
                try:
                    value = bytes(secret[Attribute.VALUE])
                finally:
                    with suppress(p11e.PKCS11Error):
                        secret.destroy()
        except p11e.PKCS11Error as exc:
            raise HsmError(f"key agreement failed: {type(exc).__name__}") from None
        if len(value) != coordinate_len:
            raise HsmError("the HSM returned a shared secret of the wrong length")
        return value

    def destroy_kek(self, kek: str) -> None:
        """Destroy every token object labelled ``kek`` (a KEK), then, in every store of
        this process on the token, drop its cached handles and destroy every cached key
        unwrapped under it. Afterwards material wrapped under it cannot be used: it
        raises HsmError("key material was destroyed"), in any store or process.

        Idempotent: a missing KEK is fine. Raises HsmError when the label is invalid,
        the store is closed, or the HSM fails (then nothing is evicted; retry).
        """
        check_kek_label(kek)
        self._check_open()
        login = self._login
        with login.kek_lock:
            try:
                session = self._rw_session()
                try:
                    for key in list(
                        session.get_objects(
                            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: kek}
                        )
                    ):
                        key.destroy()
                finally:
                    with suppress(p11e.PKCS11Error):
                        session.close()
            except p11e.PKCS11Error as exc:
                raise HsmError(
                    f"cannot destroy the key-encryption key: {type(exc).__name__}"
                ) from None
            for store in list(login.stores):
                store._evict_kek(kek)

    # -- ledger signing keys ---------------------------------------------------------

    def generate_ledger_signing_key(self, label: str) -> bytes:
        """Generate an Ed25519 key pair on the token (CKM_EC_EDWARDS_KEY_PAIR_GEN,
        CKA_EC_PARAMS id-Ed25519): the private key a token object labelled ``label``,
        private, sensitive, non-extractable, non-modifiable, SIGN only; the public key a
        token object with the same label (VERIFY only) and the same random CKA_ID.
        Returns the raw 32-byte public key; the pair is cached by this store.

        The pair is checked (a probe signature must verify) before it is returned; if it
        does not, both objects are destroyed. Raises HsmError when the label is invalid,
        a key (private or public) with that label already exists on the token, the store
        is closed, or the token cannot generate it.
        """
        check_ledger_signing_label(label)
        self._check_open()
        login = self._login
        with login.kek_lock:
            try:
                session = self._rw_session()
                try:
                    private, public = _find_ledger_objects(session, label)
                    if private or public:
                        raise HsmError("a ledger signing key with that label already exists")
                    params = session.create_domain_parameters(
                        KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_EC_PARAMS}, local=True
                    )
                    public_obj, private_obj = params.generate_keypair(
                        id=os.urandom(KEK_ID_LEN),
                        label=label,
                        store=True,
                        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                        public_template={
                            Attribute.VERIFY_RECOVER: False,
                            Attribute.MODIFIABLE: False,
                        },
                        private_template={
                            Attribute.PRIVATE: True,
                            Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False,
                            Attribute.SIGN_RECOVER: False,
                            Attribute.MODIFIABLE: False,
                        },
                    )
                    try:
                        key = _LedgerKey(
                            int(private_obj.handle),
                            ed25519_public_key(public_obj[Attribute.EC_POINT]),
                        )
                        _check_ledger_pair(session, key)
                    except BaseException:
                        for obj in (private_obj, public_obj):
                            with suppress(p11e.PKCS11Error):
                                obj.destroy()
                        raise
                finally:
                    with suppress(p11e.PKCS11Error):
                        session.close()
            except p11e.PKCS11Error as exc:
                raise HsmError(
                    f"cannot generate the ledger signing key: {type(exc).__name__}"
                ) from None
            with self._cache_lock:
                self._ledger_keys[label] = key
        return key.public_key

    def _ledger_key(self, label: str) -> _LedgerKey:
        """The ledger signing key labelled ``label``: cached, else looked up (and
        checked) once. Raises HsmError when the label is invalid, the store is closed,
        there is no such key ("ledger signing key not found"), what the token holds under
        the label is not a sound Ed25519 pair, or the HSM fails."""
        check_ledger_signing_label(label)
        self._check_open()
        with self._cache_lock:
            key = self._ledger_keys.get(label)
        if key is not None:
            return key
        with self._login.kek_lock:
            with self._cache_lock:
                key = self._ledger_keys.get(label)
            if key is not None:
                return key
            try:
                with self._session() as session:
                    found = _find_ledger_key(session, label)
            except p11e.PKCS11Error as exc:
                raise HsmError(
                    f"cannot look up the ledger signing key: {type(exc).__name__}"
                ) from None
            if found is None:
                raise HsmError("ledger signing key not found")
            with self._cache_lock:
                self._ledger_keys[label] = found
        return found

    def _evict_ledger_key(self, label: str, key: _LedgerKey | None = None) -> None:
        """Drop the cached ledger signing key ``label`` (only if it is ``key``, when
        given)."""
        if self._pid != os.getpid():
            return
        with self._cache_lock:
            if key is None or self._ledger_keys.get(label) == key:
                self._ledger_keys.pop(label, None)

    def ledger_public_key(self, label: str) -> bytes:
        """The raw 32-byte Ed25519 public key of the ledger signing key ``label``
        (cached after the first lookup).

        Raises HsmError when the label is invalid, the key does not exist, the store is
        closed, or the HSM fails.
        """
        return self._ledger_key(label).public_key

    def ledger_sign(self, label: str, message: bytes) -> bytes:
        """The 64-byte pure Ed25519 signature (CKM_EDDSA, RFC 8032: deterministic) of
        ``message`` by the ledger signing key ``label``, computed in the HSM.

        A cached handle the HSM no longer knows (the key was destroyed by another
        process) is dropped and the key looked up again, once. Raises HsmError when the
        label is invalid, ``message`` is not bytes, the key does not exist, the store is
        closed, or the HSM fails.
        """
        if not isinstance(message, bytes | bytearray | memoryview):
            raise HsmError("the message to sign must be bytes")
        data = bytes(message)
        for attempt in range(2):
            key = self._ledger_key(label)
            try:
                with self._session() as session:
                    return ed25519_sign(session, key.private, data)
            except (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid) as exc:
                self._evict_ledger_key(label, key)
                if attempt:
                    raise HsmError(f"ledger signing failed: {type(exc).__name__}") from None
            except p11e.PKCS11Error as exc:
                raise HsmError(f"ledger signing failed: {type(exc).__name__}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def destroy_ledger_signing_key(self, label: str) -> None:
        """Destroy every private and public key object labelled ``label`` on the token,
        then drop the label from the cache of every store of this process on the token.

        Idempotent: a missing key is fine. Raises HsmError when the label is invalid,
        the store is closed, or the HSM fails (the caches are dropped anyway; retry).
        """
        check_ledger_signing_label(label)
        self._check_open()
        login = self._login
        with login.kek_lock:
            try:
                session = self._rw_session()
                try:
                    private, public = _find_ledger_objects(session, label)
                    for obj in private + public:  # private first: never a key without its pair
                        obj.destroy()
                finally:
                    with suppress(p11e.PKCS11Error):
                        session.close()
            except p11e.PKCS11Error as exc:
                raise HsmError(
                    f"cannot destroy the ledger signing key: {type(exc).__name__}"
                ) from None
            finally:
                for store in list(login.stores):
                    store._evict_ledger_key(label)

    def encrypt(self, material: MaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM in the HSM with a random 96-bit IV; returns ``(iv, ct || tag)``.

        Caveat: random IVs bound the safe number of encryptions per key to about 2^32
        (NIST SP 800-38D); rotate backing keys well before that.
        Raises HsmError when the HSM fails, the material is not an AES key or cannot be
        unwrapped.
        """
        _require_aes(material)
        handle = self._key_handle(material)
        iv = os.urandom(IV_LEN)
        try:
            with self._session() as session:
                out: bytes = _KeyView(session, handle).encrypt(
                    plaintext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(iv, aad, TAG_LEN * 8),
                )
        except p11e.PKCS11Error as exc:
            raise HsmError(f"encryption failed: {type(exc).__name__}") from None
        return iv, out

    def decrypt(self, material: MaterialRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM decryption in the HSM.

        Raises InvalidCiphertextError (no detail) when the IV is not 12 bytes, the
        ciphertext is shorter than a tag, or authentication fails (wrong key, AAD, IV,
        or any changed byte). Raises HsmError when the HSM itself fails or the material
        is not an AES key or cannot be unwrapped.
        """
        _require_aes(material)
        if len(iv) != IV_LEN or len(ciphertext) < TAG_LEN:
            raise InvalidCiphertextError("")
        handle = self._key_handle(material)
        try:
            with self._session() as session:
                out: bytes = _KeyView(session, handle).decrypt(
                    ciphertext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(iv, aad, TAG_LEN * 8),
                )
        except _HSM_FAILURES as exc:
            raise HsmError(f"decryption failed in the HSM: {type(exc).__name__}") from None
        except p11e.PKCS11Error:
            raise InvalidCiphertextError("") from None
        return out

    def generate_mac(self, material: MaterialRef, mac_algorithm: str, message: bytes) -> bytes:
        """HMAC (``HMAC_SHA_224``/``256``/``384``/``512``) of ``message`` in the HSM, with
        the material unwrapped (once, then cached) as a SIGN-only generic secret.

        Raises HsmError when the material is not an HMAC key, the algorithm is unknown
        or does not belong to the material's key spec, the material cannot be unwrapped
        (destroyed KEK), or the HSM fails.
        """
        if material.kind not in HMAC_KEY_BYTES:
            raise HsmError("key material is not an HMAC key")
        _, key_spec, _ = hmac_mechanism(mac_algorithm)
        if key_spec != material.kind:
            raise HsmError("the MAC algorithm does not match the HMAC key spec")
        handle = self._key_handle(material)
        try:
            with self._session() as session:
                return hmac_sign(session, handle, mac_algorithm, message)
        except p11e.PKCS11Error as exc:
            raise HsmError(f"MAC generation failed: {type(exc).__name__}") from None

    def generate_random(self, number_of_bytes: int) -> bytes:
        """Random bytes from the HSM's RNG (C_GenerateRandom). Raises HsmError."""
        if number_of_bytes < 1:
            raise HsmError("number_of_bytes must be positive")
        try:
            with self._session() as session:
                out: bytes = session.generate_random(number_of_bytes * 8)
        except p11e.PKCS11Error as exc:
            raise HsmError(f"random generation failed: {type(exc).__name__}") from None
        if len(out) != number_of_bytes:
            raise HsmError("the HSM returned the wrong number of random bytes")
        return out

    def forget(self, material_id: str) -> None:
        """Destroy the cached unwrapped session object of this material, if any."""
        if self._closed or self._pid != os.getpid():
            return
        with self._login.lock, self._cache_lock:
            cached = self._unwrapped.pop(material_id, None)
            if cached is not None:
                with suppress(p11e.PKCS11Error):
                    cached.key.destroy()

    def close(self) -> None:
        """Close pooled sessions, destroy cached unwrapped keys and release the login.

        Idempotent. Calls still in flight on other threads may fail with HsmError.
        """
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            if self._pid != os.getpid():
                return  # the parent's sessions are not ours to close
            for session in list(self._idle):
                self._discard(session)
            self._idle.clear()
        with self._login.kek_lock:
            self._login.stores.discard(self)
        with self._login.lock, self._cache_lock:
            for cached in self._unwrapped.values():
                with suppress(p11e.PKCS11Error):
                    cached.key.destroy()
            self._unwrapped.clear()
            self._keks.clear()
            self._ledger_keys.clear()
        _release_login(self._module, self._token_label, self._login)


# The capability attributes of a secret key created from host bytes: all False but
# the one the object is for (python-pkcs11's create_object sets none by itself).
_SECRET_CAPS: tuple[Attribute, ...] = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.DERIVE,
)
_CAPABILITY_ATTRIBUTE: dict[MechanismFlag, Attribute] = {
    MechanismFlag.SIGN: Attribute.SIGN,
    MechanismFlag.UNWRAP: Attribute.UNWRAP,
}


def _import_length_message(kind: str, min_len: int, max_len: int) -> str:
    if min_len == max_len:
        return f"imported key material for {kind} must be {min_len} bytes long"
    return f"imported key material for {kind} must be {min_len} to {max_len} bytes long"


def _require_aes(material: MaterialRef) -> None:
    if material.kind != AES_KIND:
        raise HsmError("key material is not an AES encryption key")


def open_keystore(settings: Settings) -> Pkcs11KeyStore:
    """Open the keystore the settings describe.

    ``settings.pkcs11_module`` None: the embedded SoftHSM2 token in ``settings.data_dir``
    (initialised on first use; PIN from ``settings.hsm_pin`` or the data dir's PIN
    file). Otherwise the given module, token label ``settings.hsm_token`` and
    ``settings.hsm_pin``.

    Raises HsmError when SoftHSM2 is missing, the PIN is missing for an external module,
    or anything in :class:`Pkcs11KeyStore` fails.
    """
    if settings.pkcs11_module is None:
        token = softhsm.ensure_embedded_token(settings.data_dir, settings.hsm_token)
        return Pkcs11KeyStore(
            module=token.module,
            token_label=token.label,
            pin=settings.hsm_pin if settings.hsm_pin is not None else token.pin,
        )
    if not settings.hsm_pin:
        raise HsmError("KEYLEDGER_HSM_PIN is required for an external PKCS#11 module")
    return Pkcs11KeyStore(
        module=settings.pkcs11_module, token_label=settings.hsm_token, pin=settings.hsm_pin
    )


__all__ = [
    "AES_KIND",
    "ASYMMETRIC_KEY_SPECS",
    "DIGEST_INFO_PREFIXES",
    "DOMAIN_KEY_LABEL",
    "EC_CURVES",
    "ED25519_EC_PARAMS",
    "ED25519_PUBLIC_KEY_LEN",
    "ED25519_SIGNATURE_LEN",
    "ENCRYPT_DECRYPT",
    "HMAC_KEY_BYTES",
    "HMAC_MECHANISMS",
    "IMPORT_KEY_LENGTHS",
    "IMPORT_KIND_PREFIX",
    "IMPORT_WRAPPING_ALGORITHMS",
    "KEK_LABEL_PREFIX",
    "KEY_AGREEMENT",
    "KEY_USAGE_SPECS",
    "LEDGER_SIGNING_LABEL_MAX_LEN",
    "LEDGER_SIGNING_LABEL_PREFIX",
    "RSA_ENCRYPTION_ALGORITHMS",
    "RSA_KEY_BITS",
    "SIGNING_ALGORITHMS",
    "SIGN_VERIFY",
    "Pkcs11KeyStore",
    "SigningAlgorithm",
    "asymmetric_kind",
    "check_kek_label",
    "check_ledger_signing_label",
    "check_signing_algorithm",
    "ed25519_public_key",
    "ed25519_sign",
    "hmac_mechanism",
    "hmac_sign",
    "import_wrapping_spec",
    "oaep_decode",
    "open_keystore",
    "private_key_sign",
    "split_asymmetric_kind",
]
