"""Triton python-backend model `classifier` in the *fused* pipeline: encoded image bytes -> decode,
resize, crop, normalise -> ONNX Runtime -> probabilities, in one process.

GENERATED into the model repository by `python -m build.engines` when the deployment spec says
`"pipeline": "fused"` (source: build/repository/templates/classifier_fused.py). The ensemble keeps its API
(IMAGE in, PROBABILITIES out) with this single step. On a CPU-only server whose classifier is itself
a python model, this saves the second python model's inter-process round trip per batch that the
preprocess -> classifier ensemble pays (docs/benchmarks.md: `make bench` measures both; the size of
the tensor between the two is not the cost). Bad
items fail their own request with INVALID_ARG: decoding and responses are `image_model.py`'s, shared
with the `preprocess` model. Each call's answers are counted in the quality metrics
(`quality_metrics.py`, against this version's `quality_reference.json`).
"""
import os

import triton_python_backend_utils as pb_utils

# copies of build/repository/templates/image_model.py and common/onnxsession.py (and common/preprocessing.py)
from image_model import ImageModel
from onnxsession import cpu_session
from quality_metrics import open_quality_metrics  # copy of build/repository/templates/quality_metrics.py


class TritonPythonModel(ImageModel):
    def initialize(self, args):
        super().initialize(args)
        path = os.path.join(self.here, self.params.get("onnx_file", "model.onnx"))
        self.session = cpu_session(path, int(self.params.get("intra_op_threads", "1")),
                                   self.params.get("allow_spinning", "0") == "1")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o["name"] for o in self.model_config["output"]]
        self.quality = open_quality_metrics(pb_utils, args, self.here, self.output_names)

    def execute(self, requests):
        pixels, outcomes = self.decode(requests)
        results = self.session.run(self.output_names, {self.input_name: pixels}) if pixels is not None else []
        self.quality.record(results)
        return self.respond(outcomes, lambda start, stop: [
            pb_utils.Tensor(n, r[start:stop]) for n, r in zip(self.output_names, results)])

    def finalize(self):
        self.quality.close()
        super().finalize()
