"""Triton python-backend model `preprocess`: encoded image bytes -> normalised pixels.

GENERATED into the model repository by `python -m build.engines` (source:
build/templates/preprocess_model.py). `preprocessing.py` next to this file is a copy of the
project's one preprocessing definition; `preprocess.json` holds this model's numbers.

One response per request, always. An item that is not a usable image fails *its* request with
INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) and a message naming the item and the problem; the
other requests of the dynamic batch carry on. Decoding runs on a small thread pool (Pillow
releases the GIL) and all crops of the batch are normalised in one vectorised step.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from preprocessing import DecodeLimits, PreprocessConfig, preprocess_requests

INPUT, OUTPUT = "IMAGE", "PIXELS"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        self.config = PreprocessConfig.load(os.path.join(here, "preprocess.json"))
        self.limits = DecodeLimits.from_parameters(params)
        threads = int(params.get("threads", "1"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def execute(self, requests):
        items = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy().reshape(-1) for r in requests]
        pixels, outcomes = preprocess_requests(items, self.config, self.limits, self.pool)
        responses = []
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                tensor = pb_utils.Tensor(OUTPUT, pixels[outcome[0] : outcome[1]])
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            else:
                error = pb_utils.TritonError(str(outcome), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses

    def finalize(self):
        if self.pool:
            self.pool.shutdown(wait=False)
