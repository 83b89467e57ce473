"""Triton python-backend model `preprocess`: encoded image bytes -> normalised pixels.

GENERATED into the model repository by `python -m build.engines` (source:
build/repository/templates/preprocess_model.py). `image_model.py` and `preprocessing.py` next to this file are
copies of the project's shared model code and its one preprocessing definition; `preprocess.json`
holds this model's numbers.

One response per request, always. An item that is not a usable image fails *its* request with
INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) and a message naming the item and the problem; the
other requests of the dynamic batch carry on. Decoding runs on a small thread pool (Pillow
releases the GIL) and all crops of the batch are normalised in one vectorised step.
"""
import triton_python_backend_utils as pb_utils

from contract import PIXELS as OUTPUT
from image_model import ImageModel


class TritonPythonModel(ImageModel):
    def execute(self, requests):
        pixels, outcomes = self.decode(requests)
        return self.respond(outcomes, lambda start, stop: [pb_utils.Tensor(OUTPUT, pixels[start:stop])])
