"""Triton python-backend model `classifier` in the *fused* pipeline: encoded image bytes -> decode,
resize, crop, normalise -> ONNX Runtime -> probabilities, in one process.

GENERATED into the model repository by `python -m build.engines` when the deployment spec says
`"pipeline": "fused"` (source: build/templates/classifier_fused.py). The ensemble keeps its API
(IMAGE in, PROBABILITIES out) with this single step. On a CPU-only server whose classifier is itself
a python model, this saves the second python model's inter-process round trip per batch that the
preprocess -> classifier ensemble pays (measured: `make bench`, README; the size of the tensor
between the two is not the cost: passing uint8 instead of float32 changed nothing measurable). Bad items fail their own
request with INVALID_ARG, exactly as in the `preprocess` model.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from onnxsession import cpu_session  # copies of common/onnxsession.py and common/preprocessing.py
from preprocessing import DecodeLimits, PreprocessConfig, preprocess_requests

INPUT = "IMAGE"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        self.config = PreprocessConfig.load(os.path.join(here, "preprocess.json"))
        self.limits = DecodeLimits.from_parameters(params)
        threads = int(params.get("threads", "1"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        path = os.path.join(here, params.get("onnx_file", "model.onnx"))
        self.session = cpu_session(path, int(params.get("intra_op_threads", "1")),
                                   params.get("allow_spinning", "0") == "1")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        items = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy().reshape(-1) for r in requests]
        pixels, outcomes = preprocess_requests(items, self.config, self.limits, self.pool)
        results = self.session.run(self.output_names, {self.input_name: pixels}) if pixels is not None else []
        responses = []
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                start, stop = outcome
                tensors = [pb_utils.Tensor(n, r[start:stop]) for n, r in zip(self.output_names, results)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            else:
                error = pb_utils.TritonError(str(outcome), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses

    def finalize(self):
        if self.pool:
            self.pool.shutdown(wait=False)
