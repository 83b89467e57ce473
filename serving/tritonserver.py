"""`tritonserver` as typed, inside the project's environment.

The nvidia-pytriton wheel ships a complete Triton server (core 2.51) but not in a form that runs
as typed: its shared libraries sit in `nvidia_pytriton.libs/`, and the python backend needs the
stub built for the running Python copied next to it. This launcher supplies both, binds to
loopback unless told otherwise, and then *replaces itself* with the server (os.execve), so
signals such as SIGTERM reach Triton directly.

    tritonserver --model-repository model_repository            # installed as a console script
    python -m serving.tritonserver --model-repository model_repository
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

from serving.health import has_flag

LOOPBACK = "127.0.0.1"
# Options whose default we change: Triton binds to all interfaces, we bind to loopback.
ADDRESS_FLAGS = ("--http-address", "--grpc-address", "--metrics-address")


def address_flags(address: str) -> list[str]:
    """tritonserver's three address flags for `address`. Triton 2.51 binds IPv6 only when HTTP's and metrics'
    address is spelt `ipv6:<address>` and gRPC's `[<address>]` (a bare `::1` it takes for an IPv4 address)."""
    if ":" not in address:
        return [f"{flag}={address}" for flag in ADDRESS_FLAGS]
    http, grpc, metrics = ADDRESS_FLAGS
    return [f"{http}=ipv6:{address}", f"{grpc}=[{address}]", f"{metrics}=ipv6:{address}"]


class ServerNotInstalled(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class ServerInstall:
    binary: Path
    library_dir: Path
    python_backend: Path  # folder holding libtriton_python.so
    stub: Path  # triton_python_backend_stub for this Python

    @property
    def cache_directory(self) -> Path:
        """The wheel's response cache libraries (Triton looks in /opt/tritonserver/caches otherwise)."""
        return self.binary.parent.parent / "caches"

    @property
    def version(self) -> str:
        from importlib.metadata import version

        return f"nvidia-pytriton {version('nvidia-pytriton')}"


def locate_server() -> ServerInstall:
    try:
        import pytriton  # noqa: F401  (only to find the package folder)
    except ImportError as exc:
        raise ServerNotInstalled(
            "the Triton server comes from the nvidia-pytriton wheel, which is not installed in "
            f"this environment ({sys.prefix}); run `make setup`"
        ) from exc
    package = Path(pytriton.__file__).parent
    root = package / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = ServerInstall(
        binary=root / "bin" / "tritonserver",
        library_dir=package.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / pyver / "triton_python_backend_stub",
    )
    for path in (install.binary, install.library_dir, install.python_backend, install.stub):
        if not path.exists():
            raise ServerNotInstalled(f"the nvidia-pytriton install is incomplete: {path} is missing")
    return install


# Pythons whose python-backend stub in the nvidia-pytriton 0.7.0 wheel was seen to hand the models the input
# they were sent (docs/serving.md): the 3.12 and 3.13 stubs give the ensemble's first model garbage bytes.
STUB_PYTHONS = ((3, 10), (3, 11))


def python_problem(version: tuple[int, int]) -> str | None:
    """Why the python-backend models cannot run under this Python, or None."""
    if tuple(version[:2]) in STUB_PYTHONS:
        return None
    seen = ", ".join(f"{major}.{minor}" for major, minor in STUB_PYTHONS)
    return (f"the python backend of this server (Triton 2.51, nvidia-pytriton 0.7.0) answers correctly only under "
            f"Python {seen}, and this environment ({sys.prefix}) is Python {version[0]}.{version[1]} (its stub hands "
            "the models garbage input: docs/serving.md). Make the environment with Python 3.11: "
            "`make setup PYTHON=python3.11`")


# The Python requirements/main.txt was frozen under: some of its pins exist for no older one (pillow 13.0.0 and
# annotated-doc 0.0.7 require Python >= 3.11), so `make setup` under 3.10 failed halfway through pip.
PINNED_PYTHON = (3, 11)


def setup_problem(version: tuple[int, int]) -> str | None:
    """Why `make setup` cannot make the pinned environment under this Python, or None."""
    problem = python_problem(version)
    if problem or tuple(version[:2]) == PINNED_PYTHON:
        return problem
    return (f"requirements/main.txt is pinned for Python 3.11 (some pins, e.g. pillow 13.0.0, require it), and "
            f"this is Python {version[0]}.{version[1]}. Make the environment with Python 3.11: "
            "`make setup PYTHON=python3.11`")

def default_backend_directory() -> Path:
    return Path(sys.prefix) / "share" / "tritonserver" / "backends"


def prepare_backend_directory(install: ServerInstall, dest: Path) -> Path:
    """Make `dest/python/` = the wheel's python backend + this Python's stub. Idempotent."""
    python_dir = dest / "python"
    stub = python_dir / "triton_python_backend_stub"
    if stub.exists() and stub.stat().st_size == install.stub.stat().st_size:
        return dest
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in install.python_backend.iterdir():
        if item.is_file():
            shutil.copy2(item, python_dir / item.name)
    shutil.copy2(install.stub, stub)
    stub.chmod(0o755)
    return dest


def backend_names(backend_directory: Path) -> list[str]:
    """Backends a server started on this directory can load (one folder each)."""
    if not backend_directory.is_dir():
        return []
    return sorted(p.name for p in backend_directory.iterdir() if p.is_dir())


def build_command(args: list[str], install: ServerInstall) -> tuple[list[str], dict[str, str]]:
    args = list(args)
    if not has_flag(args, "--backend-directory"):
        backends = prepare_backend_directory(install, default_backend_directory())
        args.append(f"--backend-directory={backends}")
    for flag in ADDRESS_FLAGS:
        if not has_flag(args, flag):
            args.append(f"{flag}={LOOPBACK}")
    if has_flag(args, "--cache-config") and not has_flag(args, "--cache-directory"):
        args.append(f"--cache-directory={install.cache_directory}")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(install.library_dir), env.get("LD_LIBRARY_PATH", "")) if p
    )
    # python-backend models must import this environment's numpy, Pillow and onnxruntime.
    env.setdefault("VIRTUAL_ENV", sys.prefix)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return [str(install.binary), *args], env


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    problem = python_problem(sys.version_info[:2])
    if problem:
        sys.exit(f"tritonserver: {problem}")
    try:
        install = locate_server()
    except ServerNotInstalled as exc:
        sys.exit(f"tritonserver: {exc}")
    cmd, env = build_command(args, install)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
