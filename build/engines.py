"""`make engines`: exported model + deployment spec -> a servable Triton model repository.

    python -m build.engines                                  # spec: configs/deployment.json
    python -m build.engines --precision int8                 # calibrate, quantize, gate, deploy
    python -m build.engines --backend onnxruntime --out repo_for_ngc_triton

Detects what the local server can run (one line), picks the classifier backend (`--backend auto`)
and writes the repository. Then: `tritonserver --model-repository model_repository`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from build.precision import validate
from build.repository import capabilities, configs
from build.precision.calibrate import CACHE_METHODS
from build.precision.quantize import CPU_LAYOUTS
from build.repository.writer import check_replaceable, write_repository
from build.repository.spec import BACKENDS, DEFAULT_SPEC_PATH, PRECISIONS, DeploymentSpec
from build.precision.variants import GateFailed, VariantOptions, prepare
from serving.health import number


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC_PATH), help="deployment spec JSON (default: %(default)s)")
    p.add_argument("--artifacts", default=None, help="exported model folder (default: the spec's)")
    p.add_argument("--out", default="model_repository", help="repository to write (default: %(default)s)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="classifier backend (default: the spec's)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="classifier precision (default: the spec's)")
    p.add_argument("--calibration-method", default="max", choices=CACHE_METHODS,
                   help="for int8; qat: the cache python -m training.qat wrote (default: %(default)s)")
    p.add_argument("--calibration-images", default=None, help="folder (default: bundled calibration photos)")
    p.add_argument("--held-out", default=None, help="folder for the accuracy gate (default: bundled held-out photos)")
    p.add_argument("--min-agreement-fp16", type=number(float, 0, 1), default=validate.THRESHOLDS["fp16"],
                   help="a share in [0, 1] (default: %(default)s)")
    p.add_argument("--min-agreement-int8", type=number(float, 0, 1), default=validate.THRESHOLDS["int8"],
                   help="a share in [0, 1] (default: %(default)s)")
    p.add_argument("--int8-cpu-layout", default="auto", choices=["auto", *CPU_LAYOUTS],
                   help="integer layout of the INT8 CPU file: vnni (CPUs with VNNI only), avx2 (right on every x86 "
                        "CPU); auto: this CPU's for the python backend (it refuses a file its CPU cannot run), avx2 "
                        "for the onnxruntime backend (default: %(default)s)")
    p.add_argument("--int8-max-float-layers", type=number(int, 0), default=8,
                   help="an INT8 CPU file that fails the gate gets up to this many of its most costly layers back "
                        "in float, as few as pass (0: never) (default: %(default)s)")
    p.add_argument("--max-accuracy-drop", type=number(float, 0, 1), default=validate.ACCURACY_DROP,
                   help="with a labelled --held-out: how far below FP32's true top-1 a variant may fall "
                        "(default: %(default)s)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="deploy FP32 when the requested precision fails the accuracy gate (default: fail)")
    p.add_argument("--discard-rollouts", action="store_true",
                   help="rebuild --out even though versions, A/B candidates or other files were added to it since "
                        "it was written (serving.rollout's), deleting them (default: refuse)")
    p.add_argument("--target-tensorrt", default=None,
                   help="TensorRT version of the server that will load the plan, e.g. 10.13.2.6 (default: the spec's "
                        "target_server, else this machine's; docs/gpu.md)")
    p.add_argument("--target-compute-capability", default=None,
                   help="compute capability of that server's GPU, e.g. 9.0 (default: the spec's, else this machine's)")
    return p


def main(args: argparse.Namespace) -> dict:
    spec, source = DeploymentSpec.load_or_default(args.spec)
    overrides = {k: v for k, v in (("artifacts", args.artifacts), ("backend", args.backend),
                                   ("precision", args.precision)) if v is not None}
    target = {k: v for k, v in (("tensorrt", getattr(args, "target_tensorrt", None)),
                                ("compute_capability", getattr(args, "target_compute_capability", None))) if v}
    if target:
        overrides["target_server"] = {**spec.target_server, **target}
    spec = spec.replace(**overrides)
    if overrides:
        source += " with " + ", ".join(f"{k}={v}" for k, v in overrides.items())

    check_replaceable(Path(args.out), getattr(args, "discard_rollouts", False))  # before minutes of calibration and gating
    caps = capabilities.detect()
    backend, why = capabilities.resolve_backend(spec.backend, caps, spec.pipeline)
    print(f"capabilities: {caps.line()}")
    print(f"classifier backend: {backend} ({why})")
    kind = configs.classifier_kind(spec, backend)  # a kind the backend cannot run fails before any build step
    if caps.gpus and backend == "onnxruntime" and kind == "KIND_CPU":
        print('note: the onnxruntime classifier runs on CPU; "classifier_kind": "KIND_GPU" in the spec puts it '
              "on the GPU")
    if backend != "python-onnxruntime" and backend not in caps.server_backends:
        print(f"note: the local tritonserver has no {backend!r} backend; this repository is for a server that has it")
    options = VariantOptions(args.calibration_method, args.calibration_images, args.held_out,
                             {"fp16": args.min_agreement_fp16, "int8": args.min_agreement_int8,
                              "accuracy_drop": args.max_accuracy_drop}, args.allow_fallback,
                             args.int8_cpu_layout, args.int8_max_float_layers)
    deployable = prepare(spec, backend, args.spec, options)
    spec = spec.replace(precision=deployable.precision)  # what is served: FP32 after --allow-fallback
    manifest = write_repository(spec, backend, Path(args.out), spec_source=source, model_file=deployable.model_file,
                                extra={"variant": deployable.variant, "precision": deployable.precision,
                                       "validation": [vars(r) for r in deployable.reports]},
                                held_out=args.held_out, discard_additions=getattr(args, "discard_rollouts", False))
    print(f"classifier: {deployable.variant} ({deployable.model_file})")
    print(f"wrote {args.out}/: {', '.join(manifest['models'])} "
          f"(input {manifest['input_dims']}, {manifest['num_classes']} classes, max batch {spec.max_batch_size})")
    for caution in spec.cautions():
        print(f"caution: {caution}")
    print(f"serve it:  tritonserver --model-repository {args.out}")
    return manifest


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, ValueError, RuntimeError, GateFailed) as exc:
        sys.exit(f"build.engines: {exc}")
