# Shipping: container images, object storage, Kubernetes and KServe manifests (docs/deploy.md).
# Included by the main Makefile (PY, STAMP, REPOSITORY come from there).
IMAGE ?= localhost/triton-image-classifier:cpu
GPU_IMAGE ?= localhost/triton-image-classifier:gpu-$(NGC_TAG)
NGC_TAG ?= 24.10-py3
PODMAN ?= podman
# podman's defaults fail in some sandboxes (crun on hybrid cgroups; rlimits above the caller's hard
# limits): runc where installed, and rlimits no higher than this shell's.
PODMAN_ARGS ?= $(if $(shell command -v runc),--runtime runc)
NOFILE := $(shell n=$$(ulimit -Hn); [ "$$n" = unlimited ] && n=1048576; echo $$n)
PODMAN_BUILD_ARGS ?= --ulimit nofile=$(NOFILE):$(NOFILE) --ulimit nproc=4096:4096
S3_URL ?=
PULL_TO ?= .run/pulled
K8S_OUT ?= .run/k8s
GPU_CONTEXT ?= .run/image-gpu

.PHONY: image-setup image image-gpu-context image-gpu publish pull k8s-render k8s-validate

image-setup: ## Debian podman, buildah, runc, debootstrap (as root) for `make image`
	@{ command -v podman && command -v debootstrap && command -v runc; } >/dev/null || { [ "$$(id -u)" = 0 ] \
	    && apt-get update -qq && apt-get install -y -qq podman buildah runc debootstrap; } \
	    || { echo "image-setup: needs root to apt-get install podman buildah runc debootstrap" >&2; exit 1; }

image: $(STAMP) image-setup ## CPU image (Debian 12 with its security updates + pip Triton, non-root, :8000-8002) with REPOSITORY baked in [IMAGE=...] [REFRESH_BASE=1]
	IMAGE=$(IMAGE) REPOSITORY=$(REPOSITORY) PY=$(PY) PODMAN=$(PODMAN) PODMAN_ARGS="$(PODMAN_ARGS)" REFRESH_BASE=$(REFRESH_BASE) \
	    PODMAN_BUILD_ARGS="$(PODMAN_BUILD_ARGS)" bash deploy/images/build-cpu.sh

image-gpu-context: ## the GPU image's build context (what Containerfile.gpu copies) in GPU_CONTEXT
	rm -rf $(GPU_CONTEXT) && mkdir -p $(GPU_CONTEXT)/serving
	cp serving/*.py $(GPU_CONTEXT)/serving/

image-gpu: image-gpu-context ## GPU image: NGC tritonserver (NGC_TAG=24.10-py3) + Pillow; needs nvcr.io or that image already local
	$(PODMAN) $(PODMAN_ARGS) build $(PODMAN_BUILD_ARGS) --build-arg TRITON_TAG=$(NGC_TAG) \
	    -f deploy/images/Containerfile.gpu -t $(GPU_IMAGE) $(GPU_CONTEXT)

publish: $(STAMP) ## upload REPOSITORY to S3_URL=s3://[host:port/]bucket/prefix (AWS_* credentials), for tritonserver and the k8s overlays
	@[ -n "$(S3_URL)" ] || { echo "$@: set S3_URL=s3://bucket/prefix or s3://host:port/bucket/prefix" >&2; exit 1; }
	$(PY) -m serving.publish --model-repository $(REPOSITORY) --url $(S3_URL)

pull: $(STAMP) ## download the publication at S3_URL into PULL_TO, checked against its PUBLISHED.json (the k8s pods' initContainer)
	@[ -n "$(S3_URL)" ] || { echo "$@: set S3_URL=s3://bucket/prefix or s3://host:port/bucket/prefix" >&2; exit 1; }
	$(PY) -m serving.pull --url $(S3_URL) --to $(PULL_TO)

k8s-render: ## kubectl kustomize every overlay (cpu, cpu-vnni, gpu, kserve, prometheus-adapter) into K8S_OUT/
	@mkdir -p $(K8S_OUT)
	kubectl kustomize deploy/k8s/overlays/cpu > $(K8S_OUT)/cpu.yaml
	kubectl kustomize deploy/k8s/overlays/cpu-vnni > $(K8S_OUT)/cpu-vnni.yaml
	kubectl kustomize deploy/k8s/overlays/gpu > $(K8S_OUT)/gpu.yaml
	kubectl kustomize deploy/kserve > $(K8S_OUT)/kserve.yaml
	kubectl kustomize deploy/k8s/prometheus-adapter > $(K8S_OUT)/prometheus-adapter.yaml

k8s-validate: $(STAMP) ## render and validate every manifest offline (Kubernetes 1.32 schema, vendored CRD schemas)
	$(PY) -m pytest -q -m "not slow" tests/deploy/test_kubernetes.py
