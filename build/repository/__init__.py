"""The repository generator: a deployment spec and the file to serve -> a Triton model repository.

    spec          the deployment spec (configs/deployment.json) as a dataclass
    configs       every config.pbtxt, rendered from the spec
    writer        writes model_repository/ (configs, the served models' code, labels, BUILD.json)
    capabilities  what the local server and machine can run (`python -m build.repository.capabilities`)
    templates/    the python-backend models' code, copied into the repository
"""
