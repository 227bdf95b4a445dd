"""Which algorithms each key spec and usage supports (AWS KMS key spec reference).

Pure tables shared by the service, the domain's CloudTrail responses and the read
models, so KeyMetadata is the same wherever it is answered.
"""

from __future__ import annotations

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
HMAC_MAC_ALGORITHM = {
    "HMAC_224": "HMAC_SHA_224",
    "HMAC_256": "HMAC_SHA_256",
    "HMAC_384": "HMAC_SHA_384",
    "HMAC_512": "HMAC_SHA_512",
}
MAC_ALGORITHMS = tuple(HMAC_MAC_ALGORITHM.values())
_RSA_SIGNING = [
    f"{scheme}_SHA_{bits}"
    for scheme in ("RSASSA_PSS", "RSASSA_PKCS1_V1_5")
    for bits in (256, 384, 512)
]
SIGNING_ALGORITHMS_BY_SPEC = {
    "RSA_2048": _RSA_SIGNING,
    "RSA_3072": _RSA_SIGNING,
    "RSA_4096": _RSA_SIGNING,
    "ECC_NIST_P256": ["ECDSA_SHA_256"],
    "ECC_NIST_P384": ["ECDSA_SHA_384"],
    "ECC_NIST_P521": ["ECDSA_SHA_512"],
    "ECC_SECG_P256K1": ["ECDSA_SHA_256"],
}
SIGNING_ALGORITHMS = tuple(sorted({a for v in SIGNING_ALGORITHMS_BY_SPEC.values() for a in v}))
DIGEST_LENGTH = {"256": 32, "384": 48, "512": 64}
# Which usages AWS allows for each spec (CreateKey rejects others with ValidationException).
COMPATIBLE_USAGES = {
    SYMMETRIC_DEFAULT: ("ENCRYPT_DECRYPT",),
    **{spec: ("GENERATE_VERIFY_MAC",) for spec in HMAC_MAC_ALGORITHM},
    **{spec: ("ENCRYPT_DECRYPT", "SIGN_VERIFY") for spec in ("RSA_2048", "RSA_3072", "RSA_4096")},
    **{
        spec: ("SIGN_VERIFY", "KEY_AGREEMENT")
        for spec in ("ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521")
    },
    "ECC_SECG_P256K1": ("SIGN_VERIFY",),
}
# The key specs and usages this version can create (others: UnsupportedOperationError).
SUPPORTED_USAGES = COMPATIBLE_USAGES
RSA_ENCRYPTION_ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")
RSA_MODULUS_BYTES = {"RSA_2048": 256, "RSA_3072": 384, "RSA_4096": 512}
KEY_PAIR_SPECS = (
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
)


def rsa_max_plaintext(key_spec: str, algorithm: str) -> int:
    """AWS's RSAES-OAEP plaintext limit: modulus bytes - 2 * hash bytes - 2."""
    hash_len = 20 if algorithm.endswith("SHA_1") else 32
    return RSA_MODULUS_BYTES[key_spec] - 2 * hash_len - 2


def digest_length(signing_algorithm: str) -> int:
    """Bytes of the hash a signing algorithm uses (``..._SHA_384`` -> 48)."""
    return DIGEST_LENGTH[signing_algorithm.rsplit("_", 1)[1]]


def key_algorithms(key_spec: str, key_usage: str) -> dict[str, list[str]]:
    """The algorithm lists DescribeKey shows (``EncryptionAlgorithms``, ``MacAlgorithms``)."""
    if key_spec == SYMMETRIC_DEFAULT and key_usage == "ENCRYPT_DECRYPT":
        return {"EncryptionAlgorithms": [SYMMETRIC_DEFAULT]}
    if key_spec in HMAC_MAC_ALGORITHM and key_usage == "GENERATE_VERIFY_MAC":
        return {"MacAlgorithms": [HMAC_MAC_ALGORITHM[key_spec]]}
    if key_spec in SIGNING_ALGORITHMS_BY_SPEC and key_usage == "SIGN_VERIFY":
        return {"SigningAlgorithms": list(SIGNING_ALGORITHMS_BY_SPEC[key_spec])}
    if key_spec in RSA_MODULUS_BYTES and key_usage == "ENCRYPT_DECRYPT":
        return {"EncryptionAlgorithms": list(RSA_ENCRYPTION_ALGORITHMS)}
    if key_usage == "KEY_AGREEMENT":
        return {"KeyAgreementAlgorithms": ["ECDH"]}
    return {}


def camel(fields: dict[str, list[str]]) -> dict[str, list[str]]:
    """``EncryptionAlgorithms`` -> ``encryptionAlgorithms`` (CloudTrail's spelling)."""
    return {k[:1].lower() + k[1:]: v for k, v in fields.items()}
