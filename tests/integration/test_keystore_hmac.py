"""HMAC keys in SoftHSM2 through Pkcs11KeyStore: generate_hmac_key and generate_mac.

Generated keys never leave the HSM, so correctness of the MAC path is proved with
known keys: the RFC 4231 vectors on keys imported as session objects and run through
the adapter's own ``hmac_sign`` (same mechanism table, same call), and known keys of
each key spec wrapped under a KEK and used through ``generate_mac`` itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pkcs11.exceptions
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from ledger.errors import HsmError, InvalidCiphertextError
from ledger.keystore.pkcs11_adapter import (
    HMAC_KEY_BYTES,
    HMAC_MECHANISMS,
    WRAP_MECHANISM,
    Pkcs11KeyStore,
    hmac_sign,
    open_keystore,
)
from ledger.keystore.port import MaterialRef
from ledger.settings import Settings

pytestmark = pytest.mark.softhsm

SPEC_OF = {alg: spec for alg, (_, spec, _) in HMAC_MECHANISMS.items()}
ALG_OF = {spec: alg for alg, spec in SPEC_OF.items()}
HASH_OF: dict[str, Callable[[], Any]] = {
    "HMAC_SHA_224": hashlib.sha224,
    "HMAC_SHA_256": hashlib.sha256,
    "HMAC_SHA_384": hashlib.sha384,
    "HMAC_SHA_512": hashlib.sha512,
}
BLOCK_SIZE = {"HMAC_SHA_224": 64, "HMAC_SHA_256": 64, "HMAC_SHA_384": 128, "HMAC_SHA_512": 128}


def _kek() -> str:
    return f"keyledger-kek-{uuid.uuid4()}"


# ------------------------------------------------------------------- RFC 4231 vectors

# RFC 4231 section 4: (key, data, {algorithm: MAC hex}). Test case 5 (truncated output)
# is left out.
RFC4231: dict[int, tuple[bytes, bytes, dict[str, str]]] = {
    1: (
        b"\x0b" * 20,
        b"Hi There",
        {
            "HMAC_SHA_224": "896fb1128abbdf196832107cd49df33f47b4b1169912ba4f53684b22",
            "HMAC_SHA_256": "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            "HMAC_SHA_384": "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
            "faea9ea9076ede7f4af152e8b2fa9cb6",
            "HMAC_SHA_512": "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
            "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        },
    ),
    2: (
        b"Jefe",
        b"what do ya want for nothing?",
        {
            "HMAC_SHA_224": "a30e01098bc6dbbf45690f3a7e9e6d0f8bbea2a39e6148008fd05e44",
            "HMAC_SHA_256": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            "HMAC_SHA_384": "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
            "8e2240ca5e69e2c78b3239ecfab21649",
            "HMAC_SHA_512": "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
            "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        },
    ),
    3: (
        b"\xaa" * 20,
        b"\xdd" * 50,
        {
            "HMAC_SHA_224": "7fb3cb3588c6c1f6ffa9694d7d6ad2649365b0c1f65d69d1ec8333ea",
            "HMAC_SHA_256": "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            "HMAC_SHA_384": "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
            "2a5ab39dc13814b94e3ab6e101a34f27",
            "HMAC_SHA_512": "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
            "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb",
        },
    ),
    4: (
        bytes(range(0x01, 0x1A)),
        b"\xcd" * 50,
        {
            "HMAC_SHA_224": "6c11506874013cac6a2abc1bb382627cec6a90d86efc012de7afec5a",
            "HMAC_SHA_256": "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            "HMAC_SHA_384": "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e"
            "6801dd23c4a7d679ccf8a386c674cffb",
            "HMAC_SHA_512": "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3db"
            "a91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd",
        },
    ),
    6: (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        {
            "HMAC_SHA_224": "95e9a0db962095adaebe9b2d6f0dbce2d499f112f2d2b7273fa6870e",
            "HMAC_SHA_256": "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            "HMAC_SHA_384": "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
            "0c2ef6ab4030fe8296248df163f44952",
            "HMAC_SHA_512": "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
            "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598",
        },
    ),
    7: (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size "
        b"data. The key needs to be hashed before being used by the HMAC algorithm.",
        {
            "HMAC_SHA_224": "3a854166ac5d9f023f54d517d0b39dbd946770db9c2b95c9f6f565d1",
            "HMAC_SHA_256": "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            "HMAC_SHA_384": "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5"
            "a678cc31e799176d3860e6110c46523e",
            "HMAC_SHA_512": "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
            "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58",
        },
    ),
}


def _import_hmac_key(session: Any, key: bytes, *, extractable: bool = False) -> Any:
    """A known generic-secret session object with SIGN (test only: not sensitive)."""
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.VALUE: key,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: extractable,
            Attribute.SIGN: True,
        }
    )


def _hsm_mac_of_known_key(
    store: Pkcs11KeyStore, key: bytes, mac_algorithm: str, message: bytes
) -> bytes:
    """Import ``key`` into the HSM and MAC ``message`` through the adapter's ``hmac_sign``."""
    with store._session() as session:
        obj = _import_hmac_key(session, key)
        try:
            return hmac_sign(session, obj.handle, mac_algorithm, message)
        finally:
            obj.destroy()


@pytest.mark.parametrize("mac_algorithm", sorted(HMAC_MECHANISMS))
@pytest.mark.parametrize("case", sorted(RFC4231))
def test_rfc4231_vectors_through_the_adapters_mac_path(
    softhsm_keystore: Pkcs11KeyStore, case: int, mac_algorithm: str
) -> None:
    key, data, macs = RFC4231[case]
    # SoftHSM2 refuses HMAC keys shorter than the hash output (see the next test).
    # RFC 2104 pads a key shorter than the hash block with zeros to the block size, so
    # the zero-padded key is the same HMAC key: the MAC must equal the vector.
    if len(key) < HMAC_MECHANISMS[mac_algorithm][2]:
        key = key.ljust(BLOCK_SIZE[mac_algorithm], b"\0")
    expected = bytes.fromhex(macs[mac_algorithm])
    assert hmac.new(key, data, HASH_OF[mac_algorithm]).digest() == expected  # table sanity
    assert _hsm_mac_of_known_key(softhsm_keystore, key, mac_algorithm, data) == expected


@pytest.mark.parametrize("mac_algorithm", sorted(HMAC_MECHANISMS))
def test_softhsm_refuses_hmac_keys_shorter_than_the_hash_output(
    softhsm_keystore: Pkcs11KeyStore, mac_algorithm: str
) -> None:
    short = b"k" * (HMAC_MECHANISMS[mac_algorithm][2] - 1)
    with pytest.raises(pkcs11.exceptions.KeySizeRange):
        _hsm_mac_of_known_key(softhsm_keystore, short, mac_algorithm, b"m")


@pytest.mark.parametrize("key_spec", sorted(HMAC_KEY_BYTES))
def test_known_key_wrapped_under_a_kek_macs_like_python_through_generate_mac(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings, key_spec: str
) -> None:
    """The whole adapter path (KEK wrap, unwrap as kind, MAC) on a key we know.

    Covers SoftHSM2's wrap-with-padding quirk: a 28-byte key comes back as 32 bytes
    (zero-padded), which HMAC treats as the same key.
    """
    kek = _kek()
    softhsm_keystore.generate_hmac_key(key_spec, kek)  # creates the KEK
    (kek_handle,) = softhsm_keystore._kek_handles(kek, create=False)
    key = os.urandom(HMAC_KEY_BYTES[key_spec])
    with softhsm_keystore._session() as session:
        obj = _import_hmac_key(session, key, extractable=True)
        try:
            wrapping = session.get_key(object_class=ObjectClass.SECRET_KEY, label=kek)
            assert wrapping.handle == kek_handle
            wrapped = wrapping.wrap_key(obj, mechanism=WRAP_MECHANISM)
        finally:
            obj.destroy()
    material = MaterialRef(hashlib.sha256(wrapped).hexdigest(), wrapped, kek=kek, kind=key_spec)
    alg = ALG_OF[key_spec]
    for message in (b"", b"m" * 32, os.urandom(4096)):
        expected = hmac.new(key, message, HASH_OF[alg]).digest()
        assert softhsm_keystore.generate_mac(material, alg, message) == expected
    other = open_keystore(softhsm_settings)
    try:
        assert other.generate_mac(material, alg, b"x") == hmac.new(key, b"x", HASH_OF[alg]).digest()
    finally:
        other.close()


# ------------------------------------------------------------------- generated keys


@pytest.fixture(scope="module")
def hmac_materials(softhsm_keystore: Pkcs11KeyStore) -> dict[str, MaterialRef]:
    kek = _kek()
    return {spec: softhsm_keystore.generate_hmac_key(spec, kek) for spec in HMAC_KEY_BYTES}


@pytest.mark.parametrize(
    ("key_spec", "blob_len"),
    [("HMAC_224", 40), ("HMAC_256", 40), ("HMAC_384", 56), ("HMAC_512", 72)],
)
def test_generated_key_is_named_by_its_blob_and_gives_macs_of_the_right_length(
    softhsm_keystore: Pkcs11KeyStore,
    hmac_materials: dict[str, MaterialRef],
    key_spec: str,
    blob_len: int,
) -> None:
    material = hmac_materials[key_spec]
    assert material.kind == key_spec
    assert material.kek is not None and material.kek.startswith("keyledger-kek-")
    assert material.material_id == hashlib.sha256(material.wrapped).hexdigest()
    assert len(material.wrapped) == blob_len
    mac = softhsm_keystore.generate_mac(material, ALG_OF[key_spec], b"m" * 32)
    assert len(mac) == HMAC_KEY_BYTES[key_spec]


@pytest.mark.parametrize("key_spec", sorted(HMAC_KEY_BYTES))
def test_same_message_same_mac_across_stores_and_other_message_other_mac(
    softhsm_keystore: Pkcs11KeyStore,
    softhsm_settings: Settings,
    hmac_materials: dict[str, MaterialRef],
    key_spec: str,
) -> None:
    material, alg = hmac_materials[key_spec], ALG_OF[key_spec]
    mac = softhsm_keystore.generate_mac(material, alg, b"the message")
    assert softhsm_keystore.generate_mac(material, alg, b"the message") == mac
    assert softhsm_keystore.generate_mac(material, alg, b"the messagE") != mac
    reopened = open_keystore(softhsm_settings)  # nothing cached: unwraps again
    try:
        assert reopened.generate_mac(material, alg, b"the message") == mac
    finally:
        reopened.close()


def test_two_generated_keys_differ(softhsm_keystore: Pkcs11KeyStore) -> None:
    kek = _kek()
    a = softhsm_keystore.generate_hmac_key("HMAC_256", kek)
    b = softhsm_keystore.generate_hmac_key("HMAC_256", kek)
    assert a.material_id != b.material_id
    assert softhsm_keystore.generate_mac(a, "HMAC_SHA_256", b"m") != softhsm_keystore.generate_mac(
        b, "HMAC_SHA_256", b"m"
    )


def test_unwrapped_hmac_key_is_a_sensitive_sign_only_generic_secret(
    softhsm_keystore: Pkcs11KeyStore, hmac_materials: dict[str, MaterialRef]
) -> None:
    material = hmac_materials["HMAC_384"]
    softhsm_keystore.generate_mac(material, "HMAC_SHA_384", b"m")
    key = softhsm_keystore._unwrapped[material.material_id].key
    attrs = key.get_attributes(
        [
            Attribute.KEY_TYPE,
            Attribute.TOKEN,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.SIGN,
            Attribute.ENCRYPT,
            Attribute.DECRYPT,
            Attribute.WRAP,
            Attribute.DERIVE,
        ]
    )
    assert attrs[Attribute.KEY_TYPE] == KeyType.GENERIC_SECRET
    assert attrs[Attribute.TOKEN] is False
    assert attrs[Attribute.SENSITIVE] is True and attrs[Attribute.EXTRACTABLE] is False
    assert attrs[Attribute.SIGN] is True
    assert not any(attrs[a] for a in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP))
    assert attrs[Attribute.DERIVE] is False


def test_destroy_kek_makes_hmac_material_unusable(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    kek = _kek()
    doomed = softhsm_keystore.generate_hmac_key("HMAC_512", kek)
    softhsm_keystore.generate_mac(doomed, "HMAC_SHA_512", b"cached now")
    softhsm_keystore.destroy_kek(kek)
    with pytest.raises(HsmError, match="destroyed"):
        softhsm_keystore.generate_mac(doomed, "HMAC_SHA_512", b"cached now")
    fresh = open_keystore(softhsm_settings)
    try:
        with pytest.raises(HsmError, match="destroyed"):
            fresh.generate_mac(doomed, "HMAC_SHA_512", b"m")
    finally:
        fresh.close()


def test_aes_material_is_refused_by_generate_mac(softhsm_keystore: Pkcs11KeyStore) -> None:
    aes = softhsm_keystore.generate_symmetric_key(kek=_kek())
    with pytest.raises(HsmError, match="not an HMAC key"):
        softhsm_keystore.generate_mac(aes, "HMAC_SHA_256", b"m")
    claimed = MaterialRef(aes.material_id, aes.wrapped, kek=aes.kek, kind="HMAC_256")
    iv, ct = softhsm_keystore.encrypt(aes, b"p", b"")  # now cached as an AES key
    assert softhsm_keystore.decrypt(aes, iv, ct, b"") == b"p"
    with pytest.raises(HsmError, match="kind"):
        softhsm_keystore.generate_mac(claimed, "HMAC_SHA_256", b"m")


def test_hmac_material_is_refused_by_encrypt_and_decrypt(
    softhsm_keystore: Pkcs11KeyStore, hmac_materials: dict[str, MaterialRef]
) -> None:
    material = hmac_materials["HMAC_256"]
    softhsm_keystore.generate_mac(material, "HMAC_SHA_256", b"m")  # cached as HMAC
    with pytest.raises(HsmError, match="not an AES"):
        softhsm_keystore.encrypt(material, b"p", b"")
    for iv, ct in ((b"\0" * 12, b"\0" * 32), (b"short", b"")):
        with pytest.raises(HsmError, match="not an AES") as info:
            softhsm_keystore.decrypt(material, iv, ct, b"")
        assert not isinstance(info.value, InvalidCiphertextError)
    # The same blob claimed as AES: the cached HMAC key is not used for encryption.
    claimed = MaterialRef(material.material_id, material.wrapped, kek=material.kek, kind="AES")
    with pytest.raises(HsmError, match="kind"):
        softhsm_keystore.encrypt(claimed, b"p", b"")


@pytest.mark.parametrize("key_spec", ["HMAC_128", "hmac_256", "AES", "", None])
def test_unknown_key_spec_is_refused(softhsm_keystore: Pkcs11KeyStore, key_spec: Any) -> None:
    with pytest.raises(HsmError, match="key spec"):
        softhsm_keystore.generate_hmac_key(key_spec, _kek())


def test_unknown_or_mismatched_mac_algorithm_is_refused(
    softhsm_keystore: Pkcs11KeyStore, hmac_materials: dict[str, MaterialRef]
) -> None:
    material = hmac_materials["HMAC_256"]
    for alg in ("HMAC_SHA_1", "hmac_sha_256", "SHA_256", ""):
        with pytest.raises(HsmError, match="unsupported MAC algorithm"):
            softhsm_keystore.generate_mac(material, alg, b"m")
    with pytest.raises(HsmError, match="does not match"):
        softhsm_keystore.generate_mac(material, "HMAC_SHA_512", b"m")


def test_invalid_kek_label_is_refused(softhsm_keystore: Pkcs11KeyStore) -> None:
    with pytest.raises(HsmError, match="invalid KEK label"):
        softhsm_keystore.generate_hmac_key("HMAC_256", "not-a-kek")


def test_eight_threads_compute_macs_for_two_seconds_without_error(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    kek = _kek()
    materials = [softhsm_keystore.generate_hmac_key(spec, kek) for spec in sorted(HMAC_KEY_BYTES)]
    expected = {
        m.material_id: softhsm_keystore.generate_mac(m, ALG_OF[m.kind], b"fixed") for m in materials
    }
    other = open_keystore(softhsm_settings)  # half the threads unwrap in a second store
    errors: list[BaseException] = []
    counts = [0] * 8
    deadline = time.monotonic() + 2.0

    def work(index: int) -> None:
        store = softhsm_keystore if index % 2 else other
        try:
            while time.monotonic() < deadline:
                m = materials[counts[index] % len(materials)]
                assert store.generate_mac(m, ALG_OF[m.kind], b"fixed") == expected[m.material_id]
                if counts[index] % 50 == 0:
                    store.generate_hmac_key(m.kind, kek)
                counts[index] += 1
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other.close()
    assert errors == []
    assert all(count > 0 for count in counts)
