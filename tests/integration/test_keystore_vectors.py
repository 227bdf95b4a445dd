"""Pkcs11KeyStore against published vectors and independent implementations, in SoftHSM2.

* ``generate_data_key_pair``: every AWS key pair spec loads with ``cryptography``, its
  public key equals the returned DER, RSA pairs sign/verify, EC pairs agree (ECDH) with a
  peer; no HSM object is left behind.
* CKM_AES_KEY_WRAP_PAD *unwrap*, as the adapter runs it (``WRAP_MECHANISM``, C_UnwrapKey
  into a session object), on the RFC 5649 section 6 examples (AES-192 KEK), plus a
  round trip against ``cryptography``'s RFC 5649 for 32/48/64-byte keys.
* The RSASSA-PKCS1-v1_5 DigestInfo prefixes, as RFC 8017 section 9.2 note 1 lists them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error

from ledger.errors import HsmError
from ledger.keystore.pkcs11_adapter import (
    DIGEST_INFO_PREFIXES,
    RSA_KEY_BITS,
    SIGNING_ALGORITHMS,
    WRAP_MECHANISM,
    Pkcs11KeyStore,
)
from tests.fakes import FakeKeyStore

pytestmark = pytest.mark.softhsm

CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}
KEY_PAIR_SPECS = [*sorted(RSA_KEY_BITS), *sorted(CURVES)]


# ----------------------------------------------------------------- data key pairs


def _session_objects(store: Pkcs11KeyStore) -> int:
    """How many private/public key objects the token shows this process's sessions."""
    session = store._login.token.open()
    try:
        return sum(
            len(list(session.get_objects({Attribute.CLASS: cls})))
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
        )
    finally:
        session.close()


def _check_pair(spec: str, private_der: bytes, public_der: bytes) -> None:
    private: Any = load_der_private_key(private_der, None)
    assert (
        private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        == public_der
    )
    public: Any = load_der_public_key(public_der)
    message = b"KeyLedger data key pair " + spec.encode()
    if spec in RSA_KEY_BITS:
        assert isinstance(private, rsa.RSAPrivateKey)
        assert private.key_size == RSA_KEY_BITS[spec]
        assert private.private_numbers().public_numbers.e == 65537
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        signature = private.sign(message, pss, hashes.SHA256())
        public.verify(signature, message, pss, hashes.SHA256())  # raises when invalid
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, CURVES[spec])
        peer = ec.generate_private_key(CURVES[spec]())
        ours = private.exchange(ec.ECDH(), peer.public_key())
        assert ours == peer.exchange(ec.ECDH(), public)
        assert len(ours) == (private.curve.key_size + 7) // 8


@pytest.mark.parametrize("spec", KEY_PAIR_SPECS)
def test_data_key_pair_is_consistent(softhsm_keystore: Pkcs11KeyStore, spec: str) -> None:
    before = _session_objects(softhsm_keystore)
    private_der, public_der = softhsm_keystore.generate_data_key_pair(spec)
    _check_pair(spec, private_der, public_der)
    assert _session_objects(softhsm_keystore) == before  # both objects destroyed
    again, _ = softhsm_keystore.generate_data_key_pair(spec)
    assert again != private_der


@pytest.mark.parametrize("spec", KEY_PAIR_SPECS)
def test_fake_data_key_pair_is_consistent(spec: str) -> None:
    _check_pair(spec, *FakeKeyStore().generate_data_key_pair(spec))


@pytest.mark.parametrize("spec", ["RSA_1024", "SYMMETRIC_DEFAULT", "ECC_NIST_P224", "", None])
def test_data_key_pair_unknown_spec(softhsm_keystore: Pkcs11KeyStore, spec: Any) -> None:
    with pytest.raises(HsmError):
        softhsm_keystore.generate_data_key_pair(spec)
    with pytest.raises(HsmError):
        FakeKeyStore().generate_data_key_pair(spec)


# ----------------------------------------------------------------- RFC 5649 (KWP)

# RFC 5649 section 6: KEK, key data, wrapped (AES-192 KEK).
RFC5649_KEK = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
RFC5649_VECTORS = [
    pytest.param(
        "c37b7e6492584340bed12207808941155068f738",
        "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a",
        id="20-byte-key",
    ),
    pytest.param("466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f", id="7-byte-key"),
]


@pytest.fixture
def kwp_session(softhsm_keystore: Pkcs11KeyStore) -> Iterator[Any]:
    """A pooled session of the store (the adapter's unwrap runs on those)."""
    with softhsm_keystore._session() as session:
        yield session


def _aes_kek(session: Any, value: bytes) -> Any:
    """A known AES KEK as a session object, WRAP/UNWRAP only."""
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.VALUE: value,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.DERIVE: False,
        }
    )


def _unwrap_value(kek: Any, wrapped: bytes) -> bytes:
    """C_UnwrapKey with the adapter's mechanism into a readable generic-secret session
    object (readable only for the test), returning its value; the object is destroyed."""
    key = kek.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.GENERIC_SECRET,
        wrapped,
        mechanism=WRAP_MECHANISM,
        store=False,
        capabilities=MechanismFlag.SIGN,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    try:
        return bytes(key[Attribute.VALUE])
    finally:
        key.destroy()


@pytest.mark.parametrize(("key_hex", "wrapped_hex"), RFC5649_VECTORS)
def test_rfc5649_vectors_unwrap_in_softhsm(
    kwp_session: Any, key_hex: str, wrapped_hex: str
) -> None:
    key, wrapped = bytes.fromhex(key_hex), bytes.fromhex(wrapped_hex)
    # The vectors themselves, by an independent implementation.
    assert aes_key_unwrap_with_padding(RFC5649_KEK, wrapped) == key
    assert aes_key_wrap_with_padding(RFC5649_KEK, key) == wrapped
    kek = _aes_kek(kwp_session, RFC5649_KEK)
    try:
        assert _unwrap_value(kek, wrapped) == key  # exact, also for 7 and 20 bytes
        corrupted = bytes([wrapped[0] ^ 1]) + wrapped[1:]
        with pytest.raises(PKCS11Error):  # the RFC 5649 integrity check fails
            _unwrap_value(kek, corrupted)
    finally:
        kek.destroy()


@pytest.mark.parametrize("length", [32, 48, 64])
def test_kwp_round_trip_matches_cryptography(kwp_session: Any, length: int) -> None:
    """AES-256 KEK (as the adapter's KEKs): SoftHSM wraps what cryptography unwraps, and
    unwraps what cryptography wraps, with identical blobs (RFC 5649 is deterministic)."""
    kek_value = os.urandom(32)
    material = os.urandom(length)
    kek = _aes_kek(kwp_session, kek_value)
    try:
        expected = aes_key_wrap_with_padding(kek_value, material)
        assert len(expected) == length + 8
        assert _unwrap_value(kek, expected) == material
        key = kwp_session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True,
                Attribute.SIGN: True,
                Attribute.VALUE: material,
            }
        )
        try:
            wrapped = kek.wrap_key(key, mechanism=WRAP_MECHANISM)
        finally:
            key.destroy()
        assert wrapped == expected
        assert aes_key_unwrap_with_padding(kek_value, wrapped) == material
    finally:
        kek.destroy()


# ----------------------------------------------------------------- RFC 8017 DigestInfo

# RFC 8017 section 9.2, note 1, copied as printed there ("|| H" omitted).
RFC8017_DIGEST_INFO = {
    "SHA-256": "30 31 30 0d 06 09 60 86 48 01 65 03 04 02 01 05 00 04 20",
    "SHA-384": "30 41 30 0d 06 09 60 86 48 01 65 03 04 02 02 05 00 04 30",
    "SHA-512": "30 51 30 0d 06 09 60 86 48 01 65 03 04 02 03 05 00 04 40",
}


@pytest.mark.parametrize(
    ("name", "digest_len"), [("SHA-256", 32), ("SHA-384", 48), ("SHA-512", 64)]
)
def test_digest_info_prefixes_match_rfc8017(name: str, digest_len: int) -> None:
    expected = bytes.fromhex(RFC8017_DIGEST_INFO[name])
    assert DIGEST_INFO_PREFIXES[digest_len] == expected
    bits = name.split("-")[1]
    entry = SIGNING_ALGORITHMS[f"RSASSA_PKCS1_V1_5_SHA_{bits}"]
    assert entry.digest_info == expected
    assert entry.digest_len == digest_len == expected[-1]  # the OCTET STRING length
