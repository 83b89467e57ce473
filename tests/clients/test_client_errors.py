"""What the client library and its command lines say about bad input before any server answers: a host
name that does not resolve, port 0, an unknown protocol, --top-k below 1."""
from __future__ import annotations

import asyncio

import pytest

from clients.client import AsyncImageClassifierClient, ImageClassifierClient, ServerUnavailable
from clients.endpoint import split_url


async def _classify_async(url: str, protocol: str) -> None:
    async with AsyncImageClassifierClient(url, protocol) as client:
        await client.classify([b"x"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unresolvable_host_is_named(protocol):
    for classify in (lambda url: ImageClassifierClient(url, protocol).classify([b"x"]),
                     lambda url: asyncio.run(_classify_async(url, protocol))):
        with pytest.raises(ServerUnavailable, match=r"the host name of nosuchhost\.invalid:\d+ does not resolve"):
            classify("nosuchhost.invalid")


def test_port_zero_is_refused():
    assert split_url("127.0.0.1") == ("http", "127.0.0.1:8000")
    for url in ("127.0.0.1:0", "grpc://127.0.0.1:0"):
        with pytest.raises(ValueError, match=r"port 0 is no server's port"):
            split_url(url)


def test_unknown_protocol_is_a_value_error():
    for url in (None, "127.0.0.1:8000"):
        with pytest.raises(ValueError, match=r"protocol 'https' is not one of \('http', 'grpc'\)"):
            ImageClassifierClient(url, protocol="https")
