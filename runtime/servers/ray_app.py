"""The OpenAI-compatible server as replicas on a Ray Serve cluster: ``serve --ray`` and ``serve run`` configs.

One replica is one process with one ``EnginePool`` (``workers`` engines x ``max_batch`` streams) behind the very
app ``serve`` runs (``openai_api.create_app``, built inside the replica once its engines are loaded), so routes,
errors and formats exist once. Ray places replicas on any node, runs an HTTP proxy on each, restarts replicas that
die or fail ``check_health`` and adds or removes replicas on load; batching fills each replica.

Who waits and who refuses, when every replica is full (the two admissions must not fight):

- Ray hands a replica at most ``max_ongoing_requests`` = its places (workers x max_batch) + its own queue, which
  is 0 by default: a request waits in the HTTP proxy that received it, not inside a replica, because a proxy
  prefers the replicas of its own node while they have room and would otherwise pile a queue there while another
  node's replica idles. So the pool admits what Ray sends and its own 429 does not fire (a backstop only).
- At most ``proxy_queue`` requests (``--max-queue``, default 8) wait per proxy, FIFO, taking the first place any
  replica frees; the next one gets **Ray's 429 with Retry-After** at once (``BackpressureConfig``), never a hang.
  Its body is Ray's plain-text message, not OpenAI's error shape; clients act on the status and the header (the
  ``openai`` client raises ``RateLimitError`` and, with retries on, waits ``Retry-After``).

A replica is ready (routed to) only after its bundle is loaded and verified: the sha256 of ``manifest.json``
must equal the one the driver read (so a node with another export refuses to start, naming both hashes), and
the components must match their manifest checksums (``load_bundle``). ``check_health`` fails when the pool is
closed or when requests hold engines and no reply has moved for ``wedged_after_s``; Ray then replaces the
replica. A replica being stopped (scale-down, redeploy, Ctrl+C) takes no new requests and lets running streams
finish for up to ``graceful_shutdown_s`` before its pool closes.

Ray is imported only inside the functions that need it: the lean install and ``serve`` never import it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Qwen3TTSEdgeError
from .cli import API_KEY_ENV, RAY_INSTALL_HINT
from .voices import VoiceCatalog

log = logging.getLogger("qwen3_tts_edge.server")

APP_NAME = "qwen3-tts-edge"
DEPLOYMENT_NAME = "SpeechReplica"
REPLICA_HEADER = "X-Replica"  # which replica answered (its Serve replica id): logs, tests, sticky debugging
# A replica whose held requests sent nothing for this long is wedged: a frame takes tens of milliseconds and a
# prompt a few seconds, so a minute of silence with engines held is a stuck engine, not a slow one.
WEDGED_AFTER_S = 60.0
# ... and the process used less than this share of one core meanwhile (a generating engine uses most of one).
WEDGED_CPU_FRACTION = 0.02
# Running streams a stopping replica lets finish: a long reply at real time on a slow node.
GRACEFUL_SHUTDOWN_S = 120.0
# Ray's Retry-After for a request refused at the proxy: about one request's time on a replica (the pool's own
# estimate starts from the same 2 s).
RETRY_AFTER_S = 2.0
# Requests that wait in each HTTP proxy when every replica is full (serve's --max-queue default).
PROXY_QUEUE = 8
HEALTH_PERIOD_S = 10.0
HEALTH_TIMEOUT_S = 30.0
# Tries to construct a replica before the deployment is marked failed: a wrong bundle fails the same way each time.
CONSTRUCTOR_RETRIES = 3
# Autoscaling: a replica is wanted per this many ongoing requests (ongoing = running + queued in the replica).
STREAMS_PER_REPLICA_TARGET = 2
# Temporaries in a shared voices folder younger than this are another replica's voice being written right now.
STRAY_TEMP_AGE_S = 3600.0


class RayServeError(Qwen3TTSEdgeError):
    """A Ray Serve option or cluster state that cannot work; the message says what to change."""


class BundleMismatch(Qwen3TTSEdgeError):
    """This node's bundle is not the one the deployment was made for."""


class ReplicaUnhealthy(Qwen3TTSEdgeError):
    """Raised by ``check_health``: Ray stops routing to the replica and replaces it."""


def require_ray() -> None:
    """Import-check Ray Serve; a missing one is one line naming the install command."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise RayServeError(f"--ray needs Ray Serve ({exc.name or 'ray'} is not installed); install the ray extra: "
                            f"{RAY_INSTALL_HINT}") from None


def manifest_sha256(bundle: str | Path) -> str:
    """sha256 of ``bundle/manifest.json``: it lists every component's sha256, so it names the whole bundle."""
    from ..bundle import MANIFEST_NAME, read_manifest

    path = Path(bundle) / MANIFEST_NAME
    read_manifest(Path(bundle))  # a missing or malformed bundle fails here with the bundle's own message
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN..MAX`` (e.g. ``1..4``) to (min, max) replicas; MIN may be 0 (scale to zero when idle)."""
    lo, sep, hi = text.partition("..")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        low = high = -1
    if not sep or low < 0 or high < 1 or low > high:
        raise ValueError(f"--autoscale takes MIN..MAX replicas with 0 <= MIN <= MAX and MAX >= 1 (e.g. 1..4), got "
                         f"{text!r}")
    return low, high


@dataclass(frozen=True)
class ReplicaOptions:
    """What every replica is started with (pickled by Ray into each replica; plain values, YAML-friendly).

    ``bundle`` must be an absolute path that holds the same export on every node (a shared mount, or the same
    export copied to each); ``manifest_sha256`` (None: not checked) is the hash the driver read there.
    ``engine`` holds ``EngineConfig`` fields (threads, max_batch, backend...). ``max_queue`` is the replica's own
    queue (0: requests wait in the proxies, see the module notes). ``api_key`` None reads
    ``$QWEN3_TTS_EDGE_API_KEY`` on the replica's node. ``voice_aliases`` and ``default_aliases`` are ``serve``'s
    ``--voice-alias`` table and the opposite of ``--no-default-aliases``.
    """

    bundle: str
    manifest_sha256: str | None = None
    voices: str | None = None
    workers: int = 1
    max_queue: int = 0
    max_frames: int | None = None
    max_voices: int = 256
    model_name: str | None = None
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    wedged_after_s: float = WEDGED_AFTER_S
    voice_aliases: dict[str, str] = field(default_factory=dict)
    default_aliases: bool = True

    def __post_init__(self) -> None:
        if not Path(self.bundle).is_absolute():
            raise RayServeError(f"bundle {self.bundle!r} must be an absolute path: replicas run in other folders "
                                "and on other nodes, where it must name the same export")
        if self.voices is not None and not Path(self.voices).is_absolute():
            raise RayServeError(f"voices {self.voices!r} must be an absolute path (a folder every node mounts)")
        if self.workers < 1 or self.max_queue < 0:
            raise RayServeError(f"workers must be >= 1 and max_queue >= 0, got {self.workers} and {self.max_queue}")
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))

    def engine_config(self):
        from ..engine.config import EngineConfig

        return EngineConfig.build(**self.engine)

    @property
    def max_batch(self) -> int:
        return int(self.engine.get("max_batch") or 1)

    @property
    def capacity(self) -> int:
        """Streams one replica runs at once."""
        return self.workers * self.max_batch

    @property
    def cpus(self) -> float:
        """CPUs one replica reserves on its node: its engines' threads."""
        return float(self.workers * (self.engine.get("threads") or 1))


class SharedVoiceCatalog(VoiceCatalog):
    """The voice catalogue on a ``--voices`` folder that every replica writes.

    Concurrent writers stay safe because ``VoiceCatalog.create`` writes a private temporary file and hard-links
    it into place, which fails rather than replace a voice another replica saved under the same name (the loser
    gets a 409); readers notice new and deleted voices by the folder's mtime. The one change: at start a replica
    removes only temporaries older than ``STRAY_TEMP_AGE_S`` (a crash's leftovers), never the file another
    replica is writing at that moment.
    """

    stray_temp_age_s = STRAY_TEMP_AGE_S


def load_replica(options: ReplicaOptions):
    """The replica's pool and voice catalogue, after the bundle is checked against the driver's manifest hash."""
    from .pool import EnginePool

    if options.manifest_sha256 is not None:
        here = manifest_sha256(options.bundle)
        if here != options.manifest_sha256:
            raise BundleMismatch(
                f"the bundle at {options.bundle} on this node (manifest sha256 {here[:16]}...) is not the one the "
                f"deployment was made for ({options.manifest_sha256[:16]}...): put the same export at that path on "
                "every node (a shared mount, or copy the export) and redeploy")
    pool = EnginePool.load(options.bundle, workers=options.workers, max_queue=options.max_queue,
                           config=options.engine_config())
    engine = pool.engines[0]
    catalog = SharedVoiceCatalog(engine.speakers, engine.ids.model_type, options.voices,
                                 max_voices=options.max_voices)
    catalog.set_aliases(replica_aliases(options, catalog))
    return pool, catalog


def replica_aliases(options: ReplicaOptions, catalog: VoiceCatalog) -> dict[str, str]:
    """The OpenAI voice-name table of every replica, as ``serve`` builds it; also run by the driver on the bundle's
    manifest (``check_aliases``) so a bad alias fails before Ray starts anything."""
    from .cli import alias_table

    return alias_table(catalog, options.voice_aliases, options.default_aliases)


def check_aliases(options: ReplicaOptions) -> None:
    """Raise ``RayServeError`` if ``options``' aliases do not fit the bundle (a hidden preset, an unknown voice)."""
    from ..bundle import read_manifest
    from ..prompt import ModelIds

    ids = ModelIds.from_manifest(read_manifest(Path(options.bundle)))
    catalog = VoiceCatalog(list(ids.speakers), ids.model_type)
    try:
        catalog.set_aliases(replica_aliases(options, catalog))
    except ValueError as exc:
        raise RayServeError(str(exc)) from None


class ReplyWatch:
    """Pure ASGI wrapper around the app: notes when a reply of this replica last moved (a request arrived, a
    header or a body part went out), for ``check_health``, and names the replica in an ``X-Replica`` header.

    It only wraps ``send``, so streamed replies and disconnects pass through untouched.
    """

    def __init__(self, app: Any, replica: str, clock: Any = time.monotonic, cpu: Any = time.process_time):
        self.app, self.clock, self.cpu = app, clock, cpu
        self.header = (REPLICA_HEADER.lower().encode("latin-1"), replica.encode("latin-1"))
        self.moved, self.cpu_at_move = clock(), cpu()
        self.open = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.open += 1
        self._moved()

        async def noting(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            self._moved()
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            self.open -= 1

    def _moved(self) -> None:
        self.moved, self.cpu_at_move = self.clock(), self.cpu()

    def stalled_s(self) -> float:
        return self.clock() - self.moved

    def cpu_since_move_s(self) -> float:
        """CPU seconds this process used since a reply last moved: a flac or mp3 reply sends nothing until it is
        complete, but its engine keeps computing; a wedged one does not."""
        return self.cpu() - self.cpu_at_move


def health_problem(pool: Any, watch: ReplyWatch, wedged_after_s: float) -> str | None:
    """Why this replica should be replaced, or None: a closed pool, or engines held while no reply has moved for
    ``wedged_after_s`` and the process has (nearly) stopped computing."""
    if pool.closed:
        return "the engine pool is closed (the replica is shutting down)"
    stalled = watch.stalled_s()
    if pool.busy and stalled > wedged_after_s and watch.cpu_since_move_s() < WEDGED_CPU_FRACTION * stalled:
        return (f"{pool.busy} request(s) hold engines but no reply has moved and the process has been idle for "
                f"{stalled:.0f} s (limit {wedged_after_s:g} s): the engine is wedged; Ray replaces this replica")
    return None


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (a test building one by hand)
        return f"pid{os.getpid()}"


class SpeechReplica:
    """One replica: loads and verifies the bundle, then serves ``create_app`` over its pool (late-bound ingress:
    Ray asks ``__serve_build_asgi_app__`` for the app after ``__init__``, and routes to the replica only then)."""

    def __init__(self, options: ReplicaOptions):
        from .openai_api import create_app

        self.options = options
        self.pool, self.catalog = load_replica(options)
        app = create_app(self.pool, self.catalog, api_key=options.api_key or os.environ.get(API_KEY_ENV) or None,
                         model=options.model_name, max_frames=options.max_frames,
                         allowed_hosts=list(options.allowed_hosts) if options.allowed_hosts is not None else None)
        self.watch = ReplyWatch(app, _replica_id())
        e = self.pool.engines[0]
        log.info("replica ready: %s, %d worker(s) x %d streams, queue %d (%s talker %s)", options.bundle,
                 self.pool.workers, self.pool.max_batch, options.max_queue, e.backend, e.talker_precision)

    def __serve_build_asgi_app__(self) -> Any:
        return self.watch

    async def check_health(self) -> None:
        problem = health_problem(self.pool, self.watch, self.options.wedged_after_s)
        if problem:
            raise ReplicaUnhealthy(problem)


def deployment(options: ReplicaOptions, *, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
               proxy_queue: int = PROXY_QUEUE, retry_after_s: float = RETRY_AFTER_S,
               graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_S, health_period_s: float = HEALTH_PERIOD_S,
               autoscaling: dict[str, Any] | None = None, log_level: str | None = None) -> Any:
    """The Serve application (bound deployment) for ``options``: ``replicas`` fixed replicas, or ``autoscale``
    (min, max) on ongoing requests. ``proxy_queue`` requests wait in each HTTP proxy when every replica is full;
    the next gets 429 + Retry-After. ``autoscaling`` overrides Ray's
    ``AutoscalingConfig`` fields (delays, look-back)."""
    require_ray()
    from ray import serve
    from ray.serve.config import BackpressureConfig

    if autoscale is not None and replicas is not None:
        raise RayServeError("give either a replica count or an autoscale range, not both")
    settings: dict[str, Any] = {}
    if autoscale is not None:
        low, high = autoscale
        settings["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                          "target_ongoing_requests": min(STREAMS_PER_REPLICA_TARGET,
                                                                         options.capacity),
                                          **(autoscaling or {})}
    else:
        settings["num_replicas"] = replicas or 1
    if log_level:
        settings["logging_config"] = {"log_level": log_level.upper()}
    cls = serve.deployment(serve.ingress()(SpeechReplica), name=DEPLOYMENT_NAME)
    return cls.options(
        ray_actor_options={"num_cpus": options.cpus},
        max_ongoing_requests=options.capacity + options.max_queue,
        max_queued_requests=max(1, proxy_queue),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=retry_after_s),
        graceful_shutdown_timeout_s=graceful_shutdown_s, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=health_period_s, health_check_timeout_s=HEALTH_TIMEOUT_S,
        max_constructor_retry_count=CONSTRUCTOR_RETRIES, **settings,
    ).bind(options)


def deployment_failure(app_name: str = APP_NAME) -> str | None:
    """Why ``app_name``'s replicas failed to start (Ray keeps the constructor's error in the deployment status;
    ``serve.run`` itself only says that it failed), or None."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None
    messages = [d.message for d in app.deployments.values() if d.message] or [app.message]
    return "\n".join(m for m in messages if m) or None


_OPTION_FIELDS = {"bundle", "manifest_sha256", "voices", "workers", "max_queue", "max_frames", "max_voices",
                  "model_name", "api_key", "allowed_hosts", "engine", "wedged_after_s", "voice_aliases",
                  "default_aliases"}
_DEPLOY_FIELDS = {"replicas", "autoscale", "proxy_queue", "retry_after_s", "graceful_shutdown_s", "autoscaling",
                  "log_level"}


def build(args: dict[str, Any]) -> Any:
    """The application builder for Serve configs (``import_path: qwen3_tts_edge.runtime.servers.ray_app:build``).

    ``args``: ``bundle`` (required) and the other ``ReplicaOptions`` fields, plus ``replicas`` or ``autoscale``
    ("MIN..MAX"), ``proxy_queue``, ``retry_after_s``, ``graceful_shutdown_s``, ``autoscaling``. Where the builder
    runs (the node that runs ``serve run``/``serve deploy``'s build) it reads the bundle's manifest hash, unless
    ``manifest_sha256`` is given, and ``max_batch`` unless ``engine.max_batch`` is; every replica then refuses a
    different bundle.
    """
    from .cli import server_max_batch

    args = dict(args or {})
    unknown = sorted(set(args) - _OPTION_FIELDS - _DEPLOY_FIELDS)
    if unknown:
        raise RayServeError(f"unknown args {unknown}; choose from {', '.join(sorted(_OPTION_FIELDS | _DEPLOY_FIELDS))}")
    if not args.get("bundle"):
        raise RayServeError("args.bundle is required: the absolute path of the exported bundle on every node")
    engine = dict(args.get("engine") or {})
    bundle = Path(args["bundle"])
    if args.get("manifest_sha256") is None:
        args["manifest_sha256"] = manifest_sha256(bundle)
    if engine.get("max_batch") is None:
        from ..engine.config import EngineConfig

        engine["max_batch"] = server_max_batch(bundle, EngineConfig.build(**engine))
    engine.setdefault("threads", 1)
    options = ReplicaOptions(**{k: v for k, v in args.items() if k in _OPTION_FIELDS} | {"engine": engine})
    check_aliases(options)
    autoscale = args.get("autoscale")
    if isinstance(autoscale, str):
        autoscale = parse_autoscale(autoscale)
    elif isinstance(autoscale, dict):
        autoscale = (int(autoscale["min"]), int(autoscale["max"]))
    deploy = {k: args[k] for k in _DEPLOY_FIELDS - {"autoscale"} if args.get(k) is not None}
    return deployment(options, **deploy, autoscale=autoscale)


def options_dict(options: ReplicaOptions) -> dict[str, Any]:
    """``options`` as plain values (what a Serve config's ``args`` would hold), without the key."""
    out = asdict(options)
    out.pop("api_key", None)
    return out
