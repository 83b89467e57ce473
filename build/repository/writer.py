"""Write a self-contained Triton model repository from a deployment spec and an artifact folder.

    artifacts/<model>/{model.onnx, labels.txt, preprocess.json}
        + configs/deployment.json
        -> model_repository/{preprocess, classifier, image_classifier}/ + BUILD.json

Everything a server needs is copied in (the preprocessing module too), so the folder can be moved
to another Triton server as it is. The folder is rebuilt whole each time (written beside, then
swapped in); a folder that this module did not write is never deleted, nor one to which something was
added since (serving.rollout's versions, candidates and ROLLOUT.json) unless `discard_additions` says so.
"""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import onnx

import common.contract as contract_module
import common.cpu as cpu_module
import common.labels as labels_file
import common.onnxsession as onnxsession_module
import common.preprocessing as preprocessing_module
import common.priority as priority_module
from build.precision import binding
from build.repository import configs, dali, quality
from build.repository.spec import DeploymentSpec
from common import onnxfiles
from common.contract import LABELS_TXT, MODEL_ONNX, PREPROCESS_JSON
from common.preprocessing import PreprocessConfig
from serving.triton_admin import LOCK_FILE

TEMPLATES = Path(__file__).parent / "templates"
MARKER = "BUILD.json"
STAGING = ".staging"  # first file of a repository being written (left behind if the write is interrupted)
README, README_TEMPLATE = "README.md", "repository_README.md"  # the one committed file of model_repository/


def added_since(out: Path) -> list[str]:
    """What a repository this writer wrote holds beside what it wrote: the versions, retired versions and
    A/B candidates serving.rollout adds, its ROLLOUT.json, anyone's files (the model-control lock aside)."""
    models = set(read_manifest(out).get("models", []))
    found = []
    for entry in sorted(out.iterdir(), key=lambda e: e.name):
        if entry.name in models and entry.is_dir():
            found += [f"{entry.name}/{v.name}" for v in sorted(entry.iterdir())
                      if v.is_dir() and v.name not in ("1", "__pycache__")]
        elif entry.name not in (README, MARKER, LOCK_FILE):
            found.append(entry.name)
    return found


def check_replaceable(out: Path, discard_additions: bool = False) -> None:
    """Raise FileExistsError unless `out` is absent, or a repository this writer wrote (with nothing added
    since, or `discard_additions`), or holds nothing but the README it writes. Called before any build step."""
    if not out.exists():
        return
    if not _written_here(out):
        raise FileExistsError(f"{out} exists and was not written by build.engines; refusing to replace it")
    added = added_since(out) if (out / MARKER).exists() else []
    if added and not discard_additions:
        shown = ", ".join(added[:6]) + (f" and {len(added) - 6} more" if len(added) > 6 else "")
        raise FileExistsError(
            f"{out} holds what was added after build.engines wrote it ({shown}): a rebuild would serve version 1 "
            "again and lose the rollout history. Roll a new model out with `make rollout`, build into another "
            "--out, or rebuild from scratch with --discard-rollouts (ENGINES_ARGS=--discard-rollouts)")


def _written_here(out: Path) -> bool:
    """`out` holds a repository this writer wrote, or nothing but the README it writes (as committed)."""
    if (out / MARKER).exists():
        return True
    entries = list(out.iterdir())
    return all(e.name == README and e.read_bytes() == (TEMPLATES / README_TEMPLATE).read_bytes() for e in entries)


class ArtifactsError(FileNotFoundError):
    pass


def read_manifest(repository: str | Path) -> dict:
    """The BUILD.json of a repository this module wrote (what was built from what). Raises
    FileNotFoundError, saying to run `make engines`, where there is none."""
    path = Path(repository) / MARKER
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the repository first (make engines)")
    return json.loads(path.read_text())


def deployed_model_file(build: dict) -> Path | None:
    """The classifier file a repository (`build`, its read_manifest) was built from, unchanged since: a
    benchmark that rebuilds the repository must serve the file that was gated and deployed. ValueError if
    it is gone or has changed (a later `make engines` that failed its gate rewrites the variant in place);
    None if the manifest records none."""
    recorded = build.get("classifier_model") or {}
    if not recorded.get("source"):
        return None
    source = Path(recorded["source"])
    if not source.is_file() or (recorded.get("sha256") and onnxfiles.model_sha256(source) != recorded["sha256"]):
        state = "is gone" if not source.is_file() else "has changed"
        raise ValueError(f"{source}, the classifier file the served repository was built from, {state} since: "
                         "run `make engines` again (with the same PRECISION) to deploy and gate the file there now")
    return source


def write_variants(build: dict, variants: dict[str, DeploymentSpec], out: Path, generator: str) -> dict[str, Path]:
    """{name: out/<name>_repository}: each variant of a served repository's spec (`build`, its read_manifest)
    written with that repository's backend and classifier file (deployed_model_file: the variant or plan
    `make engines` deployed), so that the variants differ from what is served only in their spec."""
    model_file = deployed_model_file(build)
    repos = {}
    for name, spec in variants.items():
        repos[name] = out / f"{name}_repository"
        write_repository(spec, build["backend"], repos[name], generator, model_file=model_file)
    return repos


def read_labels(path: Path) -> list[str]:
    try:
        return labels_file.read_labels(path)
    except ValueError as exc:
        raise ArtifactsError(str(exc)) from None


def model_shape(artifacts: Path, model_file: Path | None = None) -> configs.ModelShape:
    """Input and output shape of the exported model, cross-checked between its files; `model_file` (an ONNX
    file to serve instead of the artifacts' model.onnx) is checked against them too."""
    missing = [n for n in (MODEL_ONNX, LABELS_TXT, PREPROCESS_JSON) if not (artifacts / n).is_file()]
    if missing:
        raise ArtifactsError(
            f"{artifacts} lacks {', '.join(missing)}: run `make export` (python -m training.export) first"
        )
    pre = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    labels = read_labels(artifacts / LABELS_TXT)
    model_file = Path(model_file) if model_file else artifacts / MODEL_ONNX
    graph = onnx.load(str(model_file), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if list(inputs) != [configs.MODEL_INPUT] or not set(configs.MODEL_OUTPUTS) <= set(outputs):
        raise ArtifactsError(
            f"{model_file} has inputs {list(inputs)} and outputs {sorted(outputs)}; expected "
            f"{[configs.MODEL_INPUT]} and {list(configs.MODEL_OUTPUTS)} (export it with training.export)"
        )
    for tensor in (inputs[configs.MODEL_INPUT], *(outputs[n] for n in configs.MODEL_OUTPUTS)):
        if tensor.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            kind = onnx.TensorProto.DataType.Name(tensor.type.tensor_type.elem_type)
            raise ArtifactsError(f"{model_file}: {tensor.name} is {kind}; the served model takes and gives FLOAT")
    batch, *dims = [d.dim_value or None for d in inputs[configs.MODEL_INPUT].type.tensor_type.shape.dim] or [None]
    if batch is not None:  # Triton batches requests along it (max_batch_size), so it must be free
        raise ArtifactsError(f"{model_file} takes batches of exactly {batch}: export it with a dynamic batch axis "
                             "(training.export does)")
    if any(d is not None and d != want for d, want in zip(dims, pre.input_shape)) or len(dims) != len(pre.input_shape):
        raise ArtifactsError(f"{model_file} takes {dims} per image, {PREPROCESS_JSON} makes {list(pre.input_shape)}")
    out_dims = outputs["probabilities"].type.tensor_type.shape.dim
    classes = out_dims[-1].dim_value if out_dims else 0  # no shape declared: nothing to cross-check
    if classes and classes != len(labels):
        raise ArtifactsError(f"{model_file} has {classes} classes but labels.txt has {len(labels)} lines")
    return configs.ModelShape(input_dims=pre.input_shape, num_classes=len(labels), layout=pre.layout)


def weight_files(model_file: Path) -> list[str]:
    """common.onnxfiles.weight_files, its refusals as ArtifactsError: what the repository cannot serve."""
    try:
        return onnxfiles.weight_files(model_file)
    except onnxfiles.WeightsFileError as exc:
        raise ArtifactsError(str(exc)) from None


def copy_model(model_file: Path, target: Path, keep: set[str] = frozenset()) -> Path:
    """Copy a model file to `target` with the weights files it names (weight_files), beside it under the
    same names and with the model file's mode. A weights file must not take the place of `target` or of a file
    named in `keep` (the version folder's own files)."""
    model_file, target = Path(model_file), Path(target)
    names = weight_files(model_file)
    clash = sorted(set(names) & ({target.name} | set(keep)))
    if clash:
        raise ArtifactsError(f"{model_file} keeps weights in {', '.join(clash)}, a name the served version folder "
                             "uses for its own file: save them under another name")
    for name in names:
        shutil.copy2(model_file.parent / name, target.parent / name)
    shutil.copy2(model_file, target)
    onnxfiles.give_model_mode(target, names)  # a weights file of the user's, or of an older import, may be 0600
    return target


def write_repository(
    spec: DeploymentSpec,
    backend: str,
    out: Path,
    spec_source: str = "a DeploymentSpec",
    model_file: Path | None = None,
    extra: dict | None = None,
    held_out: str | None = None,
    discard_additions: bool = False,
) -> dict:
    """Render and copy everything into `out`. `model_file` overrides the classifier's model
    (e.g. a TensorRT plan or a quantized ONNX); default: the artifacts' model.onnx. A python classifier
    also gets its quality reference, from `held_out` (a folder; default: the bundled held-out photos).
    An existing `out` is replaced as `check_replaceable` allows."""
    artifacts = Path(spec.artifacts)
    model_file = Path(model_file) if model_file else artifacts / MODEL_ONNX
    shape = model_shape(artifacts, model_file if model_file.suffix == ".onnx" else None)
    # A plan loads only on the TensorRT and GPU it was built for: refuse one the target server cannot load.
    plan_binding = (binding.check_plan(model_file, binding.local_target(spec.target_server))
                    if backend == "tensorrt" else None)
    check_replaceable(out, discard_additions)

    if spec.pipeline == "fused" and backend != "python-onnxruntime":
        raise ValueError(f"the fused pipeline needs the python-onnxruntime backend, not {backend!r}")
    staging, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    if old.exists() and not (old / MARKER).exists():
        raise FileExistsError(f"{old} exists and was not written by build.engines; refusing to replace it")
    if staging.exists() and any(staging.iterdir()) and not any((staging / m).exists() for m in (MARKER, STAGING)):
        raise FileExistsError(f"{staging} exists and was not written by build.engines; refusing to replace it")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / STAGING).write_text("build.engines writes the repository here, then renames it\n")
    pre_dir = staging / spec.preprocess_name
    cls_dir = staging / spec.classifier_name
    ens_dir = staging / spec.ensemble_name
    fused = spec.pipeline == "fused"
    for d in ([] if fused else [pre_dir / "1"]) + [cls_dir / "1", ens_dir / "1"]:
        d.mkdir(parents=True)

    def copy_preprocessing(version_dir: Path) -> None:  # for the models that take encoded images
        shutil.copy2(TEMPLATES / "image_model.py", version_dir / "image_model.py")
        shutil.copy2(preprocessing_module.__file__, version_dir / "preprocessing.py")
        shutil.copy2(contract_module.__file__, version_dir / "contract.py")
        shutil.copy2(priority_module.__file__, version_dir / "priority.py")
        shutil.copy2(artifacts / PREPROCESS_JSON, version_dir / PREPROCESS_JSON)

    def copy_session(version_dir: Path) -> None:  # for the python models that run ONNX Runtime
        shutil.copy2(onnxsession_module.__file__, version_dir / "onnxsession.py")
        shutil.copy2(cpu_module.__file__, version_dir / "cpu.py")
        shutil.copy2(priority_module.__file__, version_dir / "priority.py")
        shutil.copy2(TEMPLATES / "quality_metrics.py", version_dir / "quality_metrics.py")
        quality.write_reference(version_dir, quality.compute_reference(model_file, artifacts, held_out))

    if fused:
        (cls_dir / "config.pbtxt").write_text(configs.fused_config(spec, shape, spec_source))
        shutil.copy2(TEMPLATES / "classifier_fused.py", cls_dir / "1" / "model.py")
        copy_session(cls_dir / "1")
        copy_preprocessing(cls_dir / "1")
    elif spec.preprocessing == "dali":  # a serialized DALI pipeline (build/repository/dali.py; make dali-setup)
        (pre_dir / "config.pbtxt").write_text(configs.dali_preprocess_config(spec, shape, spec_source))
        dali.serialize(artifacts / PREPROCESS_JSON, pre_dir / "1" / dali.MODEL_FILE, "mixed", spec.max_batch_size)
    else:
        (pre_dir / "config.pbtxt").write_text(configs.preprocess_config(spec, shape, spec_source))
        shutil.copy2(TEMPLATES / "preprocess_model.py", pre_dir / "1" / "model.py")
        copy_preprocessing(pre_dir / "1")
    if not fused:
        (cls_dir / "config.pbtxt").write_text(configs.classifier_config(spec, shape, backend, spec_source))
        if backend == "python-onnxruntime":
            shutil.copy2(TEMPLATES / "classifier_onnxruntime.py", cls_dir / "1" / "model.py")
            copy_session(cls_dir / "1")
    copy_model(model_file, cls_dir / "1" / configs.CLASSIFIER_BACKENDS[backend][2],
               keep={p.name for p in (cls_dir / "1").iterdir()})

    (ens_dir / "config.pbtxt").write_text(configs.ensemble_config(spec, shape, spec_source))
    # Triton splits the label file on '\n' alone: a hand-edited labels.txt (CRLF, BOM) is written out plain
    labels_file.write_labels(ens_dir / configs.LABELS_FILE, labels_file.read_labels(artifacts / LABELS_TXT))
    # An ensemble's version folder is empty; object stores (S3, GCS) drop empty folders.
    (ens_dir / "1" / "README").write_text("Ensembles have no model file; this keeps the version folder.\n")

    manifest = {
        "generated_by": "python -m build.engines",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec_source": spec_source,
        "spec": spec.to_dict(),
        "backend": backend,
        "pipeline": spec.pipeline,
        "models": ([] if fused else [spec.preprocess_name]) + [spec.classifier_name, spec.ensemble_name],
        "classifier_model": {"source": str(model_file), "sha256": onnxfiles.model_sha256(model_file)},
        "input_dims": list(shape.input_dims),
        "num_classes": shape.num_classes,
        "held_out": quality.held_out_source(held_out),  # the quality reference's images (serving.rollout reuses them)
        **({"plan_binding": plan_binding} if plan_binding else {}),
        **(extra or {}),
    }
    shutil.copy2(TEMPLATES / README_TEMPLATE, staging / README)
    (staging / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    (staging / STAGING).unlink()

    _swap_in(staging, out, old)
    return manifest


def _swap_in(staging: Path, out: Path, old: Path) -> None:
    """`staging` becomes `out`; the old `out` (if any) is moved to `old` and deleted only once the new one is in
    its place, so that an interruption leaves one complete repository at `out` or at `old` (the next write
    deletes it)."""
    if old.exists() and (old / MARKER).exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
