"""llama.cpp's ``llama-server``: built once per machine from PyPI, started on loopback, fed adapters.

The server's source ships inside the ``llama-cpp-python`` sdist on PyPI (``vendor/llama.cpp``),
with ``tools/server`` and the ``convert_lora_to_gguf.py`` converter for PEFT adapters. The first
:func:`server_binary` call downloads that sdist with pip, builds the ``llama-server`` target with
cmake (``GGML_NATIVE=OFF``: a native build of this version segfaulted in decode on an Intel Xeon
with AMX, see issue 22) and keeps the binary and the converter under :func:`cache_dir`, so later
calls on the machine reuse them. ``PERSONALIGN_LLAMA_SERVER`` points at an existing binary instead.

:class:`LlamaServer` runs one server process for one GGUF model and a set of LoRA adapters (GGUF
files, loaded at start with scale 0 and applied per request with the ``lora`` field). llama-server
loads adapters only at start, so :meth:`LlamaServer.ensure_adapters` restarts it with the larger
set when a new one arrives (about a second for the 135M model); requests wait meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from filelock import FileLock

from personalign.artefacts import atomic_write_json
from personalign.errors import EngineError

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DBUILD_SHARED_LIBS=OFF",
)
# What the adapter converter needs beside itself (it imports convert_hf_to_gguf's model classes).
CONVERTER_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py")
BUILD_INFO = "build.json"


class LlamaCppError(EngineError):
    """llama.cpp could not be built, started or fed an adapter (the message names the fix)."""


def cache_dir() -> Path:
    """Where the built server and the converter live (``$PERSONALIGN_LLAMA_CPP_DIR``, else the user cache)."""
    override = os.environ.get("PERSONALIGN_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    key = hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "personalign" / "llama.cpp" / f"{LLAMA_CPP_PYTHON}-{key}"


def _built(folder: Path) -> bool:
    return (folder / BUILD_INFO).is_file() and (folder / "bin" / "llama-server").is_file()


def server_binary(build: bool = True) -> Path:
    """The ``llama-server`` executable: ``$PERSONALIGN_LLAMA_SERVER``, else the cached build (made now if
    missing and ``build``)."""
    given = os.environ.get("PERSONALIGN_LLAMA_SERVER")
    if given:
        path = Path(given)
        if not path.is_file():
            raise LlamaCppError(
                f"PERSONALIGN_LLAMA_SERVER={given} is not a file. Fix: point it at a llama-server "
                "binary, or unset it to use the cached build (`personalign engine build`)"
            )
        return path
    folder = cache_dir()
    if not _built(folder):
        if not build:
            raise LlamaCppError(
                f"llama-server is not built in {folder}. Fix: run `personalign engine build` (once per machine)"
            )
        build_server(folder)
    return folder / "bin" / "llama-server"


def converter_script() -> Path:
    """``convert_lora_to_gguf.py`` from the same llama.cpp source as the server (built if missing)."""
    folder = cache_dir()
    if not _built(folder):
        build_server(folder)
    return folder / "convert" / "convert_lora_to_gguf.py"


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise LlamaCppError(
            f"{what} failed (exit {done.returncode}); the log is {log}:\n{tail}\n"
            "Fix: install cmake and a C++ compiler (Debian: apt-get install cmake g++), check that PyPI "
            "is reachable, then run `personalign engine build` again"
        )


def build_server(folder: Path | None = None, jobs: int | None = None) -> Path:
    """Download the ``llama-cpp-python`` sdist, build ``llama-server`` and keep it with the converter.

    One build per machine: a file lock makes concurrent callers wait for the first, and the
    folder is complete only when ``build.json`` is written (last).
    """
    folder = folder or cache_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if _built(folder):
            return folder / "bin" / "llama-server"
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise LlamaCppError(
                    f"building llama-server needs {tool}, which is not on PATH. "
                    "Fix: apt-get install cmake g++ (or set PERSONALIGN_LLAMA_SERVER to a built binary)"
                )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
            work = Path(tmp)
            log = work / "build.log"
            logger.warning(
                "building llama-server from llama-cpp-python %s (once per machine)", LLAMA_CPP_PYTHON
            )
            _run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)],
                log, "downloading the llama-cpp-python sdist",
            )  # fmt: skip
            sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
            prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
            with tarfile.open(sdist) as archive:
                members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
                archive.extractall(work, members=members, filter="data")
            source = work / prefix
            build = work / "build"
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(
                ["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS],
                log,
                "cmake configure",
            )
            jobs = jobs or os.cpu_count() or 2
            _run(
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
                log,
                "building llama-server",
            )
            staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
            (staging / "bin").mkdir()
            shutil.copy2(build / "bin" / "llama-server", staging / "bin" / "llama-server")
            (staging / "convert").mkdir()
            for name in CONVERTER_FILES:
                src = source / name
                if src.is_dir():
                    shutil.copytree(src, staging / "convert" / name)
                else:
                    shutil.copy2(src, staging / "convert" / name)
            atomic_write_json(
                staging / BUILD_INFO,
                {
                    "llama_cpp_python": LLAMA_CPP_PYTHON,
                    "cmake_flags": list(CMAKE_FLAGS),
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        logger.warning("llama-server built in %.0f s: %s", time.perf_counter() - started, folder)
        return folder / "bin" / "llama-server"


def convert_adapter(peft_folder: Path, base_config: Path, out_file: Path) -> Path:
    """A PEFT LoRA folder as a GGUF LoRA file for llama.cpp (``base_config``: a folder with the base's
    ``config.json``). Skipped when ``out_file`` is newer than the adapter's weights."""
    weights = peft_folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise LlamaCppError(f"{peft_folder} holds no adapter_model.safetensors. Fix: pass a PEFT LoRA folder")
    if out_file.is_file() and out_file.stat().st_mtime >= weights.stat().st_mtime:
        return out_file
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.{os.getpid()}.partial")
    cmd = [sys.executable, str(converter_script()), "--outtype", "f32", "--base", str(base_config),
           "--outfile", str(partial), str(peft_folder)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise LlamaCppError(
            f"converting the adapter {peft_folder} to GGUF failed:\n{done.stderr[-1500:]}\n"
            "Fix: the adapter must be a LoRA on the engine's base model (same architecture and shapes)"
        )
    os.replace(partial, out_file)
    return out_file


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One ``llama-server`` process on loopback for ``model`` (a GGUF file) and LoRA ``adapters``.

    ``adapters`` maps a name to a GGUF LoRA file; each is loaded at start with scale 0, so a request
    without a ``lora`` list decodes the plain model. ``parallel`` is the number of server slots
    (requests decoded together); each slot gets ``ctx_size`` tokens of context.

        with LlamaServer(embedded_gguf_path()) as server:
            RemoteEngine(server.url, kind="llama.cpp", server=server)
    """

    def __init__(
        self,
        model: str | Path,
        adapters: Mapping[str, str | Path] | None = None,
        parallel: int = 4,
        ctx_size: int = 2048,
        threads: int | None = None,
        port: int | None = None,
        binary: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model = Path(model)
        if not self.model.is_file():
            raise LlamaCppError(
                f"the GGUF model {self.model} does not exist. Fix: pass the path of a .gguf file"
            )
        self.adapters: dict[str, Path] = {k: Path(v) for k, v in (adapters or {}).items()}
        self.parallel, self.ctx_size, self.threads = parallel, ctx_size, threads
        self.port = port or free_port()
        self.binary = Path(binary) if binary is not None else None
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self.restarts = 0
        self.log = Path(tempfile.gettempdir()) / f"personalign-llama-server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def adapter_ids(self) -> dict[str, int]:
        """Each loaded adapter's id in the server's ``lora`` list (its position at start)."""
        return {name: i for i, name in enumerate(self.adapters)}

    def _command(self) -> list[str]:
        binary = self.binary or server_binary()
        cmd = [str(binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(self.parallel), "-c", str(self.ctx_size * self.parallel), "--no-webui"]  # fmt: skip
        if self.threads:
            cmd += ["-t", str(self.threads), "-tb", str(self.threads)]
        for path in self.adapters.values():
            cmd += ["--lora", str(path)]
        if self.adapters:
            cmd.append("--lora-init-without-apply")
        return [*cmd, *self.extra_args]

    def start(self, timeout: float = 120.0) -> LlamaServer:
        with self._lock:
            if self._process is not None:
                return self
            env = {**os.environ, "LLAMA_ARG_HOST": "127.0.0.1"}
            with self.log.open("wb") as out:
                self._process = subprocess.Popen(
                    self._command(), stdout=out, stderr=subprocess.STDOUT, env=env
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    code = self._process.returncode
                    self._process = None
                    raise LlamaCppError(
                        f"llama-server exited at start (code {code}); its log is {self.log}:\n"
                        f"{self.log.read_text(errors='replace')[-1500:]}"
                    )
                try:
                    if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            self.stop()
            raise LlamaCppError(
                f"llama-server did not become healthy within {timeout:.0f} s; log: {self.log}"
            )

    def stop(self) -> None:
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def ensure_adapters(self, wanted: Mapping[str, str | Path]) -> dict[str, int]:
        """Load every adapter in ``wanted`` (restarting the server if one is new); their ids."""
        with self._lock:
            new = {k: Path(v) for k, v in wanted.items() if self.adapters.get(k) != Path(v)}
            if new:
                # files removed since (earlier versions of a retrained adapter) are not loaded again
                self.adapters = {k: v for k, v in self.adapters.items() if v.is_file()}
                self.adapters.update(new)
                self.stop()
                self.start()
                self.restarts += 1
            return self.adapter_ids()

    def loaded(self) -> list[dict[str, Any]]:
        """The server's own list of adapters (``GET /lora-adapters``)."""
        return list(httpx.get(f"{self.url}/lora-adapters", timeout=10.0).json())

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_info() -> dict[str, Any] | None:
    """What the cached build recorded (``None`` before the first build)."""
    path = cache_dir() / BUILD_INFO
    return json.loads(path.read_text()) if path.is_file() else None
