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
from .voices import DEFAULT_MAX_VOICES  # the catalogue's own default (voices.py needs no server extra)

PROG = "qwen3-tts-edge"


# Streams one server engine batches at once unless --max-batch says otherwise: on 2 cores four streams on one engine
# all hear their first audio within a second (two workers: 12-21 s), at the throughput of two workers and 500 MB
# less memory (bench/README, "Many streams, one engine").
SERVER_MAX_BATCH = 4


# How long a server may take to shut down after Ctrl+C / SIGTERM before it exits anyway (see exit_if_stuck).
SHUTDOWN_GRACE_S = 10.0


class ServeError(Qwen3TTSEdgeError):
    """A server option that cannot work (bad URI, port in use...); printed as one line."""


API_KEY_ENV = "QWEN3_TTS_EDGE_API_KEY"
# HTTP connection limits: connections beyond this many get 503 (on top of the pool's places and queue); a client
# must send a request's headers within HEADER_TIMEOUT_S of connecting or of its previous reply.
EXTRA_CONNECTIONS = 32
HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5


def api_key(args: argparse.Namespace, environ: dict | None = None) -> str | None:
    """The key from --api-key, --api-key-file or $QWEN3_TTS_EDGE_API_KEY, in that order (a file or the environment
    keeps it out of `ps`)."""
    if args.api_key:
        return args.api_key
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"--api-key-file {args.api_key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not key:
            raise ServeError(f"--api-key-file {args.api_key_file} is empty; write the key into it")
        return key
    return (os.environ if environ is None else environ).get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(args: argparse.Namespace) -> list[str] | None:
    """The Host names to answer (None: any). Bound to loopback, only loopback names: a web page that rebinds its
    own name to 127.0.0.1 then cannot read or delete voices."""
    if args.allowed_hosts:
        names = [n.strip() for n in args.allowed_hosts.split(",") if n.strip()]
        return None if "*" in names else names
    if is_loopback(args.host):
        from .openai_api import LOOPBACK_HOSTS

        return sorted({*LOOPBACK_HOSTS, args.host.strip("[]").lower()})
    return None


def exposure_warnings(args: argparse.Namespace, key: str | None) -> list[str]:
    """What the banner warns about: a key in `ps`, a server other machines reach without a key."""
    out = []
    if args.api_key:
        out.append(f"--api-key is visible to every user of this machine (`ps`); use --api-key-file or ${API_KEY_ENV}")
    if not key and not is_loopback(args.host):
        out.append(f"listening on {args.host} without an API key: anyone on the network, and any web page a browser "
                   f"on it opens, can make this server speak and upload or delete voices; set ${API_KEY_ENV} or "
                   "--api-key-file (and --allowed-hosts)")
    return out


def _h11_with_header_timeout(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for request headers, which uvicorn lacks: a client that connects and
    trickles its headers (or sends nothing) is dropped after ``timeout_s`` instead of holding a socket forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        _due = None

        def _arm(self) -> None:
            if self._due is not None:
                self._due.cancel()
            self._due = self.loop.call_later(timeout_s, self._late)

        def _late(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request in progress: still waiting for headers

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._due is not None:
                self._due.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineH11


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-b", "--bundle", required=True, type=Path, help="an exported bundle")
    p.add_argument("--voices", type=Path, metavar="DIR",
                   help="folder of saved voices (NAME.voice; Base bundles); uploads go here")
    p.add_argument("--max-frames", type=_positive, metavar="N",
                   help="cap on 80 ms frames per request (default: the bundle's max_new_tokens)")
    # The same engine flags as speak (per worker engine; --threads defaults to the cores shared among workers).
    # --max-batch: servers batch SERVER_MAX_BATCH requests on an engine that can (llama.cpp; ONNX graphs with a batch
    # axis), unless told.
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
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (visible in `ps`: prefer "
                   f"--api-key-file or ${API_KEY_ENV})")
    p.add_argument("--api-key-file", type=Path, metavar="FILE", help="read the API key from FILE")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated Host names the server answers to, '*' for any (default: the loopback "
                        "names when --host is a loopback address, else any)")
    p.add_argument("--max-voices", type=_positive, default=DEFAULT_MAX_VOICES,
                   help=f"saved voices kept in --voices DIR before uploads are refused (default {DEFAULT_MAX_VOICES})")
    p.add_argument("--model-name", help="model id listed in /v1/models (default: from the bundle)")
    p.add_argument("--voice-alias", action="append", type=_alias, metavar="NAME=VOICE", default=[],
                   help="answer the voice NAME (e.g. OpenAI's alloy) with VOICE: a preset, a voice pack in --voices "
                        "DIR or (Base) a saved voice; "
                        "repeatable; on top of the defaults: CustomVoice maps OpenAI's 13 names to its presets, "
                        "VoiceDesign to its one voice, Base maps none")
    p.add_argument("--no-default-aliases", action="store_true",
                   help="only the --voice-alias names, not the bundle kind's default OpenAI names")
    _add_ray_arguments(p)


def _alias(text: str) -> tuple[str, str]:
    from .voices import parse_alias

    try:
        return parse_alias(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def alias_table(catalog, extra: dict[str, str], defaults: bool = True) -> dict[str, str]:
    """The alias table of a server (``serve`` and each Ray replica): the bundle kind's defaults (unless
    ``defaults`` is False), then ``extra`` on top."""
    from .voices import default_aliases

    table = default_aliases(catalog.model_type, catalog.speakers) if defaults else {}
    table.update(extra)
    return table


def voice_aliases(args: argparse.Namespace, catalog) -> dict[str, str]:
    """The alias table of ``serve``: the bundle kind's defaults (unless --no-default-aliases), then --voice-alias."""
    return alias_table(catalog, dict(args.voice_alias), not args.no_default_aliases)


def _add_ray_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"Ray Serve (scale-out over a Ray cluster; needs {RAY_INSTALL_HINT})")
    g.add_argument("--ray", action="store_true",
                   help="run this server as replicas on the Ray cluster $RAY_ADDRESS names (default: the one started "
                        "on this machine, else a new local one); the bundle path must hold the same export on every "
                        "node; --workers, --threads, --max-batch are per replica, --max-queue per Ray HTTP proxy")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=_positive, metavar="N", help="with --ray: N replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN..MAX",
                       help="with --ray: between MIN and MAX replicas, following the ongoing requests")


def add_wyoming_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--uri", default="tcp://0.0.0.0:10200", help="tcp://HOST:PORT, unix://PATH or stdio://")
    p.add_argument("--workers", type=_positive, default=1,
                   help="engines (each loads its own copy of the model and batches --max-batch requests)")
    p.add_argument("--zeroconf", nargs="?", const="qwen3-tts-edge", metavar="NAME",
                   help="announce the server to Home Assistant over mDNS (needs the zeroconf package)")


_deadline_armed = threading.Event()
# The native backstop fires this long after the Python watchdog (which exits with 130 and a message) should have.
_NATIVE_BACKSTOP_S = 5.0


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr: a server that seems stuck can say where, without a
    debugger (faulthandler's own signal handler, so it works while a native call holds the interpreter)."""
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)


def exit_if_stuck(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Arm a deadline for the shutdown that is starting: if the process is still alive after ``grace_s`` (a worker
    thread or a native library's teardown that never returns), print every thread's stack and exit with 130.

    A server must always stop on Ctrl+C. The watchdog is a Python thread; a native call that holds the interpreter
    lock would stop it too, so faulthandler's C-level timer backs it up ``_NATIVE_BACKSTOP_S`` later (it dumps the
    stacks and exits without taking the lock).
    """
    if _deadline_armed.is_set():
        return
    _deadline_armed.set()
    faulthandler.dump_traceback_later(grace_s + _NATIVE_BACKSTOP_S, exit=True, file=sys.stderr)

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
    """``SERVER_MAX_BATCH`` when the bundle's generation engine under ``config`` batches requests, else 1 (an ONNX
    bundle exported before its graphs had a batch axis still serves, one request per engine at a time)."""
    from ..bundle import load_bundle
    from ..engine.assemble import batches

    return SERVER_MAX_BATCH if batches(load_bundle(bundle, verify=False), config) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray or args.replicas or args.autoscale:
        return cmd_serve_ray(args)
    require("fastapi", "uvicorn", "python_multipart")
    import uvicorn

    from .openai_api import create_app

    _logging(args.log_level)
    dump_stacks_on_sigusr1()
    key, hosts = api_key(args), allowed_hosts(args)
    pool, catalog = _load(args, args.max_queue)
    catalog.max_voices = args.max_voices
    try:
        catalog.set_aliases(voice_aliases(args, catalog))  # the OpenAI API's only: Wyoming lists real voices
    except ValueError as exc:
        pool.close()
        raise ServeError(str(exc)) from None
    app = create_app(pool, catalog, api_key=key, model=args.model_name, max_frames=args.max_frames,
                     allowed_hosts=hosts)
    e = pool.engines[0]
    print(f"{PROG}: serving {app.state.api.model} on http://{args.host}:{args.port}/v1 ({args.workers} worker(s) x "
          f"{e.config.max_batch} streams, queue {args.max_queue}; {e.backend} talker {e.talker_precision}, decoder "
          f"{e.decoder_precision}; "
          f"voices: {', '.join(catalog.names()) or 'none yet'}; {_aliases_line(catalog)})", file=sys.stderr)
    for warning in exposure_warnings(args, key):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            http=_h11_with_header_timeout(HEADER_TIMEOUT_S), timeout_keep_alive=KEEP_ALIVE_S,
                            limit_concurrency=pool.capacity + args.max_queue + EXTRA_CONNECTIONS)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        exit_if_stuck()
    if not server.started:
        raise ServeError(f"could not listen on {args.host}:{args.port} (in use? try --port)")
    return 0


def _aliases_line(catalog) -> str:
    if not catalog.aliases:
        return "OpenAI voice names not mapped (--voice-alias alloy=VOICE)"
    targets = sorted(set(catalog.aliases.values()))
    return f"{len(catalog.aliases)} voice aliases to {', '.join(targets)} (GET /v1/audio/voices)"


RAY_INSTALL_HINT = "pip install 'qwen3-tts-edge[ray]'"


def cmd_serve_ray(args: argparse.Namespace) -> int:
    """``serve --ray``: the same app as replicas on a Ray cluster (``ray_app``), until Ctrl+C; then the app is
    deleted (its running streams finish first) and this driver disconnects (a local Ray it started stops)."""
    if not args.ray:
        raise ServeError("--replicas and --autoscale set the replicas of a Ray Serve deployment: add --ray")
    require("fastapi", "uvicorn", "python_multipart")
    from dataclasses import asdict

    from . import ray_app
    from .ray_app import APP_NAME, ReplicaOptions, deployment, manifest_sha256, parse_autoscale

    ray_app.require_ray()
    import ray
    from ray import serve

    _logging(args.log_level)
    try:
        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    bundle = args.bundle.resolve()
    key = api_key(args)
    try:
        config = EngineConfig.from_args(args)
        config = EngineConfig.build(config, threads=config.threads or 1,  # Ray needs each replica's CPUs
                                    max_batch=args.max_batch or server_max_batch(bundle, config))
    except ValueError as exc:
        raise ServeError(str(exc)) from exc
    options = ReplicaOptions(bundle=str(bundle), manifest_sha256=manifest_sha256(bundle),
                             voices=str(args.voices.resolve()) if args.voices else None, workers=args.workers,
                             max_frames=args.max_frames, max_voices=args.max_voices, model_name=args.model_name,
                             api_key=key, allowed_hosts=allowed_hosts(args), engine=asdict(config),
                             voice_aliases=dict(args.voice_alias), default_aliases=not args.no_default_aliases)
    ray_app.check_aliases(options)  # a bad alias fails here, before Ray starts anything
    app = deployment(options, replicas=None if autoscale else (args.replicas or 1), autoscale=autoscale,
                     proxy_queue=args.max_queue, log_level=args.log_level)
    ray.init(logging_level=args.log_level.upper(), log_to_driver=args.log_level == "debug")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the replicas' own error (e.g. another bundle on a node) is in the status
            why = ray_app.deployment_failure(APP_NAME) or str(exc)
            raise ServeError(f"Ray Serve could not start the replicas: {why.strip().splitlines()[-1]}") from None
        scale = f"{autoscale[0]}..{autoscale[1]} replicas" if autoscale else f"{args.replicas or 1} replica(s)"
        print(f"{PROG}: serving {bundle.name} through Ray Serve on http://{args.host}:{args.port}/v1 ({scale} x "
              f"{options.workers} worker(s) x {config.max_batch} streams, {options.cpus:g} CPU(s) each; up to "
              f"{max(1, args.max_queue)} requests wait per proxy, then 429)", file=sys.stderr)
        for warning in exposure_warnings(args, key):
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        while True:
            time.sleep(3600)
    finally:
        print(f"{PROG}: stopping: running streams finish first (Ctrl+C again to leave now)", file=sys.stderr)
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()


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
    restore_sigint = _arm_deadline_on_sigint()
    try:
        await server.run(service.handler)
    except OSError as exc:
        raise ServeError(f"could not listen on {args.uri}: {exc.strerror or exc}") from None
    finally:
        restore_sigint()
        exit_if_stuck()  # from here on (cancelled by Ctrl+C, or stopped) the process must end


def _arm_deadline_on_sigint():
    """Chain the event loop's Ctrl+C handler so the shutdown deadline starts the moment SIGINT arrives, not when the
    cancelled server returns (a shutdown that hangs before that point would otherwise never be cut off). Returns
    the function that puts the previous handler back."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIGINT ignored (a background job of a script) or not ours to chain
        return lambda: None

    def on_sigint(signum, frame):
        exit_if_stuck()
        previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)

    def restore() -> None:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)
    return restore


def cmd_wyoming(args: argparse.Namespace) -> int:
    require("wyoming")
    from .wyoming_server import WyomingService

    _logging(args.log_level)
    dump_stacks_on_sigusr1()
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
