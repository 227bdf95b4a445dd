"""KeyLedger write side: domain, KMS operations service, keystore port, chain."""
