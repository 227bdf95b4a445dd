"""Keystore port: where key material lives. Only ``pkcs11_adapter`` imports pkcs11."""

from ledger.keystore.port import KeyStore, MaterialRef

__all__ = ["KeyStore", "MaterialRef"]
