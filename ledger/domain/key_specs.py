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
# The key specs and usages this version can create (others: UnsupportedOperationError).
SUPPORTED_USAGE = {SYMMETRIC_DEFAULT: "ENCRYPT_DECRYPT"} | {
    spec: "GENERATE_VERIFY_MAC" for spec in HMAC_MAC_ALGORITHM
}


def key_algorithms(key_spec: str, key_usage: str) -> dict[str, list[str]]:
    """The algorithm lists DescribeKey shows (``EncryptionAlgorithms``, ``MacAlgorithms``)."""
    if key_spec == SYMMETRIC_DEFAULT and key_usage == "ENCRYPT_DECRYPT":
        return {"EncryptionAlgorithms": [SYMMETRIC_DEFAULT]}
    if key_spec in HMAC_MAC_ALGORITHM and key_usage == "GENERATE_VERIFY_MAC":
        return {"MacAlgorithms": [HMAC_MAC_ALGORITHM[key_spec]]}
    return {}


def camel(fields: dict[str, list[str]]) -> dict[str, list[str]]:
    """``EncryptionAlgorithms`` -> ``encryptionAlgorithms`` (CloudTrail's spelling)."""
    return {k[:1].lower() + k[1:]: v for k, v in fields.items()}
