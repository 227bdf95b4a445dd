"""The AWS-KMS-compatible HTTP endpoint: JSON 1.1 protocol, STS, SigV4, the ASGI app."""
