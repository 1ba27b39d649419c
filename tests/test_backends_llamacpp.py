"""The embedded llama.cpp backend: child start, supervision, shutdown, errors."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import msgspec
import pytest
import trio

from tests.backend_fixtures import call, have_local_extra, parse_sse
from tooti.backends import llamacpp
from tooti.backends.base import BackendError
from tooti.backends.llamacpp import (
    LOCAL_EXTRA_HINT,
    LlamaCppBackend,
    LlamaCppStartError,
    child_command,
    log_child_line,
)
from tooti.backends.llamacpp_server import build_params, parse_args
from tooti.backends.openai import OpenAIBackend
from tooti.settings import BackendSettings

needs_local = pytest.mark.skipif(not have_local_extra(), reason=LOCAL_EXTRA_HINT)


def settings(**options: object) -> BackendSettings:
    """llamacpp backend settings with ``options``."""
    return BackendSettings(type="llamacpp", options=dict(options))


def test_missing_extra_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'tooti\[local\]'"):
        LlamaCppBackend(settings())


@needs_local
def test_one_model_name_at_most() -> None:
    with pytest.raises(ValueError, match="one model"):
        LlamaCppBackend(BackendSettings(type="llamacpp", models=["a", "b"]))
    assert LlamaCppBackend(BackendSettings(type="llamacpp", models=["mine"])).model_id == "mine"


def test_child_command_and_server_params() -> None:
    command = child_command("/m.gguf", parallel=3, context_size=1000, threads=1)
    assert command[1:3] == ["-m", "tooti.backends.llamacpp_server"]
    args = parse_args(command[3:])
    assert (args.model, args.port, args.alias, args.parallel, args.ctx_size) == (
        "/m.gguf", 0, "gemma-3-270m", 3, 3000)
    assert (args.chat_template, args.jinja, args.embeddings, args.pooling) == (
        "gemma", False, True, "mean")
    assert (args.threads, args.threads_batch, args.exit_on_stdin_eof) == (1, 1, True)
    if not have_local_extra():
        return
    import xllamacpp

    params = build_params(args, api_key="k")
    assert params.model.path == "/m.gguf"
    assert (params.hostnames, params.port, params.n_parallel, params.n_ctx) == (
        ["127.0.0.1"], 0, 3, 3000)
    assert params.model_alias == {"gemma-3-270m"}
    assert (params.cpuparams.n_threads, params.cpuparams_batch.n_threads) == (1, 1)
    assert (params.chat_template, params.use_jinja, params.embedding) == ("gemma", False, True)
    assert params.pooling_type == xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    assert params.n_batch == params.n_ubatch == 512
    assert params.api_keys == ["k"]


def test_child_log_levels(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tooti.llamacpp")
    for line in ("0.00.001 E srv  boom", "0.00.002 W load: note", "0.00.003 I srv  init",
                 "Traceback (most recent call last):"):
        log_child_line(line)
    assert [r.levelno for r in caplog.records] == [
        logging.ERROR, logging.DEBUG, logging.DEBUG, logging.INFO]


@needs_local
async def test_bad_model_file_fails_start_with_stderr_tail(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    backend = LlamaCppBackend(settings(model_path=str(junk)))
    with pytest.raises(LlamaCppStartError, match="cannot start") as info:
        await backend.start()
    assert "during startup" in str(info.value)
    assert backend.process is not None and backend.process.returncode is not None
    assert not await backend.health()
    await backend.close()


@needs_local
async def test_startup_timeout_kills_the_child() -> None:
    backend = LlamaCppBackend(settings(startup_timeout=0.05))
    with pytest.raises(LlamaCppStartError, match="not healthy after"):
        await backend.start()
    assert backend.process is not None and backend.process.returncode is not None
    await backend.close()


@needs_local
@pytest.mark.llamacpp
async def test_lifecycle_serve_crash_restart_close(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tooti.llamacpp")
    backend = LlamaCppBackend(settings(parallel=2, context_size=512, restart_initial=0.1))
    with trio.fail_after(120):
        await backend.start()
    assert await backend.health()
    [info] = await backend.models()
    assert (info.id, info.context_length) == ("gemma-3-270m", 512)
    assert any("listening on" in r.getMessage() for r in caplog.records)

    run_done = trio.Event()

    async def supervise() -> None:
        await backend.run()
        run_done.set()

    nursery.start_soon(supervise)

    chat = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    _, body = await call(backend, "chat/completions", chat)
    events, done = parse_sse(body)
    assert done and events[-1]["usage"]["completion_tokens"] == 2
    assert events[0]["model"] == "gemma-3-270m"
    _, body = await call(backend, "embeddings", {"model": "gemma-3-270m", "input": "x y"})
    assert len(msgspec.json.decode(body)["data"][0]["embedding"]) == 640

    # The child is protected by the backend's API key.
    intruder = OpenAIBackend(BackendSettings(type="openai", url=backend.url))
    with pytest.raises(BackendError) as refused:
        await call(intruder, "embeddings", {"model": "gemma-3-270m", "input": "x"})
    assert refused.value.status == 401
    await intruder.close()

    first = backend.process
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    with trio.fail_after(120):
        await backend.wait_launches(2)
    assert backend.process is not first
    assert await backend.health()
    _, body = await call(backend, "completions", {"model": "gemma-3-270m", "prompt": "a",
                                                  "max_tokens": 1})
    assert msgspec.json.decode(body)["usage"]["completion_tokens"] == 1
    assert any("restarting" in r.getMessage() for r in caplog.records)

    second = backend.process
    assert second is not None
    await backend.close()
    assert second.returncode == 0  # clean exit on SIGTERM
    assert not await backend.health()
    with trio.fail_after(5):
        await run_done.wait()
