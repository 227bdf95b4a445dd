"""RSA decryption (ENCRYPT_DECRYPT) and ECDH (KEY_AGREEMENT) keys in SoftHSM2 through
Pkcs11KeyStore: generate_key_pair(..., key_usage), decrypt_rsa, derive_shared_secret.

Ciphertexts are made by ``cryptography`` with AWS KMS's parameters (RSAES-OAEP, MGF1 with
the same hash, no label) and published vectors; shared secrets are checked against
``cryptography``'s ECDH. FakeKeyStore is held to the same behaviour at the end.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pkcs11.exceptions
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, ObjectClass

from ledger.errors import HsmError, InvalidCiphertextError, ValidationError
from ledger.keystore.pkcs11_adapter import (
    EC_CURVES,
    KEY_USAGE_SPECS,
    RSA_ENCRYPTION_ALGORITHMS,
    RSA_KEY_BITS,
    WRAP_MECHANISM,
    Pkcs11KeyStore,
    oaep_decode,
    open_keystore,
)
from ledger.keystore.port import MaterialRef
from ledger.settings import Settings
from tests.fakes import FakeKeyStore

pytestmark = pytest.mark.softhsm

RSA_SPECS = sorted(RSA_KEY_BITS)
ECDH_SPECS = ["ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521"]
ALGORITHMS: dict[str, hashes.HashAlgorithm] = {
    "RSAES_OAEP_SHA_1": hashes.SHA1(),
    "RSAES_OAEP_SHA_256": hashes.SHA256(),
}
CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
}
SECRET_LEN = {"ECC_NIST_P256": 32, "ECC_NIST_P384": 48, "ECC_NIST_P521": 66}


def _kek() -> str:
    return f"keyledger-kek-{uuid.uuid4()}"


def _oaep(alg: str) -> padding.OAEP:
    hash_ = ALGORITHMS[alg]
    return padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)


def _encrypt(public_der: bytes, alg: str, plaintext: bytes) -> bytes:
    key: Any = load_der_public_key(public_der)
    assert isinstance(key, rsa.RSAPublicKey)
    ciphertext: bytes = key.encrypt(plaintext, _oaep(alg))
    return ciphertext


def _max_plaintext(spec: str, alg: str) -> int:
    """RFC 8017: k - 2 hLen - 2 (AWS KMS's limits: 214/190 bytes for RSA_2048, ...)."""
    return RSA_KEY_BITS[spec] // 8 - 2 * ALGORITHMS[alg].digest_size - 2


def _public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_keys(softhsm_keystore: Pkcs11KeyStore) -> dict[str, tuple[MaterialRef, bytes]]:
    """One ENCRYPT_DECRYPT key pair per RSA key spec, each under its own KEK."""
    return {
        spec: softhsm_keystore.generate_key_pair(spec, _kek(), "ENCRYPT_DECRYPT")
        for spec in RSA_SPECS
    }


@pytest.fixture(scope="module")
def ecdh_keys(softhsm_keystore: Pkcs11KeyStore) -> dict[str, tuple[MaterialRef, bytes]]:
    """One KEY_AGREEMENT key pair per curve, each under its own KEK."""
    return {
        spec: softhsm_keystore.generate_key_pair(spec, _kek(), "KEY_AGREEMENT")
        for spec in ECDH_SPECS
    }


@pytest.fixture
def second_store(softhsm_settings: Settings) -> Iterator[Pkcs11KeyStore]:
    """Another store on the same token: nothing cached, so it unwraps again."""
    store = open_keystore(softhsm_settings)
    yield store
    store.close()


# ------------------------------------------------------------------------- generation


def test_usage_tables_are_aws_kms_s() -> None:
    assert KEY_USAGE_SPECS["ENCRYPT_DECRYPT"] == set(RSA_SPECS)
    assert KEY_USAGE_SPECS["KEY_AGREEMENT"] == set(ECDH_SPECS)
    assert set(RSA_ENCRYPTION_ALGORITHMS) == set(ALGORITHMS)


def test_kinds_and_public_keys(
    rsa_keys: dict[str, tuple[MaterialRef, bytes]],
    ecdh_keys: dict[str, tuple[MaterialRef, bytes]],
    softhsm_keystore: Pkcs11KeyStore,
) -> None:
    for spec, (material, public_der) in rsa_keys.items():
        assert material.kind == f"{spec}:ENCRYPT_DECRYPT"
        key = load_der_public_key(public_der)
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == RSA_KEY_BITS[spec]
        assert key.public_numbers().e == 65537
    for spec, (material, public_der) in ecdh_keys.items():
        assert material.kind == f"{spec}:KEY_AGREEMENT"
        key = load_der_public_key(public_der)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == EC_CURVES[spec][0]
    # SIGN_VERIFY keeps kind = key spec (materials in existing ledgers say so).
    signing, _ = softhsm_keystore.generate_key_pair("ECC_NIST_P256", _kek())
    assert signing.kind == "ECC_NIST_P256"
    explicit, _ = softhsm_keystore.generate_key_pair("RSA_2048", _kek(), "SIGN_VERIFY")
    assert explicit.kind == "RSA_2048"


@pytest.mark.parametrize(
    ("key_spec", "key_usage"),
    [
        ("ECC_NIST_P256", "ENCRYPT_DECRYPT"),
        ("ECC_SECG_P256K1", "ENCRYPT_DECRYPT"),
        ("RSA_2048", "KEY_AGREEMENT"),
        ("ECC_SECG_P256K1", "KEY_AGREEMENT"),
        ("RSA_2048", "GENERATE_VERIFY_MAC"),
        ("RSA_2048", "sign_verify"),
        ("HMAC_256", "KEY_AGREEMENT"),
        ("SM2", "KEY_AGREEMENT"),
    ],
)
def test_combinations_aws_kms_does_not_allow_are_refused(
    softhsm_keystore: Pkcs11KeyStore, key_spec: str, key_usage: str
) -> None:
    with pytest.raises(HsmError):
        softhsm_keystore.generate_key_pair(key_spec, _kek(), key_usage)


# ------------------------------------------------------------------------- RSA decryption


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
@pytest.mark.parametrize("spec", RSA_SPECS)
def test_decrypts_what_cryptography_encrypts(
    softhsm_keystore: Pkcs11KeyStore,
    rsa_keys: dict[str, tuple[MaterialRef, bytes]],
    spec: str,
    alg: str,
) -> None:
    material, public_der = rsa_keys[spec]
    for plaintext in (b"", b"\x00", b"\x01" * 7, os.urandom(_max_plaintext(spec, alg))):
        ciphertext = _encrypt(public_der, alg, plaintext)
        assert softhsm_keystore.decrypt_rsa(material, alg, ciphertext) == plaintext


def test_softhsm_refuses_oaep_sha256_so_it_is_decoded_on_the_host(
    softhsm_keystore: Pkcs11KeyStore, rsa_keys: dict[str, tuple[MaterialRef, bytes]]
) -> None:
    """Measured on SoftHSM2 2.6: the HSM does SHA-1 OAEP itself; for SHA-256 it only
    does the raw RSA operation. If a SoftHSM upgrade adds SHA-256, this tells us."""
    material, public_der = rsa_keys["RSA_2048"]
    ciphertext = _encrypt(public_der, "RSAES_OAEP_SHA_256", b"probe")
    assert softhsm_keystore.decrypt_rsa(material, "RSAES_OAEP_SHA_256", ciphertext) == b"probe"
    assert softhsm_keystore._oaep_refused == {"sha256": True}


# RSA Laboratories, PKCS #1 v2.1 OAEP test vectors (oaep-vect.txt), Example 10 (SHA-1)
SHA1_N = (
    "ae45ed5601cec6b8cc05f803935c674ddbe0d75c4c09fd7951fc6b0caec313a8df39970c518bffba"
    "5ed68f3f0d7f22a4029d413f1ae07e4ebe9e4177ce23e7f5404b569e4ee1bdcf3c1fb03ef113802d"
    "4f855eb9b5134b5a7c8085adcae6fa2fa1417ec3763be171b0c62b760ede23c12ad92b980884c641"
    "f5a8fac26bdad4a03381a22fe1b754885094c82506d4019a535a286afeb271bb9ba592de18dcf600"
    "c2aeeae56e02f7cf79fc14cf3bdc7cd84febbbf950ca90304b2219a7aa063aefa2c3c1980e560cd6"
    "4afe779585b6107657b957857efde6010988ab7de417fc88d8f384c4e6e72c3f943e0c31c0c4a5cc"
    "36f879d8a3ac9d7d59860eaada6b83bb"
)
SHA1_E = 0x010001
SHA1_D = (
    "056b04216fe5f354ac77250a4b6b0c8525a85c59b0bd80c56450a22d5f438e596a333aa875e291dd"
    "43f48cb88b9d5fc0d499f9fcd1c397f9afc070cd9e398c8d19e61db7c7410a6b2675dfbf5d345b80"
    "4d201add502d5ce2dfcb091ce9997bbebe57306f383e4d588103f036f7e85d1934d152a323e4a8db"
    "451d6f4a5b1b0f102cc150e02feee2b88dea4ad4c1baccb24d84072d14e1d24a6771f7408ee30564"
    "fb86d4393a34bcf0b788501d193303f13a2284b001f0f649eaf79328d4ac5c430ab4414920a9460e"
    "d1b7bc40ec653e876d09abc509ae45b525190116a0c26101848298509c1c3bf3a483e7274054e15e"
    "97075036e989f60932807b5257751e79"
)
SHA1_M1 = "8bba6bf82a6c0f86d5f1756e97956870b08953b06b4eb205bc1694ee"
SHA1_C1 = (
    "53ea5dc08cd260fb3b858567287fa91552c30b2febfba213f0ae87702d068d19bab07fe574523dfb"
    "42139d68c3c5afeee0bfe4cb7969cbf382b804d6e61396144e2d0e60741f8993c3014b58b9b1957a"
    "8babcd23af854f4c356fb1662aa72bfcc7e586559dc4280d160c126785a723ebeebeff71f1159444"
    "0aaef87d10793a8774a239d4a04c87fe1467b9daf85208ec6c7255794a96cc29142f9a8bd418e3c1"
    "fd67344b0cd0829df3b2bec60253196293c6b34d3f75d32f213dd45c6273d505adf4cced1057cb75"
    "8fc26aeefa441255ed4e64c199ee075e7f16646182fdb464739b68ab5daff0e63e9552016824f054"
    "bf4d3c8c90a97bb6b6553284eb429fcc"
)
SHA1_M2 = "e6ad181f053b58a904f2457510373e57"
SHA1_C2 = (
    "a2b1a430a9d657e2fa1c2bb5ed43ffb25c05a308fe9093c01031795f5874400110828ae58fb9b581"
    "ce9dddd3e549ae04a0985459bde6c626594e7b05dc4278b2a1465c1368408823c85e96dc66c3a309"
    "83c639664fc4569a37fe21e5a195b5776eed2df8d8d361af686e750229bbd663f161868a50615e0c"
    "337bec0ca35fec0bb19c36eb2e0bbcc0582fa1d93aacdb061063f59f2ce1ee43605e5d89eca183d2"
    "acdfe9f81011022ad3b43a3dd417dac94b4e11ea81b192966e966b182082e71964607b4f8002f362"
    "99844a11f2ae0faeac2eae70f8f4f98088acdcd0ac556e9fccc511521908fad26f04c64201450305"
    "778758b0538bf8b5bb144a828e629795"
)
# pyca/cryptography vectors, oaep-custom/oaep-sha256-sha256.txt, first key (SHA-256)
SHA256_N = (
    "b8e814a25ca64c8de16f73849a78c8b13bb086a407301604f674efb588ee7b996b1b6a2968625a25"
    "48e9ab01ce6a3699907e303c8a02c9e40ea36bd6d8b2a74b1ee98fa8835a480dfc751fddc490e5a4"
    "6707095356316587fc339196e4d7db70c7feae50a1263dedd589bec009624193c7de4793dcdf830b"
    "e3256c70de1f02f7a7d3503035fcb9625c40abb7445470203902ea045f337d31fcd28506e46cd655"
    "60949f08cd90fedaabbcb6615b884737d3f5ad01e67cc0c2997af3328b3c80d5ee0a9aa40a9119bd"
    "7594fcfe2324728ea9a8f839e663467a0c44915d0275e34cf1c9605ad317c4573f57c85fd7e19e82"
    "cc6f77314e8db47a908a57e3e4418e45"
)
SHA256_E = 0x10001
SHA256_D = (
    "4af58aa7e7776341814a7542247d229ef6dbb1397dd0789cba6cdd60728a7b80ce72e6aeb2aa6c71"
    "0105f9555a20a4d1cc49dbb42f1ec249b9c5764a3abef222f9fd2547e3380e4ddd327e20a1373c61"
    "518300bcd00c6664a251258c4e6953847d0f3a0b65c8e3022fb70fa53a28a2fd0de18692e2cf9988"
    "9024f3b92dd2d49870a5de6f11827feade31bdc8889148968fad08b794007f68524a3bbce886dee2"
    "40cb18f0b14e22ebfe5b04a4f1a73c9ed56adc0881b9aca2a02a776a2df2843b3cca528c8dca70db"
    "0a72baa978e8e11ef833f298403003de5820cf6d54d58de1753aac48aae6911a55f9d393a829fd41"
    "69799365b7a4015c5911277937bb1501"
)
SHA256_M1 = "6628194e12073db03ba94cda9ef9532397d50dba79b987004afefe34"
SHA256_C1 = (
    "6afdbc76de74458198a9c890cc5abb52580af01c2096036dca104d67f96a05de682da5c26970a808"
    "343527440aa80b9d043045d7983f442a3d376e5b039bcfb96c1b5fd0e46b5fff85646273293ced5e"
    "7272993850017f24f6133591d5c9788781a9952873ebfc45ad4d34fff2b4e9ababf49d9f9a3d7726"
    "bdce3eb2feb545db5cfef0b183bd55735a2d356b4278c5580ce0e4cfd21a0a3ad3b225de388fcfd6"
    "88394710f97d5a3933e01d434fcff732542390f8915d5d291780ed63d425c0bea5bb0ad25aae3a70"
    "355e3f45a443ea111b80515b743d5bd226d339dc7516ce6c41414a0aa978198bc6762f443e957c7b"
    "e5edbd25fcdd226c5d967fa05d7c9079"
)
SHA256_M2 = "750c4047f547e8e41411856523298ac9bae245efaf1397fbe56f9dd5"
SHA256_C2 = (
    "73c5460ddb0b66f76c7ffa9f413c7be486d801dcc9e7dccf3fada2f567e40936d21670f050245cac"
    "41af90785ab60396eb4b535525eace1c869f4156d1c362736e7970df8252ddfd59ab6ef664a8b414"
    "daaf6d5205eb63b9c93ac97801c9a7e8ac5b26150c56714fa745d0399de6cbefded0df40b3e274ab"
    "1333eb66dc662c9eb1cf202a2596161bda08cc997d2acdbcd5bf230029eb14e0214cdf79bb91bc11"
    "ce896d8a1b3be26ace58914f8ae28b195b6ba881d5ef9cf7d47402446fa5c1ae6325974517ce0cad"
    "36c87f149c80c4a8ef37a33029a5499076f222e1bed208c290100aac933673236dcb37abda27820a"
    "70754c7856045e65bff3e143ec430c58"
)


def _import_rsa_private_key(session: Any, n: int, e: int, d: int) -> Any:
    """A known RSA private key as an extractable (to wrap it) session object."""
    p, q = rsa.rsa_recover_prime_factors(n, e, d)

    def b(x: int) -> bytes:
        return x.to_bytes((x.bit_length() + 7) // 8, "big")

    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: False,
            Attribute.MODULUS: b(n),
            Attribute.PUBLIC_EXPONENT: b(e),
            Attribute.PRIVATE_EXPONENT: b(d),
            Attribute.PRIME_1: b(p),
            Attribute.PRIME_2: b(q),
            Attribute.EXPONENT_1: b(rsa.rsa_crt_dmp1(d, p)),
            Attribute.EXPONENT_2: b(rsa.rsa_crt_dmq1(d, q)),
            Attribute.COEFFICIENT: b(rsa.rsa_crt_iqmp(p, q)),
        }
    )


@pytest.mark.parametrize(
    ("alg", "n", "e", "d", "cases"),
    [
        (
            "RSAES_OAEP_SHA_1",
            SHA1_N,
            SHA1_E,
            SHA1_D,
            [(SHA1_M1, SHA1_C1), (SHA1_M2, SHA1_C2)],
        ),
        (
            "RSAES_OAEP_SHA_256",
            SHA256_N,
            SHA256_E,
            SHA256_D,
            [(SHA256_M1, SHA256_C1), (SHA256_M2, SHA256_C2)],
        ),
    ],
    ids=["rsa-labs-sha1", "pyca-sha256"],
)
def test_published_oaep_vectors(
    softhsm_keystore: Pkcs11KeyStore,
    softhsm_settings: Settings,
    alg: str,
    n: str,
    e: int,
    d: str,
    cases: list[tuple[str, str]],
) -> None:
    """The whole adapter path (import into the HSM, KEK wrap, unwrap as an
    ENCRYPT_DECRYPT key, decrypt) on the vectors' 2048-bit keys."""
    kek = _kek()
    softhsm_keystore.generate_key_pair("RSA_2048", kek, "ENCRYPT_DECRYPT")  # creates the KEK
    (kek_handle,) = softhsm_keystore._kek_handles(kek, create=False)
    with softhsm_keystore._session() as session:
        obj = _import_rsa_private_key(session, int(n, 16), e, int(d, 16))
        try:
            wrapping = session.get_key(object_class=ObjectClass.SECRET_KEY, label=kek)
            assert wrapping.handle == kek_handle
            wrapped = wrapping.wrap_key(obj, mechanism=WRAP_MECHANISM)
        finally:
            obj.destroy()
    material = MaterialRef(
        hashlib.sha256(wrapped).hexdigest(), wrapped, kek=kek, kind="RSA_2048:ENCRYPT_DECRYPT"
    )
    other = open_keystore(softhsm_settings)
    try:
        for message, ciphertext in cases:
            for store in (softhsm_keystore, other):
                assert store.decrypt_rsa(material, alg, bytes.fromhex(ciphertext)) == (
                    bytes.fromhex(message)
                )
    finally:
        other.close()


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_host_oaep_decoding_agrees_with_cryptography(alg: str) -> None:
    """oaep_decode on c^d mod n computed with Python integers, against ``cryptography``;
    and a None (never an exception) for every corrupted encoding."""
    key = rsa.generate_private_key(65537, 2048)
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    hash_name = hashlib.new(ALGORITHMS[alg].name).name

    def raw(ciphertext: bytes) -> bytes:
        return pow(int.from_bytes(ciphertext, "big"), d, n).to_bytes(256, "big")

    for length in (0, 1, 31, _max_plaintext("RSA_2048", alg)):
        message = os.urandom(length)
        encoded = raw(key.public_key().encrypt(message, _oaep(alg)))
        assert oaep_decode(encoded, 256, hash_name) == message
        for position in (0, 1, 40, 100, 255):
            corrupted = bytearray(encoded)
            corrupted[position] ^= 0x01
            assert oaep_decode(bytes(corrupted), 256, hash_name) is None
    assert oaep_decode(bytes(256), 256, hash_name) is None
    assert oaep_decode(bytes(255), 256, hash_name) is None
    assert oaep_decode(os.urandom(256), 256, hash_name) is None


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_bad_ciphertexts_raise_invalid_ciphertext_without_detail(
    softhsm_keystore: Pkcs11KeyStore, rsa_keys: dict[str, tuple[MaterialRef, bytes]], alg: str
) -> None:
    material, public_der = rsa_keys["RSA_2048"]
    ciphertext = _encrypt(public_der, alg, b"attack at dawn")
    other_alg = next(a for a in ALGORITHMS if a != alg)
    wrong_key, _ = softhsm_keystore.generate_key_pair("RSA_2048", _kek(), "ENCRYPT_DECRYPT")
    bad: list[tuple[MaterialRef, str, bytes]] = [
        (wrong_key, alg, ciphertext),
        (material, other_alg, ciphertext),
        (material, "RSAES_OAEP_SHA_512", ciphertext),
        (material, "SYMMETRIC_DEFAULT", ciphertext),
        (material, alg, ciphertext[:-1]),
        (material, alg, ciphertext + b"\x00"),
        (material, alg, b""),
        (material, alg, b"\xff" * 256),  # >= n
        (material, alg, bytes(256)),  # 0^d = 0: Y, lHash and separator all wrong
    ]
    for position in (0, 1, 128, 255):
        flipped = bytearray(ciphertext)
        flipped[position] ^= 0x80
        bad.append((material, alg, bytes(flipped)))
    for mat, algorithm, data in bad:
        with pytest.raises(InvalidCiphertextError) as info:
            softhsm_keystore.decrypt_rsa(mat, algorithm, data)
        assert str(info.value) == ""
    # Still fine afterwards (no session left in a bad state).
    assert softhsm_keystore.decrypt_rsa(material, alg, ciphertext) == b"attack at dawn"


# ------------------------------------------------------------------------- ECDH


@pytest.mark.parametrize("spec", ECDH_SPECS)
def test_ecdh_matches_cryptography_in_both_directions(
    softhsm_keystore: Pkcs11KeyStore, ecdh_keys: dict[str, tuple[MaterialRef, bytes]], spec: str
) -> None:
    material, public_der = ecdh_keys[spec]
    hsm_public = load_der_public_key(public_der)
    assert isinstance(hsm_public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(CURVES[spec]())
    secret = softhsm_keystore.derive_shared_secret(material, _public_der(peer))
    assert len(secret) == SECRET_LEN[spec]
    assert secret == peer.exchange(ec.ECDH(), hsm_public)
    # Two HSM keys agree with each other.
    other, other_public = softhsm_keystore.generate_key_pair(spec, _kek(), "KEY_AGREEMENT")
    assert softhsm_keystore.derive_shared_secret(
        material, other_public
    ) == softhsm_keystore.derive_shared_secret(other, public_der)


@pytest.mark.parametrize("spec", ECDH_SPECS)
def test_peer_keys_not_on_the_curve_are_refused(
    softhsm_keystore: Pkcs11KeyStore, ecdh_keys: dict[str, tuple[MaterialRef, bytes]], spec: str
) -> None:
    material, _ = ecdh_keys[spec]
    others = [c for s, c in CURVES.items() if s != spec] + [ec.SECP256K1]
    for curve in others:
        with pytest.raises(ValidationError, match="curve"):
            softhsm_keystore.derive_shared_secret(
                material, _public_der(ec.generate_private_key(curve()))
            )
    rsa_public = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValidationError):
        softhsm_keystore.derive_shared_secret(material, rsa_public)
    for garbage in (b"", b"\x30\x00", os.urandom(91)):
        with pytest.raises(ValidationError):
            softhsm_keystore.derive_shared_secret(material, garbage)
    # A raw point is not a SubjectPublicKeyInfo.
    point = (
        ec.generate_private_key(CURVES[spec]())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    )
    with pytest.raises(ValidationError):
        softhsm_keystore.derive_shared_secret(material, point)


def test_the_derived_secret_object_is_destroyed(
    softhsm_keystore: Pkcs11KeyStore, ecdh_keys: dict[str, tuple[MaterialRef, bytes]]
) -> None:
    material, _ = ecdh_keys["ECC_NIST_P256"]
    session = softhsm_keystore._login.token.open()
    try:

        def readable_secrets() -> int:
            return sum(
                1
                for _ in session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.SENSITIVE: False}
                )
            )

        before = readable_secrets()
        for _ in range(3):
            peer = ec.generate_private_key(ec.SECP256R1())
            softhsm_keystore.derive_shared_secret(material, _public_der(peer))
        assert readable_secrets() == before == 0
    finally:
        session.close()


# ------------------------------------------------------------------------- usages


def test_key_usages_are_enforced(
    softhsm_keystore: Pkcs11KeyStore,
    rsa_keys: dict[str, tuple[MaterialRef, bytes]],
    ecdh_keys: dict[str, tuple[MaterialRef, bytes]],
) -> None:
    rsa_enc, rsa_public = rsa_keys["RSA_2048"]
    ecdh, _ = ecdh_keys["ECC_NIST_P256"]
    rsa_sign, rsa_sign_public = softhsm_keystore.generate_key_pair("RSA_2048", _kek())
    ec_sign, _ = softhsm_keystore.generate_key_pair("ECC_NIST_P256", _kek())
    peer = _public_der(ec.generate_private_key(ec.SECP256R1()))
    ciphertext = _encrypt(rsa_sign_public, "RSAES_OAEP_SHA_1", b"x")
    # SIGN_VERIFY materials neither decrypt nor derive.
    with pytest.raises(HsmError):
        softhsm_keystore.decrypt_rsa(rsa_sign, "RSAES_OAEP_SHA_1", ciphertext)
    with pytest.raises(HsmError):
        softhsm_keystore.derive_shared_secret(ec_sign, peer)
    # ENCRYPT_DECRYPT and KEY_AGREEMENT materials do not sign, nor do each other's job.
    with pytest.raises(HsmError):
        softhsm_keystore.sign(rsa_enc, "RSASSA_PSS_SHA_256", os.urandom(32))
    with pytest.raises(HsmError):
        softhsm_keystore.sign(ecdh, "ECDSA_SHA_256", os.urandom(32))
    with pytest.raises(HsmError):
        softhsm_keystore.derive_shared_secret(rsa_enc, peer)
    with pytest.raises(HsmError):
        softhsm_keystore.decrypt_rsa(ecdh, "RSAES_OAEP_SHA_1", bytes(256))
    # Symmetric operations refuse them too.
    with pytest.raises(HsmError):
        softhsm_keystore.encrypt(rsa_enc, b"x", b"")
    # A material already unwrapped under one kind is refused under another.
    softhsm_keystore.decrypt_rsa(
        rsa_enc, "RSAES_OAEP_SHA_1", _encrypt(rsa_public, "RSAES_OAEP_SHA_1", b"y")
    )
    relabelled = MaterialRef(rsa_enc.material_id, rsa_enc.wrapped, rsa_enc.kek, "RSA_2048")
    with pytest.raises(HsmError, match="kind"):
        softhsm_keystore.sign(relabelled, "RSASSA_PSS_SHA_256", os.urandom(32))


@pytest.mark.parametrize(
    ("which", "spec", "allowed"),
    [
        ("rsa", "RSA_3072", Attribute.DECRYPT),
        ("ecdh", "ECC_NIST_P384", Attribute.DERIVE),
    ],
)
def test_unwrapped_private_keys_have_only_their_usage(
    softhsm_keystore: Pkcs11KeyStore,
    rsa_keys: dict[str, tuple[MaterialRef, bytes]],
    ecdh_keys: dict[str, tuple[MaterialRef, bytes]],
    which: str,
    spec: str,
    allowed: Attribute,
) -> None:
    if which == "rsa":
        material, public_der = rsa_keys[spec]
        ciphertext = _encrypt(public_der, "RSAES_OAEP_SHA_1", b"z")
        softhsm_keystore.decrypt_rsa(material, "RSAES_OAEP_SHA_1", ciphertext)
    else:
        material, _ = ecdh_keys[spec]
        peer = _public_der(ec.generate_private_key(ec.SECP384R1()))
        softhsm_keystore.derive_shared_secret(material, peer)
    handle = softhsm_keystore._unwrapped[material.material_id].key.handle
    session = softhsm_keystore._login.token.open()
    try:
        (key,) = [
            k
            for k in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if k.handle == handle
        ]
        usages = (
            Attribute.SIGN,
            Attribute.SIGN_RECOVER,
            Attribute.DECRYPT,
            Attribute.UNWRAP,
            Attribute.DERIVE,
        )
        attrs = key.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE, *usages])
        assert attrs[Attribute.SENSITIVE] is True and attrs[Attribute.EXTRACTABLE] is False
        for attr in usages:
            assert attrs[attr] is (attr == allowed), attr
        secret = Attribute.PRIVATE_EXPONENT if which == "rsa" else Attribute.VALUE
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[secret]
    finally:
        session.close()


# ------------------------------------------------------------------------- lifecycle


def test_a_second_store_uses_the_materials(
    second_store: Pkcs11KeyStore,
    rsa_keys: dict[str, tuple[MaterialRef, bytes]],
    ecdh_keys: dict[str, tuple[MaterialRef, bytes]],
) -> None:
    material, public_der = rsa_keys["RSA_4096"]
    for alg in ALGORITHMS:
        ciphertext = _encrypt(public_der, alg, b"second")
        assert second_store.decrypt_rsa(material, alg, ciphertext) == b"second"
    material, public_der = ecdh_keys["ECC_NIST_P521"]
    peer = ec.generate_private_key(ec.SECP521R1())
    expected = peer.exchange(ec.ECDH(), load_der_public_key(public_der))  # type: ignore[arg-type]
    assert second_store.derive_shared_secret(material, _public_der(peer)) == expected


def test_destroy_kek_makes_them_unusable(
    softhsm_keystore: Pkcs11KeyStore, softhsm_settings: Settings
) -> None:
    rsa_kek, ecdh_kek = _kek(), _kek()
    rsa_material, rsa_public = softhsm_keystore.generate_key_pair(
        "RSA_2048", rsa_kek, "ENCRYPT_DECRYPT"
    )
    ecdh_material, _ = softhsm_keystore.generate_key_pair(
        "ECC_NIST_P256", ecdh_kek, "KEY_AGREEMENT"
    )
    ciphertext = _encrypt(rsa_public, "RSAES_OAEP_SHA_256", b"doomed")
    peer = _public_der(ec.generate_private_key(ec.SECP256R1()))
    assert softhsm_keystore.decrypt_rsa(rsa_material, "RSAES_OAEP_SHA_256", ciphertext)
    assert softhsm_keystore.derive_shared_secret(ecdh_material, peer)
    softhsm_keystore.destroy_kek(rsa_kek)
    softhsm_keystore.destroy_kek(ecdh_kek)
    assert rsa_material.material_id not in softhsm_keystore._unwrapped
    assert ecdh_material.material_id not in softhsm_keystore._unwrapped
    fresh = open_keystore(softhsm_settings)
    try:
        for store in (softhsm_keystore, fresh):
            with pytest.raises(HsmError, match="destroyed"):
                store.decrypt_rsa(rsa_material, "RSAES_OAEP_SHA_256", ciphertext)
            with pytest.raises(HsmError, match="destroyed"):
                store.derive_shared_secret(ecdh_material, peer)
    finally:
        fresh.close()


# ------------------------------------------------------------------------- the fake


def test_fake_keystore_behaves_the_same() -> None:
    store = FakeKeyStore()
    kek = _kek()
    rsa_material, rsa_public = store.generate_key_pair("RSA_2048", kek, "ENCRYPT_DECRYPT")
    assert rsa_material.kind == "RSA_2048:ENCRYPT_DECRYPT"
    for alg in ALGORITHMS:
        ciphertext = _encrypt(rsa_public, alg, b"fake")
        assert store.decrypt_rsa(rsa_material, alg, ciphertext) == b"fake"
        flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
        for mat, algorithm, data in (
            (rsa_material, alg, flipped),
            (rsa_material, "RSAES_OAEP_SHA_512", ciphertext),
            (rsa_material, alg, ciphertext[:-1]),
        ):
            with pytest.raises(InvalidCiphertextError):
                store.decrypt_rsa(mat, algorithm, data)
    ecdh_material, ecdh_public = store.generate_key_pair("ECC_NIST_P384", kek, "KEY_AGREEMENT")
    assert ecdh_material.kind == "ECC_NIST_P384:KEY_AGREEMENT"
    peer = ec.generate_private_key(ec.SECP384R1())
    expected = peer.exchange(ec.ECDH(), load_der_public_key(ecdh_public))  # type: ignore[arg-type]
    assert store.derive_shared_secret(ecdh_material, _public_der(peer)) == expected
    with pytest.raises(ValidationError, match="curve"):
        store.derive_shared_secret(
            ecdh_material, _public_der(ec.generate_private_key(ec.SECP256R1()))
        )
    with pytest.raises(ValidationError):
        store.derive_shared_secret(ecdh_material, b"junk")
    signing, _ = store.generate_key_pair("ECC_NIST_P256", kek)
    assert signing.kind == "ECC_NIST_P256"
    with pytest.raises(HsmError):
        store.derive_shared_secret(signing, _public_der(peer))
    with pytest.raises(HsmError):
        store.decrypt_rsa(signing, "RSAES_OAEP_SHA_1", bytes(256))
    with pytest.raises(HsmError):
        store.sign(rsa_material, "RSASSA_PSS_SHA_256", os.urandom(32))
    for spec, usage in (("ECC_NIST_P256", "ENCRYPT_DECRYPT"), ("RSA_2048", "KEY_AGREEMENT")):
        with pytest.raises(HsmError):
            store.generate_key_pair(spec, kek, usage)
    store.destroy_kek(kek)
    with pytest.raises(HsmError, match="destroyed"):
        store.derive_shared_secret(ecdh_material, _public_der(peer))
    with pytest.raises(HsmError, match="destroyed"):
        store.decrypt_rsa(
            rsa_material, "RSAES_OAEP_SHA_1", _encrypt(rsa_public, "RSAES_OAEP_SHA_1", b"x")
        )
