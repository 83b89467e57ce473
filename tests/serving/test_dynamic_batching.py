"""Under concurrent requests the server really batches: statistics show executions of size > 1."""
import asyncio
import time

import pytest
import tritonclient.grpc as grpcclient

from clients.client import AsyncImageClassifierClient

pytestmark = pytest.mark.slow


def batch_sizes(url: str, model: str) -> dict[int, int]:
    """{batch size: executions} from Triton's statistics extension."""
    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


def grown_sizes(url: str, model: str, before: dict[int, int], images: int) -> dict[int, int]:
    """{batch size: executions} since `before`, once they account for `images` (or after 30 s): the ensemble
    answers before Triton records its last executions in the composing models' statistics."""
    deadline = time.monotonic() + 30
    while True:
        after = batch_sizes(url, model)
        grown = {size: after[size] - before.get(size, 0) for size in after}
        if sum(size * n for size, n in grown.items()) >= images or time.monotonic() > deadline:
            return grown
        time.sleep(0.05)


def test_concurrent_requests_are_batched(server, photos):
    images = list(photos.values())

    async def flood():
        async with AsyncImageClassifierClient(server.grpc_url, "grpc") as client:
            await asyncio.gather(*(client.classify([images[i % len(images)]], top_k=1) for i in range(48)))

    before = {m: batch_sizes(server.grpc_url, m) for m in ("preprocess", "classifier")}
    asyncio.run(flood())
    for model in ("preprocess", "classifier"):
        grown = grown_sizes(server.grpc_url, model, before[model], 48)
        assert sum(size * n for size, n in grown.items()) == 48, (model, grown)
        assert any(size > 1 and n > 0 for size, n in grown.items()), (model, grown)
