"""``finetune serve``: an OpenAI-compatible ``/v1/chat/completions`` server for a run or an export.

    finetune serve runs/sft --port 8000                  # an adapter run: merged once into a temporary directory
    finetune serve exports/sft-merged --host 0.0.0.0
    finetune serve exports/sft-gguf                      # a GGUF: llama.cpp's server (llama-cpp-python)

No HTTP code of ours: a run or a merged export is served by transformers' own server (``transformers serve``:
run as a child process, FastAPI + uvicorn), a GGUF by llama-cpp-python's (``llama_cpp.server``). Either
renders the conversation with the chat template the directory carries (the run's, which ``finetune`` saved into the
tokenizer and the GGUF) and stops at the run's stop tokens (``generation_config.json``'s ``eos_token_id``; the GGUF's
end-of-turn token), so a reply is what ``finetune chat`` answers, without the stop token's text.

An adapter run is first merged into its base (:func:`finetune.export.export` ``--to merged``) in a temporary
directory, removed when the server stops: transformers' server loads model directories, and the merged model is
exactly the run's. The served model id is printed at start and listed by ``GET /v1/models``; a request must name it
(or that id's ``--name`` for a GGUF).

The servers are optional extras: ``pip install 'finetune[serve]'`` (FastAPI, uvicorn, openai) for transformers',
``pip install 'llama-cpp-python[server]'`` for a GGUF.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .export import GGUF_FILE


class ServeError(ValueError):
    """Not something to serve, or the server's packages are missing: one line, exit status 2."""


@dataclass
class Server:
    """A started server (see :func:`start`): where it listens, the model id to ask for, and how to stop it."""

    base_url: str
    """``http://HOST:PORT/v1``, what an ``openai.OpenAI(base_url=...)`` client takes."""
    model: str
    """The id a request names (``GET /v1/models`` lists it)."""
    backend: str
    """``transformers`` or ``llama.cpp``."""
    _stop: object = None
    _cleanup: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the server and remove the temporary merged model, if one was made."""
        try:
            if self._stop is not None:
                self._stop()
        finally:
            for path in self._cleanup:
                shutil.rmtree(path, ignore_errors=True)


def gguf_in(path: Path) -> Path | None:
    """The GGUF to serve: ``path`` itself if it is a ``.gguf`` file, else the export's ``model.gguf``."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if (path / GGUF_FILE).is_file():
        return path / GGUF_FILE
    return None


def model_directory(path: Path, scratch: Path) -> Path:
    """A directory transformers' server loads as it is: a full model (a full fine-tune or a merged export), or an
    adapter run merged into its base under ``scratch``."""
    from .export import export, inspect_run

    source = inspect_run(path)
    if not source.has_adapter:
        return source.path
    return export(path, "merged", scratch / path.resolve().name)


def _wait_until_up(url: str, timeout: float, alive=lambda: True) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    if not alive():
        raise ServeError(f"the server stopped before it answered {url} (its error is above)")
    raise ServeError(f"the server did not answer {url} within {timeout:.0f} s")


def _start_transformers(directory: Path, host: str, port: int, device: str, block: bool):
    """``transformers serve DIRECTORY`` in a child process, and how to stop it.

    The command line is the server's stable interface: ``transformers.cli.serve.Serve`` had a ``non_blocking`` mode
    (a thread of ours) up to 5.24 and has none from 5.25, where the constructor serves until the server stops."""
    import subprocess

    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ServeError("transformers' server needs FastAPI, uvicorn and openai: pip install 'finetune[serve]'")
    # The positional model (force_model) preloads it and pins every request to it; the log level is the server's own.
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(directory),
               "--host", host, "--port", str(port), "--device", device]
    if block:
        try:
            status = subprocess.run(command, check=False).returncode
        except KeyboardInterrupt:  # the child got the same Ctrl+C and stops on its own
            return None
        if status != 0:
            raise ServeError(f"transformers serve stopped with exit status {status} (its error is above)")
        return None
    child = subprocess.Popen(command)

    def stop():
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    stop.alive = lambda: child.poll() is None
    return stop


def _start_llama_cpp(gguf: Path, name: str, host: str, port: int, context: int, block: bool):
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise ServeError("serving a GGUF needs llama.cpp's server: pip install 'llama-cpp-python[server]'") from None
    # chat_format unset: llama-cpp-python renders with the GGUF's tokenizer.chat_template (the run's template, written
    # by finetune export) and stops at its end-of-turn token.
    app = create_app(server_settings=ServerSettings(host=host, port=port),
                     model_settings=[ModelSettings(model=str(gguf), model_alias=name, n_ctx=context, verbose=False)])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    if block:
        server.run()
        return None
    import threading

    thread = threading.Thread(target=server.run, name="llama-cpp-server", daemon=True)
    thread.start()

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return stop


def start(path: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", context: int = 2048,
          block: bool = False, timeout: float = 120.0) -> Server:
    """Serve a run, a model directory or a GGUF export on ``host:port``; returns once it answers ``/v1/models``
    (``block``: serves until interrupted, then returns).

    Raises:
        ServeError: nothing servable at ``path``, or the server's packages are missing.
    """
    from .export import ExportError

    path = Path(path)
    if not path.exists():
        raise ServeError(f"{path}: no such run, export or GGUF")
    gguf = gguf_in(path)
    base_url = f"http://{host}:{port}/v1"
    if gguf is not None:
        name = path.name if path.is_dir() else gguf.stem
        server = Server(base_url, name, "llama.cpp")
        _announce(server, block)
        server._stop = _start_llama_cpp(gguf, name, host, port, context, block)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="finetune-serve-"))
        try:
            directory = model_directory(path, scratch)
        except ExportError as e:
            shutil.rmtree(scratch, ignore_errors=True)
            raise ServeError(str(e)) from None
        server = Server(base_url, str(directory), "transformers", _cleanup=[scratch])
        _announce(server, block)
        try:
            server._stop = _start_transformers(directory, host, port, device, block)
        except BaseException:
            server.stop()
            raise
    if not block:
        try:
            _wait_until_up(f"{base_url}/models", timeout, getattr(server._stop, "alive", lambda: True))
        except BaseException:
            server.stop()
            raise
    return server


def _announce(server: Server, block: bool) -> None:
    if block:
        print(f"serving {server.model!r} ({server.backend}) at {server.base_url}/chat/completions; Ctrl-C stops",
              flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``finetune serve``'s arguments."""
    parser.add_argument("model", help="a run directory, a model directory (merged export) or a GGUF export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--device", default="auto", help="transformers: auto, cpu, cuda:0, ...")
    parser.add_argument("--context", type=int, default=2048, help="GGUF: llama.cpp's context length in tokens")


def run(args: argparse.Namespace) -> int:
    """Run ``finetune serve`` until interrupted; a user error prints ``error: ...`` and returns 2."""
    try:
        server = start(args.model, args.host, args.port, args.device, args.context, block=True)
    except ServeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    server.stop()
    return 0
