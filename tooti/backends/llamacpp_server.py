"""Child process entry point: one llama.cpp server, run in-process by xllamacpp.

Run as ``python -m tooti.backends.llamacpp_server --model PATH [options]``
(:class:`tooti.backends.llamacpp.LlamaCppBackend` does this). The server
speaks the OpenAI API (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``) plus ``/health``; chat, completions and
embeddings all work on the same server.

Protocol with the parent:

* once the model is loaded and the HTTP server listens, one line
  ``TOOTI-LLAMACPP-READY <base url>`` (e.g. ``http://127.0.0.1:41234``) is
  printed on stdout; with ``--port 0`` this is how the parent learns the port;
* llama.cpp logs go to stderr;
* SIGTERM or SIGINT (and, with ``--exit-on-stdin-eof``, the end of stdin, i.e.
  the parent died) shut the server down cleanly, exit status 0;
* if the environment variable ``TOOTI_LLAMACPP_API_KEY`` is set, every
  endpoint but ``/health`` requires it as a bearer token.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

READY_PREFIX = "TOOTI-LLAMACPP-READY "
"""Start of the stdout line announcing the base URL (parents match this text)."""
API_KEY_ENV = "TOOTI_LLAMACPP_API_KEY"
"""Environment variable holding the API key the server requires, if any."""
POOLING = ("none", "mean", "cls", "last", "rank")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m tooti.backends.llamacpp_server",
        description="Serve one GGUF model with llama.cpp (xllamacpp) over HTTP.",
    )
    parser.add_argument("--model", required=True, help="path of the GGUF file")
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="listen port (0 = any free port)")
    parser.add_argument("--alias", default="", help="model name shown in /v1/models and answers")
    parser.add_argument(
        "--ctx-size", type=int, default=0,
        help="total context (KV cache) tokens, split evenly over the slots (0 = model's)",
    )
    parser.add_argument("--parallel", type=int, default=4, help="parallel request slots")
    parser.add_argument("--threads", type=int, default=1, help="generation threads")
    parser.add_argument(
        "--threads-batch", type=int, default=0,
        help="prompt-processing threads (0 = same as --threads)",
    )
    parser.add_argument("--batch-size", type=int, default=512, help="(micro)batch size")
    parser.add_argument(
        "--chat-template", default="gemma", help="built-in chat template name ('' = model's)"
    )
    parser.add_argument(
        "--jinja", action=argparse.BooleanOptionalAction, default=False,
        help="use the jinja template engine",
    )
    parser.add_argument(
        "--embeddings", action=argparse.BooleanOptionalAction, default=True,
        help="enable /v1/embeddings (alongside completions)",
    )
    parser.add_argument("--pooling", choices=POOLING, default="mean", help="embedding pooling")
    parser.add_argument(
        "--cache-ram-mib", type=int, default=512,
        help="host memory for the prompt cache in MiB (-1 = no limit, 0 = off)",
    )
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true",
        help="shut down when stdin reaches end of file (the parent went away)",
    )
    return parser.parse_args(argv)


def build_params(args: argparse.Namespace, api_key: str = "") -> Any:
    """Translate the arguments into an ``xllamacpp.CommonParams``."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    if args.alias:
        params.model_alias = {args.alias}
    if args.ctx_size:
        params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads_batch or args.threads
    # Embeddings need n_batch == n_ubatch (llama.cpp would force it anyway).
    params.n_batch = args.batch_size
    params.n_ubatch = args.batch_size
    params.chat_template = args.chat_template
    params.use_jinja = args.jinja
    params.embedding = args.embeddings
    if args.embeddings:
        pooling = getattr(xlc.llama_pooling_type, f"LLAMA_POOLING_TYPE_{args.pooling.upper()}")
        params.pooling_type = pooling
    params.cache_ram_mib = args.cache_ram_mib
    params.ui = False
    if api_key:
        params.api_keys = [api_key]
    return params


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or stdin EOF); return the exit status."""
    args = parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import xllamacpp as xlc

    params = build_params(args, os.environ.get(API_KEY_ENV, ""))
    try:
        server = xlc.Server(params)
    except RuntimeError as exc:
        print(f"llamacpp_server: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    if args.exit_on_stdin_eof:

        def watch_stdin() -> None:
            # Raw reads: a daemon thread blocked inside sys.stdin's buffered
            # reader would abort the interpreter at shutdown.
            try:
                while os.read(0, 65536):
                    pass
            except OSError:
                pass
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    print(f"{READY_PREFIX}{server.listening_address}", flush=True)
    while not stop.is_set():
        stop.wait(3600)
    del server  # stops the HTTP server and the inference loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
