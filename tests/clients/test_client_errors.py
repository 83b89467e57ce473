"""What the client library and its command lines say about bad input before any server answers: a host
name that does not resolve, port 0, an unknown protocol, --top-k below 1."""
from __future__ import annotations

import asyncio

import pytest

from clients.client import AsyncImageClassifierClient, ImageClassifierClient, ServerUnavailable


async def _classify_async(url: str, protocol: str) -> None:
    async with AsyncImageClassifierClient(url, protocol) as client:
        await client.classify([b"x"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unresolvable_host_is_named(protocol):
    for classify in (lambda url: ImageClassifierClient(url, protocol).classify([b"x"]),
                     lambda url: asyncio.run(_classify_async(url, protocol))):
        with pytest.raises(ServerUnavailable, match=r"the host name of nosuchhost\.invalid:\d+ does not resolve"):
            classify("nosuchhost.invalid")
