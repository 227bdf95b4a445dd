"""Public-key operations on the host (``cryptography``): signature verification and
RSA-OAEP encryption.

No KMS private key is involved: AWS KMS does these in the service too, and anyone can
verify or encrypt offline with the DER key GetPublicKey returns.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def verify_digest(
    public_key_der: bytes, signing_algorithm: str, digest: bytes, signature: bytes
) -> bool:
    """True when ``signature`` is valid for ``digest`` under the AWS signing algorithm.

    Never raises for a bad signature or malformed signature bytes (returns False);
    raises ValueError for a public key that does not match the algorithm family.
    """
    algorithm = _HASHES[signing_algorithm.rsplit("_", 1)[1]]()
    prehashed = utils.Prehashed(algorithm)
    key = serialization.load_der_public_key(public_key_der)
    try:
        if signing_algorithm.startswith("ECDSA"):
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ValueError("not an EC public key")
            key.verify(signature, digest, ec.ECDSA(prehashed))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise ValueError("not an RSA public key")
            pad: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
                if signing_algorithm.startswith("RSASSA_PSS")
                else padding.PKCS1v15()
            )
            key.verify(signature, digest, pad, prehashed)
    except InvalidSignature:
        return False
    return True


def _hash(algorithm: str) -> hashes.HashAlgorithm:
    return hashes.SHA1() if algorithm.endswith("SHA_1") else hashes.SHA256()  # noqa: S303


def rsa_encrypt(public_key_der: bytes, encryption_algorithm: str, plaintext: bytes) -> bytes:
    """RSAES-OAEP (MGF1 with the same hash, empty label), as AWS KMS encrypts.

    Raises ValueError for a non-RSA key or a plaintext over the OAEP limit.
    """
    key = serialization.load_der_public_key(public_key_der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    h = _hash(encryption_algorithm)
    return key.encrypt(plaintext, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
