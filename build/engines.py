"""`make engines`: exported model + deployment spec -> a servable Triton model repository.

    python -m build.engines                                  # spec: configs/deployment.json
    python -m build.engines --backend onnxruntime --out repo_for_ngc_triton

Detects what the local server can run (one line), picks the classifier backend (`--backend auto`)
and writes the repository. Then: `tritonserver --model-repository model_repository`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from build import capabilities
from build.repository import write_repository
from build.spec import BACKENDS, DEFAULT_SPEC_PATH, PRECISIONS, DeploymentSpec


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC_PATH), help="deployment spec JSON (default: %(default)s)")
    p.add_argument("--artifacts", default=None, help="exported model folder (default: the spec's)")
    p.add_argument("--out", default="model_repository", help="repository to write (default: %(default)s)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="classifier backend (default: the spec's)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="classifier precision (default: the spec's)")
    return p


def main(args: argparse.Namespace) -> dict:
    spec_path = Path(args.spec)
    spec = DeploymentSpec.load(spec_path) if spec_path.exists() else DeploymentSpec()
    source = str(spec_path) if spec_path.exists() else "the built-in default DeploymentSpec"
    overrides = {k: v for k, v in (("artifacts", args.artifacts), ("backend", args.backend),
                                   ("precision", args.precision)) if v is not None}
    spec = spec.replace(**overrides)
    if overrides:
        source += " with " + ", ".join(f"{k}={v}" for k, v in overrides.items())

    caps = capabilities.detect()
    backend, why = capabilities.resolve_backend(spec.backend, caps)
    print(f"capabilities: {caps.line()}")
    print(f"classifier backend: {backend} ({why})")
    if backend != "python-onnxruntime" and backend not in caps.server_backends:
        print(f"note: the local tritonserver has no {backend!r} backend; this repository is for a server that has")
    if spec.precision != "fp32":
        raise ValueError(f"precision {spec.precision!r} is not built yet: only fp32 is available in this version")

    manifest = write_repository(spec, backend, Path(args.out), spec_source=source)
    print(f"wrote {args.out}/: {', '.join(manifest['models'])} "
          f"(input {manifest['input_dims']}, {manifest['num_classes']} classes, max batch {spec.max_batch_size})")
    print(f"serve it:  tritonserver --model-repository {args.out}")
    return manifest


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"build.engines: {exc}")
