"""Head and body size limits on the real server: an oversized head is refused before
it is buffered, and the server keeps answering."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from urllib.parse import urlparse

import pytest

from tests.api.conftest import Server


def _raw(server: Server, data: bytes) -> bytes:
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        with contextlib.suppress(OSError):  # the server may close before all is sent
            s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("size", [20_000, 2_000_000])
def test_an_oversized_head_gets_400_and_the_server_stays_up(api_server: Server, size: int) -> None:
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 0\r\n\r\n"
    )
    answer = _raw(api_server, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    with urllib.request.urlopen(api_server.url + "/health", timeout=5) as r:  # loopback only
        assert r.status == 200


def test_a_head_within_the_limit_is_answered(api_server: Server) -> None:
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000 + b"\r\n"
        b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    answer = _raw(api_server, request)
    # Reached the application: an AWS error (no signature), not a transport refusal.
    assert answer.startswith(b"HTTP/1.1 400") and b"MissingAuthenticationToken" in answer
