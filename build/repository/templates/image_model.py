"""What the python-backend models that take encoded images share: `preprocess` (ensemble) and the
fused `classifier`. Copied next to their model.py by `python -m build.engines` (source:
build/repository/templates/image_model.py), with `preprocessing.py`, `contract.py`, `priority.py` and
`preprocess.json`.

`ImageModel.initialize` reads the model's parameters (image limits, decode `threads`, the stub's `nice`
increment) and its preprocess.json; `decode` turns a dynamic batch of requests into one normalised
batch; `respond` gives one response per request, always: a request with an item that is not a usable
image fails with INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) and a message naming the item and the
problem, and the other requests of the batch carry on.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils
from PIL import Image

from contract import IMAGE as INPUT, ImageLimits
from preprocessing import ImageError, PreprocessConfig, preprocess_requests
from priority import lower  # a copy of common/priority.py


class ImageModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        lower(int(self.params.get("nice", "0")))  # before any thread starts: they inherit it
        self.here = os.path.join(args["model_repository"], args["model_version"])
        self.config = PreprocessConfig.load(os.path.join(self.here, "preprocess.json"))
        self.limits = ImageLimits.from_parameters(self.params)
        self.limits.check(Image.MAX_IMAGE_PIXELS)  # a repository whose config was edited by hand
        threads = int(self.params.get("threads", "1"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def decode(self, requests):
        """-> (float32 batch of every good request's images or None, per request (start, stop) or ImageError)."""
        items = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy().reshape(-1) for r in requests]
        return preprocess_requests(items, self.config, self.limits, self.pool)

    @staticmethod
    def respond(outcomes, tensors):
        """One response per request: `tensors(start, stop)` for a good one, INVALID_ARG for bad input, INTERNAL
        for an item that failed otherwise (preprocessing.PreprocessFault)."""
        responses = []
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors(*outcome)))
            else:
                bad_input = isinstance(outcome, ImageError)
                code = pb_utils.TritonError.INVALID_ARG if bad_input else pb_utils.TritonError.INTERNAL
                error = pb_utils.TritonError(str(outcome), code)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses

    def finalize(self):
        if self.pool:
            self.pool.shutdown(wait=False)
