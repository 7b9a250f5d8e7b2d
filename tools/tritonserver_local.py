"""Run the ``tritonserver`` that the ``nvidia-pytriton`` wheel ships, with its python backend, here.

The wheel carries ``tritonserver``, the python backend and one backend stub per Python
version, but not laid out as a server expects. :func:`start_tritonserver` lays out a
backend folder (``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub
for this Python), and sets the environment the stub needs:

* this venv's ``bin/`` first on ``PATH``, so the stub runs this Python (with ldm-serve,
  torch and ``numpy<2``, which the wheel's stub needs);
* ``LD_LIBRARY_PATH`` with this Python's ``libpython`` and the wheel's bundled CUDA runtime
  (the stub links against it even on a CPU-only machine).

Run it from the Triton venv (``make triton-venv``, ``docs/triton.md``)::

    .venv-triton/bin/python tools/tritonserver_local.py --model-repository model_repository

(``--model-config-name=cpu`` is the default here: KIND_CPU instances.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TritonPaths", "find_tritonserver", "start_tritonserver", "tritonserver_env"]


@dataclass(frozen=True)
class TritonPaths:
    """Where the pytriton wheel keeps the server's pieces."""

    server: Path  # tritonserver binary
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python
    libs: Path  # the wheel's bundled shared libraries (nvidia_pytriton.libs)


def find_tritonserver() -> TritonPaths | None:
    """The wheel's server for this Python, or None when ``nvidia-pytriton`` is not installed here."""
    try:
        import pytriton
    except ImportError:
        return None
    base = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = TritonPaths(
        server=base / "bin" / "tritonserver",
        python_backend=base / "backends" / "python",
        stub=base / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=base.parent.parent / "nvidia_pytriton.libs",
    )
    found = paths.server.is_file() and paths.stub.is_file() and (paths.python_backend / "libtriton_python.so").is_file()
    return paths if found else None


def tritonserver_env(paths: TritonPaths, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this Python first on PATH, its libpython and the wheel's libs loadable."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(paths.libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(
        os.pathsep
    )
    return env


def backend_dir(paths: TritonPaths, where: Path) -> Path:
    """A ``--backend-directory`` with the python backend and this Python's stub, under ``where``."""
    target = where / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in paths.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, target / f.name)
    shutil.copy2(paths.stub, target / paths.stub.name)
    return target.parent


def server_args(
    paths: TritonPaths,
    repositories: Sequence[str | Path],
    backends: Path,
    *,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    config_name: str | None = "cpu",
    host: str = "127.0.0.1",
) -> list[str]:
    """The ``tritonserver`` command line: loopback only, the given ports and repositories."""
    args = [str(paths.server)]
    for repo in repositories:
        args += ["--model-repository", str(Path(repo).resolve())]
    args += [
        "--backend-directory", str(backends),
        "--http-address", host, "--http-port", str(http_port),
        "--grpc-address", host, "--grpc-port", str(grpc_port),
        "--metrics-address", host, "--metrics-port", str(metrics_port),
        "--exit-timeout-secs", "10",
    ]  # fmt: skip
    if config_name:
        args.append(f"--model-config-name={config_name}")
    return args


def start_tritonserver(
    repositories: Sequence[str | Path],
    workdir: Path,
    *,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    config_name: str | None = "cpu",
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``tritonserver`` on ``repositories`` (returns at once; wait for readiness over KServe v2).

    Raises:
        FileNotFoundError: ``nvidia-pytriton`` is not installed in this Python.
    """
    paths = find_tritonserver()
    if paths is None:
        raise FileNotFoundError("tritonserver not found: install nvidia-pytriton in this venv (make triton-venv)")
    backends = backend_dir(paths, workdir)
    args = server_args(paths, repositories, backends, http_port=http_port, grpc_port=grpc_port,
                       metrics_port=metrics_port, config_name=config_name)  # fmt: skip
    log = open(log_path or workdir / "tritonserver.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(args, env=tritonserver_env(paths, env), stdout=log, stderr=subprocess.STDOUT)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", action="append", required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-config-name", default="cpu", help="'' for config.pbtxt (KIND_GPU)")
    p.add_argument("--workdir", default=None, help="where the backend folder goes (default: a temp folder)")
    args = p.parse_args(argv)
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tritonserver-"))
    paths = find_tritonserver()
    if paths is None:
        print("tritonserver not found: run this with the Triton venv's python (make triton-venv)", file=sys.stderr)
        return 2
    cmd = server_args(paths, args.model_repository, backend_dir(paths, workdir), http_port=args.http_port,
                      grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                      config_name=args.model_config_name or None)  # fmt: skip
    os.execve(cmd[0], cmd, tritonserver_env(paths))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
