"""Public-key operations on the host (``cryptography``): signature verification,
RSA-OAEP encryption, and data key pairs for GenerateDataKeyPair.

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


_CURVES: dict[str, ec.EllipticCurve] = {
    "ECC_NIST_P256": ec.SECP256R1(),
    "ECC_NIST_P384": ec.SECP384R1(),
    "ECC_NIST_P521": ec.SECP521R1(),
    "ECC_SECG_P256K1": ec.SECP256K1(),
}


def new_key_pair(key_pair_spec: str) -> tuple[bytes, bytes]:
    """A fresh key pair: (PKCS#8 DER private key, DER SubjectPublicKeyInfo).

    Security: returns private key material; callers encrypt it at once and never log
    or store it in the clear. Raises KeyError for an unknown spec.
    """
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_pair_spec.startswith("RSA_"):
        private = rsa.generate_private_key(65537, int(key_pair_spec[4:]))
    else:
        private = ec.generate_private_key(_CURVES[key_pair_spec])
    private_der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_der, public_der
