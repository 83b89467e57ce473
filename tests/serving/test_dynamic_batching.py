"""Under concurrent requests the server really batches: statistics show executions of size > 1."""
import asyncio

import pytest
import tritonclient.grpc as grpcclient

from clients.client import AsyncImageClassifierClient

pytestmark = pytest.mark.slow


def batch_sizes(url: str, model: str) -> dict[int, int]:
    """{batch size: executions} from Triton's statistics extension."""
    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


def test_concurrent_requests_are_batched(server, photos):
    images = list(photos.values())

    async def flood():
        async with AsyncImageClassifierClient(server.grpc_url, "grpc") as client:
            await asyncio.gather(*(client.classify([images[i % len(images)]], top_k=1) for i in range(48)))

    before = {m: batch_sizes(server.grpc_url, m) for m in ("preprocess", "classifier")}
    asyncio.run(flood())
    for model in ("preprocess", "classifier"):
        after = batch_sizes(server.grpc_url, model)
        grown = {size: after[size] - before[model].get(size, 0) for size in after}
        assert sum(size * n for size, n in grown.items()) == 48, (model, grown)
        assert any(size > 1 and n > 0 for size, n in grown.items()), (model, grown)
