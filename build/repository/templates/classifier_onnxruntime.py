"""Triton python-backend model `classifier`: ONNX Runtime on the CPU.

GENERATED into the model repository by `python -m build.engines` (source:
build/repository/templates/classifier_onnxruntime.py). Used where the server has no onnxruntime backend
(the tritonserver from the nvidia-pytriton wheel ships only the python backend).

All requests of a dynamic batch run as one ONNX Runtime call; one response per request. Each call's
answers are counted in the quality metrics (`quality_metrics.py`, against this version's
`quality_reference.json`); a failure there is logged and never fails a request.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from onnxsession import cpu_session  # a copy of common/onnxsession.py
from priority import lower  # a copy of common/priority.py
from quality_metrics import open_quality_metrics  # a copy of build/repository/templates/quality_metrics.py


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        lower(int(params.get("nice", "0")))  # before ONNX Runtime starts its threads: they inherit it
        here = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(here, params.get("onnx_file", "model.onnx"))
        self.session = cpu_session(path, int(params.get("intra_op_threads", "1")),
                                   params.get("allow_spinning", "0") == "1")
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.quality = open_quality_metrics(pb_utils, args, here, self.output_names)

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [len(b) for b in batches]
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        results = self.session.run(self.output_names, {self.input_name: batch})
        self.quality.record(results)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, r[start : start + size]) for n, r in zip(self.output_names, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.quality.close()
