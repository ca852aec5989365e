"""``qwen3-tts-edge serve`` (OpenAI-compatible HTTP API) and ``qwen3-tts-edge wyoming`` (Home Assistant).

Plugged into ``runtime/cli.py`` by module name. This module itself imports only the standard library and the
runtime, so ``--help`` works without the server extra; running a server checks for the extra first and names
the install command in one line when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from ..engine.config import EngineConfig, add_engine_arguments
from ..engine.config import non_negative_int as _non_negative
from ..engine.config import positive_int as _positive
from ..errors import Qwen3TTSEdgeError
from . import require

PROG = "qwen3-tts-edge"


# Streams one server engine batches at once unless --max-batch says otherwise: on 2 cores four streams on one engine
# all hear their first audio within a second (two workers: 12-21 s), at the throughput of two workers and 500 MB
# less memory (bench/README, "Many streams, one engine").
SERVER_MAX_BATCH = 4


# How long a server may take to shut down after Ctrl+C / SIGTERM before it exits anyway (see exit_if_stuck).
SHUTDOWN_GRACE_S = 10.0


class ServeError(Qwen3TTSEdgeError):
    """A server option that cannot work (bad URI, port in use...); printed as one line."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-b", "--bundle", required=True, type=Path, help="an exported bundle")
    p.add_argument("--voices", type=Path, metavar="DIR",
                   help="folder of saved voices (NAME.voice; Base bundles); uploads go here")
    p.add_argument("--max-frames", type=_positive, metavar="N",
                   help="cap on 80 ms frames per request (default: the bundle's max_new_tokens)")
    # The same engine flags as speak (per worker engine; --threads defaults to the cores shared among workers).
    # --max-batch: servers batch SERVER_MAX_BATCH requests on an engine that can (llama.cpp), unless told.
    add_engine_arguments(p.add_argument_group("engine (as for speak; per worker)"))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8880)
    p.add_argument("--workers", type=_positive, default=1,
                   help="engines (processes' worth: each loads its own copy of the model and batches --max-batch "
                        "requests)")
    p.add_argument("--max-queue", type=_non_negative, default=8,
                   help="requests waiting for a place before new ones get 429 + Retry-After")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--model-name", help="model id listed in /v1/models (default: from the bundle)")


def add_wyoming_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--uri", default="tcp://0.0.0.0:10200", help="tcp://HOST:PORT, unix://PATH or stdio://")
    p.add_argument("--workers", type=_positive, default=1,
                   help="engines (each loads its own copy of the model and batches --max-batch requests)")
    p.add_argument("--zeroconf", nargs="?", const="qwen3-tts-edge", metavar="NAME",
                   help="announce the server to Home Assistant over mDNS (needs the zeroconf package)")


_deadline_armed = threading.Event()


def exit_if_stuck(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Arm a deadline for the shutdown that is starting: if the process is still alive after ``grace_s`` (a worker
    thread or a native library's teardown that never returns), print every thread's stack and exit with 130.

    A server must always stop on Ctrl+C; twice in full test-suite runs (never alone) the Wyoming server did not
    exit within 20 s of SIGINT, and where it hung could not be seen. The stacks printed here will show it.
    """
    if _deadline_armed.is_set():
        return
    _deadline_armed.set()

    def watchdog() -> None:
        time.sleep(grace_s)
        print(f"{PROG}: shutdown did not finish within {grace_s:g} s; exiting (threads still running below)",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(130)

    threading.Thread(target=watchdog, name="qwen3-tts-edge-shutdown-deadline", daemon=True).start()


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _load(args: argparse.Namespace, max_queue: int):
    from ..bundle import BundleError
    from .pool import EnginePool
    from .voices import VoiceCatalog

    threads = args.threads
    if threads is None and args.workers > 1:  # share the cores instead of every engine taking all of them
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    try:
        config = EngineConfig.from_args(args)
        if args.max_batch is None:
            config = EngineConfig.build(config, max_batch=server_max_batch(args.bundle, config))
        pool = EnginePool.load(args.bundle, workers=args.workers, max_queue=max_queue, threads=threads,
                               config=config)
    except (BundleError, ValueError) as exc:
        raise ServeError(str(exc)) from exc
    engine = pool.engines[0]
    catalog = VoiceCatalog(engine.speakers, engine.ids.model_type, args.voices)
    return pool, catalog


def server_max_batch(bundle: Path, config: EngineConfig) -> int:
    """``SERVER_MAX_BATCH`` when the bundle's generation engine under ``config`` batches requests, else 1."""
    from ..bundle import load_bundle
    from ..engine.assemble import generation_spec

    return SERVER_MAX_BATCH if generation_spec(load_bundle(bundle, verify=False), config).sequences else 1


def cmd_serve(args: argparse.Namespace) -> int:
    require("fastapi", "uvicorn", "python_multipart")
    import uvicorn

    from .openai_api import create_app

    _logging(args.log_level)
    pool, catalog = _load(args, args.max_queue)
    app = create_app(pool, catalog, api_key=args.api_key, model=args.model_name, max_frames=args.max_frames)
    e = pool.engines[0]
    print(f"{PROG}: serving {app.state.api.model} on http://{args.host}:{args.port}/v1 ({args.workers} worker(s) x "
          f"{e.config.max_batch} streams, queue {args.max_queue}; {e.backend} talker {e.talker_precision}, decoder "
          f"{e.decoder_precision}; "
          f"voices: {', '.join(catalog.names()) or 'none yet'})", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        exit_if_stuck()
    if not server.started:
        raise ServeError(f"could not listen on {args.host}:{args.port} (in use? try --port)")
    return 0


def _wyoming_server(args: argparse.Namespace):
    """The listening server for ``--uri``, checked (with ``--zeroconf``) before the model is loaded."""
    from importlib.util import find_spec

    from wyoming.server import AsyncServer

    try:
        server = AsyncServer.from_uri(args.uri)
    except ValueError as exc:
        raise ServeError(f"--uri {args.uri!r}: {exc}") from None
    if args.zeroconf:
        if urlparse(args.uri).scheme != "tcp":
            raise ServeError("--zeroconf needs a tcp:// --uri")
        if find_spec("zeroconf") is None:
            raise ServeError("--zeroconf needs the zeroconf package: pip install zeroconf")
    return server


async def _run_wyoming(args: argparse.Namespace, server, service) -> None:
    if args.zeroconf:
        from wyoming.zeroconf import HomeAssistantZeroconf

        uri = urlparse(args.uri)
        host = None if uri.hostname in (None, "0.0.0.0", "") else uri.hostname
        announcer = HomeAssistantZeroconf(port=int(uri.port), name=args.zeroconf, host=host)
        await announcer.register_server()
        print(f"{PROG}: announced as {args.zeroconf}._wyoming._tcp.local.", file=sys.stderr)
    try:
        await server.run(service.handler)
    except OSError as exc:
        raise ServeError(f"could not listen on {args.uri}: {exc.strerror or exc}") from None
    finally:
        exit_if_stuck()  # from here on (cancelled by Ctrl+C, or stopped) the process must end


def cmd_wyoming(args: argparse.Namespace) -> int:
    require("wyoming")
    from .wyoming_server import WyomingService

    _logging(args.log_level)
    server = _wyoming_server(args)
    pool, catalog = _load(args, max_queue=64)  # Home Assistant waits; it never retries on a 429
    service = WyomingService(pool, catalog, max_frames=args.max_frames)
    print(f"{PROG}: Wyoming TTS on {args.uri} (voices: {', '.join(catalog.names()) or 'none yet'}; languages: "
          f"{', '.join(service.language_codes)})", file=sys.stderr)
    try:
        asyncio.run(_run_wyoming(args, server, service))
    finally:
        exit_if_stuck()
        pool.close()
    return 0
