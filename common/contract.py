"""The names and limits that the exporter, the repository generator, the served models, the clients and
the benchmarks must agree on. Nobody re-types them: they import them from here.

Standard library only: the build copies this file into the model repository next to the served
models' code, so the repository stays self-contained.
"""
from __future__ import annotations

import dataclasses
import math

# ---- tensors ------------------------------------------------------------------------------------
# The exported ONNX classifier (training.export writes them; every runner feeds and reads them).
ONNX_INPUT = "images"  # float32 [batch, 3, crop, crop] (or NHWC), normalised
ONNX_LOGITS = "logits"
ONNX_PROBABILITIES = "probabilities"
ONNX_OUTPUTS = (ONNX_LOGITS, ONNX_PROBABILITIES)
BATCH_AXIS = "batch"
# The served API (the ensemble) and the tensor between its two steps.
IMAGE = "IMAGE"  # BYTES [batch, 1]: one encoded image per item
PROBABILITIES = "PROBABILITIES"  # FP32 [batch, classes]
PIXELS = "PIXELS"  # preprocess -> classifier: the normalised batch
MAX_BATCH_SIZE = 32  # the served models' default max_batch_size (the spec can change it; README's API)

# ---- models in the repository (the deployment spec's defaults) ----------------------------------
ENSEMBLE = "image_classifier"
PREPROCESS = "preprocess"
CLASSIFIER = "classifier"

# ---- files in an artifacts folder (training.export writes them, build.* reads them) -------------
MODEL_ONNX = "model.onnx"
LABELS_TXT = "labels.txt"
PREPROCESS_JSON = "preprocess.json"
EXPORT_JSON = "export.json"
REFERENCE_NPZ = "reference.npz"


# ---- what a served image may be ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What the models that decode images accept; anything else fails its own request as a client error
    (HTTP 400 / gRPC INVALID_ARGUMENT). Checked from the header, before any pixel is decoded, where the
    format allows. The deployment spec's `limits` and the served models' config parameters carry these
    fields under these names."""

    __pydantic_config__ = {"strict": True, "extra": "forbid"}  # a loaded deployment spec's (build/repository/spec.py)

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # declared width x height (decompression-bomb guard)
    min_image_side: int = 16
    # longer side / shorter side: resizing the shorter side to `resize` scales the longer one by the
    # same factor, so a thin strip inside max_image_pixels could still ask for an enormous resize
    max_image_aspect_ratio: float = 100.0

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "ImageLimits":
        """From a Triton model config's string parameters (max_image_aspect_ratio is optional, for
        repositories built before it)."""
        return cls(int(params["max_image_bytes"]), int(params["max_image_pixels"]), int(params["min_image_side"]),
                   float(params.get("max_image_aspect_ratio", cls.max_image_aspect_ratio)))

    def to_parameters(self) -> dict[str, str]:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in values.items()}

    def check(self, decoder_max_pixels: int | None = None) -> None:
        """`decoder_max_pixels`: the decoder's own limit (Pillow's Image.MAX_IMAGE_PIXELS, which warns above it
        and refuses above twice it): a larger max_image_pixels could never take effect as written."""
        if min(self.max_image_bytes, self.max_image_pixels, self.min_image_side) < 1:
            raise ValueError(f"image limits must be positive, got {self}")
        if not math.isfinite(self.max_image_aspect_ratio):  # NaN compares false: it turned the guard off
            raise ValueError("limits.max_image_aspect_ratio must be a finite number, "
                             f"got {self.max_image_aspect_ratio}")
        if self.max_image_aspect_ratio < 1:
            raise ValueError(f"limits.max_image_aspect_ratio must be >= 1, got {self.max_image_aspect_ratio}")
        if decoder_max_pixels is not None and self.max_image_pixels > decoder_max_pixels:
            raise ValueError(f"limits.max_image_pixels must be at most {decoder_max_pixels} (the image decoder's own "
                             f"limit, Pillow's MAX_IMAGE_PIXELS), got {self.max_image_pixels}")
