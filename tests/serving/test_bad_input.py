"""Bad input fails its own request with a client error naming the problem; nothing else breaks."""
import threading

import pytest
from PIL import Image

from clients.client import ClassificationError, ImageClassifierClient
from common.samples import ESPRESSO
from tests.images import encode, png_declaring, tiff_grey

pytestmark = pytest.mark.slow


def tiny_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")


BAD = {
    "empty": (lambda photos: b"", "empty input"),
    "not-an-image": (lambda photos: b"GIF89a? no, just text" * 3, "image"),
    "truncated-jpeg": (lambda photos: photos["rocket"][: len(photos["rocket"]) // 3], "truncated"),
    "one-pixel": (lambda photos: tiny_png(), "1x1"),
    "decompression-bomb": (lambda photos: png_declaring(50_000, 50_000), "refused before decoding"),
    "extreme-aspect-ratio": (lambda photos: png_declaring(16, 3_000_000), "aspect ratio of 187500:1"),
    "tiff-tile-bomb": (lambda photos: tiff_grey(64, 64, 128, tile=(16384, 16384)), "TIFF tiles of 16384x16384"),
}


def client_error_status(protocol: str) -> str:
    """One status vocabulary over both protocols (gRPC's names): HTTP 400 is INVALID_ARGUMENT too."""
    return "INVALID_ARGUMENT"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_is_a_client_error(server, photos, protocol, case):
    make, expected = BAD[case]
    url = server.http_url if protocol == "http" else server.grpc_url
    with ImageClassifierClient(url, protocol) as client:
        with pytest.raises(ClassificationError) as info:
            client.classify([photos["coffee"], make(photos)])
        assert info.value.status == client_error_status(protocol)
        assert info.value.is_client_error
        assert "image 1" in str(info.value) and expected in str(info.value)
        assert client.classify([photos["coffee"]])[0][0].index == ESPRESSO  # the next request is fine
        assert client.is_ready()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_too_many_items_is_a_client_error(server, photos, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with ImageClassifierClient(url, protocol) as client:
        with pytest.raises(ClassificationError) as info:
            client.classify([photos["coffee"]] * 33)  # max_batch_size is 32
        assert info.value.status == client_error_status(protocol)
        assert "batch" in str(info.value).lower()
        assert len(client.classify([photos["coffee"]] * 32)) == 32



@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_of_no_images_is_refused_by_triton_itself(server, photos, protocol):
    """An IMAGE of shape [0, 1] never reaches the models: Triton 2.51 refuses it (HTTP 400 / INVALID_ARGUMENT).
    The models refuse one anyway, as that request's own error (test_preprocessing's
    test_a_request_of_no_images_is_its_own_bad_input)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from common.contract import ENSEMBLE, IMAGE

    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        for shape in ([0, 1], [1, 1]):
            image = module.InferInput(IMAGE, shape, "BYTES")
            image.set_data_from_numpy(np.full(shape, photos["coffee"], dtype=np.object_))
            if shape[0]:
                assert client.infer(ENSEMBLE, [image]).as_numpy("PROBABILITIES").shape[0] == 1
                continue
            with pytest.raises(InferenceServerException) as refused:
                client.infer(ENSEMBLE, [image])
            assert refused.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
            assert f"expected 1 string elements for inference input '{IMAGE}'" in refused.value.message()
            assert "got 0" in refused.value.message()
    finally:
        client.close()
    assert server.is_ready()

def test_good_requests_in_the_same_dynamic_batch_succeed(server, photos):
    """Good and bad requests sent at once (so they share dynamic batches): each gets its own answer."""
    cases = [("good", photos["coffee"])] * 12 + [(name, BAD[name][0](photos)) for name in sorted(BAD)] * 2
    outcomes = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def send(i, image):
        with ImageClassifierClient(server.grpc_url, "grpc") as client:
            barrier.wait()
            try:
                outcomes[i] = client.classify([image], top_k=1)[0][0].index
            except ClassificationError as exc:
                outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i, image)) for i, (_, image) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (name, _), outcome in zip(cases, outcomes):
        if name == "good":
            assert outcome == ESPRESSO
        else:
            assert isinstance(outcome, ClassificationError) and outcome.is_client_error, (name, outcome)
    assert server.process.poll() is None and server.is_ready()
