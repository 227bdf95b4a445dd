"""Asymmetric signing keys in SoftHSM2 through Pkcs11KeyStore: generate_key_pair and sign.

Every signature made in the HSM is verified with ``cryptography`` against the public key
the store returned, with the exact parameters AWS KMS uses (PSS: MGF1 with the message
hash, salt length = digest length).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pkcs11.exceptions
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, ObjectClass

from ledger.errors import HsmError
from ledger.keystore.pkcs11_adapter import (
    ASYMMETRIC_KEY_SPECS,
    DIGEST_INFO_PREFIXES,
    EC_CURVES,
    RSA_KEY_BITS,
    SIGNING_ALGORITHMS,
    Pkcs11KeyStore,
    open_keystore,
)
from ledger.keystore.port import MaterialRef
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

HASHES: dict[int, hashes.HashAlgorithm] = {
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}
CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}
# AWS KMS: the signing algorithms of each key spec.
RSA_ALGORITHMS = [
    f"RSASSA_{scheme}_SHA_{bits}" for scheme in ("PSS", "PKCS1_V1_5") for bits in (256, 384, 512)
]
ALGORITHMS_OF: dict[str, list[str]] = {
    **{spec: RSA_ALGORITHMS for spec in RSA_KEY_BITS},
    "ECC_NIST_P256": ["ECDSA_SHA_256"],
    "ECC_NIST_P384": ["ECDSA_SHA_384"],
    "ECC_NIST_P521": ["ECDSA_SHA_512"],
    "ECC_SECG_P256K1": ["ECDSA_SHA_256"],
}
CASES = [(spec, alg) for spec in sorted(ALGORITHMS_OF) for alg in ALGORITHMS_OF[spec]]


def _kek() -> str:
    return f"keyledger-kek-{uuid.uuid4()}"


def _digest(alg: str, message: bytes) -> bytes:
    return hashlib.new(f"sha{alg.rsplit('_', 1)[1]}", message).digest()


def _verify(public_der: bytes, alg: str, digest: bytes, signature: bytes) -> None:
    """Raises InvalidSignature unless ``signature`` is AWS KMS's ``alg`` over ``digest``."""
    key: Any = load_der_public_key(public_der)
    hash_ = HASHES[len(digest)]
    if alg.startswith("ECDSA"):
        key.verify(signature, digest, ec.ECDSA(Prehashed(hash_)))
    elif alg.startswith("RSASSA_PSS"):
        pss = padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
        key.verify(signature, digest, pss, Prehashed(hash_))
    else:
        key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hash_))


@pytest.fixture(scope="module")
def pairs(softhsm_keystore: Pkcs11KeyStore) -> dict[str, tuple[MaterialRef, bytes]]:
    """One key pair per key spec, each under its own KEK."""
    return {spec: softhsm_keystore.generate_key_pair(spec, _kek()) for spec in ALGORITHMS_OF}


@pytest.fixture
def second_store(softhsm_settings: Settings) -> Iterator[Pkcs11KeyStore]:
    """Another store on the same token: nothing cached, so it unwraps again."""
    store = open_keystore(softhsm_settings)
    yield store
    store.close()


# ------------------------------------------------------------------------- tables


def test_the_algorithm_table_is_aws_kms_s() -> None:
    assert set(ALGORITHMS_OF) == ASYMMETRIC_KEY_SPECS
    assert set(SIGNING_ALGORITHMS) == {alg for _, alg in CASES}
    for spec, alg in CASES:
        assert spec in SIGNING_ALGORITHMS[alg].key_specs
    for alg, entry in SIGNING_ALGORITHMS.items():
        assert entry.key_specs == {s for s, a in CASES if a == alg}


@pytest.mark.parametrize("size", sorted(DIGEST_INFO_PREFIXES))
def test_digest_info_prefixes_are_what_cryptography_signs(size: int) -> None:
    """RSASSA-PKCS1-v1_5 by ``cryptography``, opened with the public key, ends with
    the adapter's DigestInfo prefix followed by the digest."""
    key = rsa.generate_private_key(65537, 2048)
    digest = os.urandom(size)
    hash_ = HASHES[size]
    signature = key.sign(digest, padding.PKCS1v15(), Prehashed(hash_))
    numbers = key.public_key().public_numbers()
    em = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n).to_bytes(256, "big")
    assert em.endswith(b"\x00" + DIGEST_INFO_PREFIXES[size] + digest)
    assert em.startswith(b"\x00\x01\xff")


# ------------------------------------------------------------------------- generation


@pytest.mark.parametrize("key_spec", sorted(ALGORITHMS_OF))
def test_generated_pair_is_named_by_its_blob_and_public_key_matches_the_spec(
    pairs: dict[str, tuple[MaterialRef, bytes]], key_spec: str
) -> None:
    material, public_der = pairs[key_spec]
    assert material.kind == key_spec
    assert material.kek is not None and material.kek.startswith("keyledger-kek-")
    assert material.material_id == hashlib.sha256(material.wrapped).hexdigest()
    public: Any = load_der_public_key(public_der)
    if key_spec in RSA_KEY_BITS:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == RSA_KEY_BITS[key_spec]
        assert public.public_numbers().e == 65537
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, CURVES[key_spec])
        assert public.curve.name == EC_CURVES[key_spec][0]


def test_two_generated_pairs_differ(softhsm_keystore: Pkcs11KeyStore) -> None:
    kek = _kek()
    a = softhsm_keystore.generate_key_pair("ECC_NIST_P256", kek)
    b = softhsm_keystore.generate_key_pair("ECC_NIST_P256", kek)
    assert a[0].material_id != b[0].material_id and a[1] != b[1]


def test_generation_leaves_no_objects_behind(softhsm_keystore: Pkcs11KeyStore) -> None:
    session = softhsm_keystore._login.token.open()
    try:

        def count() -> int:
            return sum(
                1
                for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                for _ in session.get_objects({Attribute.CLASS: cls, Attribute.TOKEN: False})
            )

        before = count()
        softhsm_keystore.generate_key_pair("RSA_2048", _kek())
        softhsm_keystore.generate_key_pair("ECC_NIST_P384", _kek())
        assert count() == before
    finally:
        session.close()


# ------------------------------------------------------------------------- signing


@pytest.mark.parametrize(("key_spec", "alg"), CASES)
def test_signature_verifies_with_cryptography_against_the_public_key(
    softhsm_keystore: Pkcs11KeyStore,
    pairs: dict[str, tuple[MaterialRef, bytes]],
    key_spec: str,
    alg: str,
) -> None:
    material, public_der = pairs[key_spec]
    digest = _digest(alg, b"message for " + alg.encode())
    signature = softhsm_keystore.sign(material, alg, digest)
    _verify(public_der, alg, digest, signature)
    if key_spec in RSA_KEY_BITS:
        assert len(signature) == RSA_KEY_BITS[key_spec] // 8
    else:
        r, s = decode_dss_signature(signature)  # DER Ecdsa-Sig-Value
        assert r > 0 and s > 0
    other = _digest(alg, b"another message")
    with pytest.raises(InvalidSignature):
        _verify(public_der, alg, other, signature)


@pytest.mark.parametrize("key_spec", sorted(ALGORITHMS_OF))
def test_same_material_signs_in_a_second_store_after_unwrapping_again(
    pairs: dict[str, tuple[MaterialRef, bytes]], second_store: Pkcs11KeyStore, key_spec: str
) -> None:
    material, public_der = pairs[key_spec]
    assert material.material_id not in second_store._unwrapped
    for alg in ALGORITHMS_OF[key_spec]:
        digest = _digest(alg, b"reopened")
        _verify(public_der, alg, digest, second_store.sign(material, alg, digest))
    assert material.material_id in second_store._unwrapped


def test_pkcs1_signatures_are_deterministic_and_pss_ones_are_not(
    softhsm_keystore: Pkcs11KeyStore, pairs: dict[str, tuple[MaterialRef, bytes]]
) -> None:
    material, _ = pairs["RSA_2048"]
    digest = _digest("X_256", b"m")
    pkcs1 = softhsm_keystore.sign(material, "RSASSA_PKCS1_V1_5_SHA_256", digest)
    assert softhsm_keystore.sign(material, "RSASSA_PKCS1_V1_5_SHA_256", digest) == pkcs1
    pss = softhsm_keystore.sign(material, "RSASSA_PSS_SHA_256", digest)
    assert softhsm_keystore.sign(material, "RSASSA_PSS_SHA_256", digest) != pss


@pytest.mark.parametrize(("key_spec", "alg"), CASES)
def test_wrong_digest_length_is_refused(
    softhsm_keystore: Pkcs11KeyStore,
    pairs: dict[str, tuple[MaterialRef, bytes]],
    key_spec: str,
    alg: str,
) -> None:
    material, _ = pairs[key_spec]
    size = SIGNING_ALGORITHMS[alg].digest_len
    for wrong in (b"", os.urandom(size - 1), os.urandom(size + 1), os.urandom(20)):
        with pytest.raises(HsmError, match="digest length"):
            softhsm_keystore.sign(material, alg, wrong)


@pytest.mark.parametrize("key_spec", sorted(ALGORITHMS_OF))
def test_algorithms_of_other_key_specs_are_refused(
    softhsm_keystore: Pkcs11KeyStore, pairs: dict[str, tuple[MaterialRef, bytes]], key_spec: str
) -> None:
    material, _ = pairs[key_spec]
    for alg, entry in SIGNING_ALGORITHMS.items():
        if alg in ALGORITHMS_OF[key_spec]:
            continue
        with pytest.raises(HsmError, match="does not match the key spec"):
            softhsm_keystore.sign(material, alg, os.urandom(entry.digest_len))
    unknown: tuple[Any, ...] = ("ECDSA_SHA_224", "RSASSA_PSS_SHA_1", "SM2DSA", "", None)
    for bad in unknown:
        with pytest.raises(HsmError, match="unsupported signing algorithm"):
            softhsm_keystore.sign(material, bad, os.urandom(32))


def test_non_signing_material_is_refused_by_sign(softhsm_keystore: Pkcs11KeyStore) -> None:
    kek = _kek()
    for material in (
        softhsm_keystore.generate_symmetric_key(kek),
        softhsm_keystore.generate_hmac_key("HMAC_256", kek),
    ):
        with pytest.raises(HsmError, match="not an asymmetric signing key"):
            softhsm_keystore.sign(material, "ECDSA_SHA_256", os.urandom(32))


def test_signing_material_is_refused_by_encrypt_and_generate_mac(
    softhsm_keystore: Pkcs11KeyStore, pairs: dict[str, tuple[MaterialRef, bytes]]
) -> None:
    material, _ = pairs["ECC_NIST_P256"]
    with pytest.raises(HsmError):
        softhsm_keystore.encrypt(material, b"p", b"")
    with pytest.raises(HsmError):
        softhsm_keystore.generate_mac(material, "HMAC_SHA_256", b"m")


def test_material_claiming_another_kind_is_refused(
    second_store: Pkcs11KeyStore, pairs: dict[str, tuple[MaterialRef, bytes]]
) -> None:
    """An EC blob relabelled as RSA: unwrapping as an RSA key fails in the HSM."""
    material, _ = pairs["ECC_NIST_P256"]
    forged = MaterialRef(material.material_id, material.wrapped, material.kek, "RSA_2048")
    with pytest.raises(HsmError):
        second_store.sign(forged, "RSASSA_PSS_SHA_256", os.urandom(32))


@pytest.mark.parametrize("key_spec", ["RSA_1024", "ECC_NIST_P224", "SM2", "HMAC_256", "", None])
def test_unknown_key_spec_is_refused(softhsm_keystore: Pkcs11KeyStore, key_spec: Any) -> None:
    with pytest.raises(HsmError, match="unsupported key spec"):
        softhsm_keystore.generate_key_pair(key_spec, _kek())


def test_invalid_kek_label_is_refused(softhsm_keystore: Pkcs11KeyStore) -> None:
    with pytest.raises(HsmError, match="invalid KEK label"):
        softhsm_keystore.generate_key_pair("ECC_NIST_P256", "not-a-kek")


def test_destroy_kek_makes_signing_material_unusable(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    kek = _kek()
    doomed, _ = softhsm_keystore.generate_key_pair("ECC_NIST_P256", kek)
    softhsm_keystore.sign(doomed, "ECDSA_SHA_256", os.urandom(32))  # cached now
    softhsm_keystore.destroy_kek(kek)
    assert doomed.material_id not in softhsm_keystore._unwrapped
    with pytest.raises(HsmError, match="destroyed"):
        softhsm_keystore.sign(doomed, "ECDSA_SHA_256", os.urandom(32))
    fresh = open_keystore(softhsm_settings)
    try:
        with pytest.raises(HsmError, match="destroyed"):
            fresh.sign(doomed, "ECDSA_SHA_256", os.urandom(32))
    finally:
        fresh.close()


@pytest.mark.parametrize("key_spec", ["RSA_2048", "ECC_NIST_P521"])
def test_unwrapped_private_key_is_sensitive_non_extractable_and_sign_only(
    softhsm_keystore: Pkcs11KeyStore, pairs: dict[str, tuple[MaterialRef, bytes]], key_spec: str
) -> None:
    material, _ = pairs[key_spec]
    alg = ALGORITHMS_OF[key_spec][0]
    softhsm_keystore.sign(material, alg, os.urandom(SIGNING_ALGORITHMS[alg].digest_len))
    handle = softhsm_keystore._unwrapped[material.material_id].key.handle
    session = softhsm_keystore._login.token.open()  # a fresh session, not the owner
    try:
        found = [
            key
            for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if key.handle == handle
        ]
        assert len(found) == 1
        key = found[0]
        attrs = key.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.SIGN,
                Attribute.SIGN_RECOVER,
                Attribute.DECRYPT,
                Attribute.UNWRAP,
                Attribute.DERIVE,
            ]
        )
        assert attrs[Attribute.KEY_TYPE] == (
            KeyType.RSA if key_spec in RSA_KEY_BITS else KeyType.EC
        )
        assert attrs[Attribute.TOKEN] is False and attrs[Attribute.PRIVATE] is True
        assert attrs[Attribute.SENSITIVE] is True and attrs[Attribute.EXTRACTABLE] is False
        assert attrs[Attribute.SIGN] is True
        for attr in (Attribute.SIGN_RECOVER, Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE):
            assert attrs[attr] is False, attr
        secret = Attribute.PRIVATE_EXPONENT if key_spec in RSA_KEY_BITS else Attribute.VALUE
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[secret]
    finally:
        session.close()


# ------------------------------------------------------------------------- threads


def test_four_threads_sign_for_two_seconds_without_error(
    softhsm_keystore: Pkcs11KeyStore,
    second_store: Pkcs11KeyStore,
    pairs: dict[str, tuple[MaterialRef, bytes]],
) -> None:
    kek = _kek()
    work_items = [
        (pairs["ECC_NIST_P256"], "ECDSA_SHA_256"),
        (pairs["ECC_SECG_P256K1"], "ECDSA_SHA_256"),
        (pairs["RSA_2048"], "RSASSA_PSS_SHA_256"),
        (pairs["RSA_2048"], "RSASSA_PKCS1_V1_5_SHA_512"),
        (softhsm_keystore.generate_key_pair("ECC_NIST_P384", kek), "ECDSA_SHA_384"),
    ]
    errors: list[BaseException] = []
    counts = [0] * 4
    deadline = time.monotonic() + 2.0

    def work(index: int) -> None:
        store = softhsm_keystore if index % 2 else second_store
        try:
            while time.monotonic() < deadline:
                (material, public_der), alg = work_items[(counts[index] + index) % len(work_items)]
                digest = _digest(alg, os.urandom(16))
                _verify(public_der, alg, digest, store.sign(material, alg, digest))
                if counts[index] % 100 == 0:
                    store.generate_key_pair("ECC_NIST_P256", kek)
                counts[index] += 1
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(count > 0 for count in counts)
