"""The OpenAI-compatible speech API: ``POST /v1/audio/speech`` and the routes clients look for around it.

Routes: ``POST /v1/audio/speech``, ``GET /v1/models``, ``GET/POST /v1/audio/voices``,
``DELETE /v1/audio/voices/{name}``, ``GET /health``. Errors always have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` (the ``openai`` client reads ``param`` and ``code`` from it),
so the JSON body is checked here rather than by FastAPI's validation (whose 422 ``detail`` clients cannot read).

Audio is sent as it is made (``pcm``, ``wav``, ``opus``; ``flac`` and ``mp3`` once complete, see
``audio_formats``), raw or as server-sent events (``stream_format: "sse"``). A client that goes away cancels
its request, also while it waits in the queue or before its first byte: the worker stops within two frames
and takes the next request.

Safe to leave running on a LAN next to a browser: bodies are capped while they are read (``_Guard``), only a
JSON body makes speech (a cross-site ``no-cors`` fetch can only send text/plain or a form), the ``Host`` header is
checked against the allowed names (DNS rebinding), and the server, not the request, caps how long it speaks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..aio import AsyncAudioStream, AsyncTTS
from ..errors import Qwen3TTSEdgeError
from ..options import Limits, SpeakOptions
from .audio_formats import FORMATS, Encoder
from .pool import SERVER_CHUNK_FRAMES, EnginePool, PoolClosed, QueueFull
from .voices import VoiceCatalog, VoiceChoice, VoiceRequestError, language_name

log = logging.getLogger("qwen3_tts_edge.server")

MAX_INPUT_CHARS = 4096
MAX_INSTRUCTIONS_CHARS = 2048  # a voice description or style; its tokens go into every segment's prompt
MAX_REF_TEXT_CHARS = 2048  # the transcript of a reference clip of at most 60 s (audio_in.MAX_REFERENCE_S)
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # OpenAI's limit for a voice sample
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small fields around the audio
SMALL_BODY_BYTES = 64 * 1024  # every other route
SPEED_RANGE = (0.25, 4.0)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


# Which request field a runtime error is about (the runtime's messages name the option they refuse).
_PARAM_WORDS = (("instruct", "instructions"), ("speaker", "voice"), ("voice", "voice"), ("language", "language"),
                ("reference", "ref_audio"), ("audio", "ref_audio"), ("seed", "seed"), ("temperature", "temperature"),
                ("top_k", "top_k"), ("top_p", "top_p"), ("max_frames", "max_new_tokens"),
                ("min_frames", "min_new_tokens"), ("text", "input"), ("unicode", "input"))


def param_for(exc: BaseException) -> str | None:
    explicit = getattr(exc, "param", None)
    if explicit is not None or isinstance(exc, VoiceRequestError):
        return explicit
    message = str(exc).lower()
    return next((param for word, param in _PARAM_WORDS if word in message), None)


def model_id(tts: Any) -> str:
    """A readable model id from the bundle, e.g. ``qwen3-tts-0.6b-customvoice``."""
    m = tts.bundle.manifest.model
    size = str(m.get("tts_model_size") or "")
    if len(size) >= 3 and "b" in size[1:-1]:  # "0b6" -> "0.6b"
        size = size.replace("b", ".", 1) + "b"
    kind = str(m.get("tts_model_type") or "").replace("_", "")
    return "-".join(p for p in ("qwen3-tts", size, kind) if p)


@dataclass
class SpeechRequest:
    text: str
    fmt: str
    sse: bool
    choice: VoiceChoice | None
    options: SpeakOptions
    ref_audio: bytes | None = None
    ref_text: str | None = None
    x_vector_only: bool = False
    input_tokens: int = 0


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {what}, got {_shown(value)}", param=name)
    return value


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MiB"


def json_body_limit(max_upload_bytes: int) -> int:
    """The largest speech body: ``ref_audio`` as base64 (4/3 of the upload cap) plus the text fields, each
    character written as a JSON escape at worst."""
    return -(-max_upload_bytes // 3) * 4 + 12 * (MAX_INPUT_CHARS + MAX_INSTRUCTIONS_CHARS + MAX_REF_TEXT_CHARS) \
        + SMALL_BODY_BYTES


def _host_name(host: str) -> str:
    """A Host header's name without its port, lower-case ('[::1]:8880' -> '::1')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class _Guard:
    """Pure ASGI middleware (it only wraps ``receive``, so streamed replies and disconnects pass untouched): the
    ``Host`` check and the body cap of each route.

    The cap counts the body as uvicorn hands it over, so a declared ``Content-Length`` over the cap is refused
    before a byte is read and a chunked body at the byte that crosses it: memory never holds more than the cap.
    Starlette's TrustedHostMiddleware would answer in plain text; clients read OpenAI's error shape.
    """

    def __init__(self, app: Any, api: SpeechApp):
        self.app, self.api = app, api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        allowed = self.api.allowed_hosts
        name = _host_name(headers.get("host", ""))
        if allowed is not None and name not in allowed:
            return await ApiError(400, f"Host {name[:80]!r} is not a name this server answers to (allowed: "
                                  f"{', '.join(allowed)}); if it is yours, start the server with --allowed-hosts "
                                  f"{name[:80] or 'NAME'}", code="invalid_host").response()(scope, receive, send)
        limit, param, what = self.api.body_limit(scope["method"], scope["path"])
        length = headers.get("content-length")
        too_big = ApiError(413, f"the request body is larger than {_size(limit)}; {what}", param=param,
                           code="body_too_large", headers={"Connection": "close"})
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def capped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_big
            return message

        await self.app(scope, capped, send)


class _HeldStream(StreamingResponse):
    """A streamed reply that owns its request's engine place and stream (``held``): they are released however the
    reply ends, also when its body never started because the client left before the first byte."""

    def __init__(self, content: Any, held: contextlib.AsyncExitStack, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.held = held

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.held.aclose()  # a no-op when the body closed it


async def _disconnected(receive: Any) -> None:
    """Return when the client goes away (the body is read by then, so ``receive`` has nothing else to say)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Any) -> Any:
    """Await ``work`` (the queue wait, a one-off clone, the prompt) unless the client leaves first: then cancel it
    and return None. Without this a request abandoned while queued would run to its end for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


@contextlib.contextmanager
def _spooled(data: bytes, suffix: str = "") -> Iterator[str]:
    """``data`` as a temporary file for the voice loader (which bounds a clip by its header before decoding)."""
    fd, tmp = tempfile.mkstemp(prefix="qwen3-tts-edge-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _clone_error(exc: BaseException, tmp: str, field: str) -> ApiError:
    """A failed clone as a 400: our own errors say what is wrong (with the temporary path replaced by the field's
    name); anything else is logged, not echoed."""
    if isinstance(exc, Qwen3TTSEdgeError):
        return ApiError(400, f"could not clone a voice from {field}: {str(exc).replace(tmp, field)}", param=field)
    log.error("voice clone from %s failed: %r", field, exc)
    return ApiError(400, f"could not clone a voice from {field} ({type(exc).__name__}); send a 3-10 s clip of "
                    "clear speech as wav, flac, ogg or mp3", param=field)


def _decode_base64(value: str, max_bytes: int) -> bytes:
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    if len(data) * 3 // 4 > max_bytes:
        raise ApiError(413, f"ref_audio is larger than {_size(max_bytes)}", param="ref_audio")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "ref_audio must be base64-encoded audio (wav, flac, ogg, mp3), optionally as a data: "
                       "URL", param="ref_audio") from None


class SpeechApp:
    """The routes over one engine pool and one voice catalogue."""

    def __init__(self, pool: EnginePool, catalog: VoiceCatalog, *, api_key: str | None = None,
                 model: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_frames: int | None = None, allowed_hosts: list[str] | tuple[str, ...] | None = None):
        self.pool, self.catalog, self.api_key = pool, catalog, api_key
        engine = pool.engines[0]
        self.model = model or model_id(engine)
        self.model_type = engine.ids.model_type
        self.languages = list(engine.languages)
        self.sample_rate = engine.sample_rate
        self.tokenizer = engine.tokenizer
        self.max_upload_bytes = max_upload_bytes
        # The server's cap on frames per request; without --max-frames the runtime's text-length rule (8 frames
        # per text token + 40) decides, and no request may ask for more than the cap.
        self.max_frames = max_frames
        self.allowed_hosts = None if allowed_hosts is None else tuple(_host_name(h) for h in allowed_hosts)
        self.started = int(time.time())

    def body_limit(self, method: str, path: str) -> tuple[int, str | None, str]:
        """A route's body cap, the field that is most likely too big, and what to send instead."""
        clip = f"a reference clip may be at most {_size(self.max_upload_bytes)} (3-10 s of speech is plenty)"
        if method == "POST" and path == "/v1/audio/speech":
            return json_body_limit(self.max_upload_bytes), "ref_audio", clip
        if method == "POST" and path == "/v1/audio/voices":
            return self.max_upload_bytes + FORM_OVERHEAD_BYTES, "audio_sample", clip
        return SMALL_BODY_BYTES, None, "this route takes no body"

    def frame_cap(self, n_text_tokens: int) -> int:
        """The most 80 ms frames a request with ``n_text_tokens`` text tokens may make here."""
        ceiling = Limits().text_ceiling(n_text_tokens)
        return min(ceiling, self.max_frames) if self.max_frames and ceiling else (self.max_frames or ceiling)

    # ---- request parsing -------------------------------------------------------------------------------
    def parse_speech(self, body: dict[str, Any]) -> SpeechRequest:
        text = body.get("input")
        if not isinstance(text, str):
            raise ApiError(400, "input is required: the text to speak (a string)", param="input")
        if not text.strip():
            raise ApiError(400, "input is empty; give the text to speak", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise ApiError(400, f"input is {len(text)} characters; the maximum is {MAX_INPUT_CHARS}", param="input")
        _field(body, "model", str, "a string (any model name; see GET /v1/models)")
        fmt = body.get("response_format") or "mp3"
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ApiError(400, f"response_format {_shown(fmt)} is not supported; choose one of {', '.join(FORMATS)}",
                           param="response_format")
        stream_format = body.get("stream_format") or "audio"
        if not isinstance(stream_format, str) or stream_format not in ("audio", "sse"):
            raise ApiError(400, f"stream_format must be 'audio' or 'sse', got {_shown(stream_format)}",
                           param="stream_format")
        speed = _field(body, "speed", (int, float), "a number from 0.25 to 4.0")
        if speed is not None:
            if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
                raise ApiError(400, f"speed must be between 0.25 and 4.0, got {speed}", param="speed")
            if speed != 1.0:
                raise ApiError(400, f"speed {speed} is not supported: this server does not time-stretch; send 1.0 "
                               "or leave speed out (the voice's own pace)", param="speed")
        instructions = _field(body, "instructions", str, "a string") or None
        if instructions and len(instructions) > MAX_INSTRUCTIONS_CHARS:
            raise ApiError(400, f"instructions are {len(instructions)} characters; the maximum is "
                           f"{MAX_INSTRUCTIONS_CHARS}", param="instructions")
        if instructions and self.model_type == "base":
            raise ApiError(400, "instructions are not supported by a Base (voice clone) model; use a CustomVoice "
                           "1.7B or VoiceDesign bundle", param="instructions")
        language = language_name(_field(body, "language", str, "a language name or code"), self.languages)
        seed = _field(body, "seed", int, "an integer")
        greedy = bool(_field(body, "greedy", bool, "true or false"))
        sampling = {k: _field(body, k, (int, float), "a number") for k in ("temperature", "top_p")}
        sampling["top_k"] = _field(body, "top_k", int, "an integer")
        max_new = _field(body, "max_new_tokens", int, "a positive integer (80 ms frames)")
        min_new = _field(body, "min_new_tokens", int, "an integer >= 0 (80 ms frames)")
        if max_new is not None and max_new < 1:
            raise ApiError(400, f"max_new_tokens must be 1 or more, got {max_new}", param="max_new_tokens")
        try:
            n_tokens = len(self.tokenizer.encode(text))
        except (TypeError, ValueError):  # e.g. a lone surrogate (JSON allows "\ud800"), which is not text
            raise ApiError(400, "input is not valid Unicode text (it holds a lone surrogate); send UTF-8 text",
                           param="input") from None
        cap = self.frame_cap(n_tokens)
        why = "--max-frames" if self.max_frames == cap else f"8 frames per text token + 40 for {n_tokens} tokens"
        for name, value in (("max_new_tokens", max_new), ("min_new_tokens", min_new)):
            if value is not None and value > cap:
                raise ApiError(400, f"{name} {value} is more than this server allows for this input: at most {cap} "
                               f"frames of 80 ms ({why}); ask for {cap} or fewer", param=name)
        max_new = max_new or self.max_frames
        if min_new is not None and (min_new < 0 or (max_new is not None and min_new > max_new)):
            raise ApiError(400, f"min_new_tokens must be between 0 and max_new_tokens, got {min_new}",
                           param="min_new_tokens")

        ref_b64 = _field(body, "ref_audio", str, "base64-encoded audio")
        ref_text = _field(body, "ref_text", str, "a string (the transcript of ref_audio)")
        if ref_text and len(ref_text) > MAX_REF_TEXT_CHARS:
            raise ApiError(400, f"ref_text is {len(ref_text)} characters; the maximum is {MAX_REF_TEXT_CHARS}",
                           param="ref_text")
        x_only = bool(_field(body, "x_vector_only_mode", bool, "true or false"))
        ref_audio = None
        choice: VoiceChoice | None = None
        if ref_b64 is not None:
            if not ref_b64:
                raise ApiError(400, "ref_audio is empty: send a 3-10 s clip as base64, or leave the field out",
                               param="ref_audio")
            if self.model_type != "base":
                raise ApiError(400, f"ref_audio clones a voice, which only Base bundles do; this is a "
                               f"{self.model_type} bundle (use a preset voice)", param="ref_audio")
            ref_audio = _decode_base64(ref_b64, self.max_upload_bytes)
        else:
            voice = body.get("voice")
            if isinstance(voice, dict):
                voice = voice.get("id")
            if voice is not None and not isinstance(voice, str):
                raise ApiError(400, "voice must be a voice name or {\"id\": name}; see GET /v1/audio/voices",
                               param="voice")
            choice = self.catalog.resolve(voice)  # unknown -> 400 listing the voices there are
        limits: dict[str, Any] = {"max_frames": max_new}
        if min_new is not None:
            limits["min_frames"] = min_new
        try:
            options = SpeakOptions(language=language, instruct=instructions, seed=seed, greedy=greedy,
                                   temperature=sampling["temperature"], top_p=sampling["top_p"],
                                   top_k=sampling["top_k"], chunk_frames=SERVER_CHUNK_FRAMES,
                                   speaker=choice.speaker if choice else None,
                                   voice=choice.spoken if choice else None, **limits)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc), param=param_for(exc)) from None
        return SpeechRequest(text=text, fmt=fmt, sse=stream_format == "sse", choice=choice, options=options,
                             ref_audio=ref_audio, ref_text=ref_text or None, x_vector_only=x_only,
                             input_tokens=n_tokens)

    # ---- speech ------------------------------------------------------------------------------------------
    async def speech(self, request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body must be JSON sent as 'Content-Type: application/json' (got "
                           f"{kind[:60] or 'no Content-Type'})", code="unsupported_media_type")
        req = self.parse_speech(await _json_object(request))
        prepared = await _unless_client_leaves(request, self._prepare(req))
        if prepared is None:  # nginx's "client closed request": nobody reads it
            return Response(status_code=499)
        stream, held = prepared
        encoder = Encoder(req.fmt, self.sample_rate)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Sample-Rate": str(self.sample_rate)}
        if req.sse:
            return _HeldStream(self._sse_body(stream, encoder, held, req.input_tokens), held,
                               media_type="text/event-stream", headers=headers)
        return _HeldStream(self._audio_body(stream, encoder, held), held, media_type=encoder.content_type,
                           headers=headers)

    async def _prepare(self, req: SpeechRequest) -> tuple[AsyncAudioStream, contextlib.AsyncExitStack]:
        """An engine place and the request's started stream; both outlive this call (the reply closes them)."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                with _pool_errors():
                    engine = await stack.enter_async_context(self.pool.checkout())
                stream = await stack.enter_async_context(await self._start(engine, req))
                return stream, stack.pop_all()
        except (Qwen3TTSEdgeError, ValueError) as exc:
            raise ApiError(400, str(exc), param=param_for(exc)) from None

    async def _start(self, engine: AsyncTTS, req: SpeechRequest) -> AsyncAudioStream:
        """The request's stream on ``engine``; a one-off clone (``ref_audio``) is made first, on the engine."""
        options = req.options
        if req.ref_audio is not None:
            with _spooled(req.ref_audio) as tmp:
                try:
                    voice = await engine.create_voice(tmp, req.ref_text, x_vector_only=req.x_vector_only)
                except (Qwen3TTSEdgeError, ValueError, RuntimeError) as exc:
                    raise _clone_error(exc, tmp, "ref_audio") from None
            options = options.replace(voice=voice)
        return engine.astream(req.text, options)

    async def _audio_body(self, stream: AsyncAudioStream, encoder: Encoder,
                          held: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
        async with held:
            try:
                async for chunk in stream:
                    data = encoder.write(chunk.pcm)
                    if data:
                        yield data
                tail = encoder.finish()
                if tail:
                    yield tail
            except Exception:  # headers are gone: abort the transfer so the client sees it incomplete
                log.exception("speech request failed after the audio had started")
                raise
            finally:
                encoder.close()

    async def _sse_body(self, stream: AsyncAudioStream, encoder: Encoder, held: contextlib.AsyncExitStack,
                        input_tokens: int) -> AsyncIterator[str]:
        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        def delta(data: bytes) -> str:
            return event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

        async with held:
            try:
                async for chunk in stream:
                    data = encoder.write(chunk.pcm)
                    if data:
                        yield delta(data)
                tail = encoder.finish()
                if tail:
                    yield delta(tail)
                out = stream.stats.frames
                yield event({"type": "speech.audio.done", "usage": {"input_tokens": input_tokens, "output_tokens": out,
                                                                    "total_tokens": input_tokens + out}})
            except Exception as exc:  # the status line is sent: report the failure as an event
                log.exception("speech request failed after the stream had started")
                ours = isinstance(exc, Qwen3TTSEdgeError)  # our messages are for the user; others stay in the log
                message = str(exc) if ours else f"internal error ({type(exc).__name__}); see the server log"
                yield event({"type": "speech.audio.error", **error_body(400 if ours else 500, message,
                                                                         param_for(exc) if ours else None,
                                                                         type(exc).__name__)})
            finally:
                encoder.close()

    # ---- voices ------------------------------------------------------------------------------------------
    def list_voices(self) -> dict[str, Any]:
        return {"voices": self.catalog.listing(), "uploaded_voices": self.catalog.saved()}

    async def create_voice(self, request: Request) -> JSONResponse:
        if self.model_type != "base":
            raise ApiError(400, f"voices are cloned by Base bundles only; this is a {self.model_type} bundle "
                           "(its voices are the presets in GET /v1/audio/voices)", param="audio_sample")
        # The whole body is capped by _Guard (max_upload_bytes + the form's overhead) while it is read.
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=MAX_INPUT_CHARS * 4)
        except ApiError:
            raise
        except Exception as exc:  # starlette's multipart errors (shape, a field over max_part_size)
            detail = getattr(exc, "detail", None) or type(exc).__name__
            raise ApiError(400, f"could not read the multipart form ({detail}); send multipart/form-data with the "
                           "fields audio_sample (a file) and name", param="audio_sample") from None
        try:
            name = form.get("name")
            if not isinstance(name, str) or not name:
                raise ApiError(400, "name is required (the new voice's id)", param="name")
            self.catalog.check_new_name(name)
            self.catalog.check_room()
            upload = next((form.get(k) for k in ("audio_sample", "file", "audio") if hasattr(form.get(k), "read")),
                          None)
            if upload is None:
                raise ApiError(400, "audio_sample is required: the reference recording as a file (wav, flac, ogg, "
                               "mp3)", param="audio_sample")
            data = await upload.read()
            if len(data) > self.max_upload_bytes:
                raise ApiError(413, f"audio_sample is larger than {_size(self.max_upload_bytes)}",
                               param="audio_sample")
            ref_text = form.get("ref_text") if isinstance(form.get("ref_text"), str) else None
            if ref_text and len(ref_text) > MAX_REF_TEXT_CHARS:
                raise ApiError(400, f"ref_text is {len(ref_text)} characters; the maximum is {MAX_REF_TEXT_CHARS}",
                               param="ref_text")
            language = form.get("language") if isinstance(form.get("language"), str) else None
            x_only = str(form.get("x_vector_only_mode") or form.get("x_vector_only") or "").lower() in ("1", "true")
        finally:
            await form.close()
        if language:
            language = language_name(language, self.languages)
        suffix = os.path.splitext(getattr(upload, "filename", "") or "")[1][:8]
        if not suffix.replace(".", "").isalnum():
            suffix = ""
        with _spooled(data, suffix) as tmp:
            try:
                with _pool_errors():
                    async with self.pool.checkout() as engine:
                        voice = await engine.create_voice(tmp, ref_text or None, x_vector_only=x_only,
                                                          language=language)
            except (VoiceRequestError, ApiError):
                raise
            except (Qwen3TTSEdgeError, ValueError, RuntimeError) as exc:
                raise _clone_error(exc, tmp, "audio_sample") from None
        self.catalog.create(name, voice)
        log.info("voice %r saved (%s, %d bytes of audio) for %s", name, voice.mode, len(data), _client(request))
        return JSONResponse({"id": name, "name": name, "object": "audio.voice", "type": "audio_sample",
                             "created_at": int(time.time()), "mode": voice.mode}, status_code=201)

    def delete_voice(self, name: str, request: Request) -> dict[str, Any]:
        self.catalog.delete(name)
        log.info("voice %r deleted for %s", name, _client(request))
        return {"id": name, "object": "audio.voice.deleted", "deleted": True}

    # ---- misc --------------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.started,
                                            "owned_by": "qwen3-tts-edge"}]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model, "model_type": self.model_type,
                "sample_rate": self.sample_rate, **self.pool.health()}

    def authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


@contextlib.contextmanager
def _pool_errors() -> Iterator[None]:
    """A full queue or a closing pool as their HTTP answers: 429 with Retry-After, 503."""
    try:
        yield
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
    except PoolClosed as exc:
        raise ApiError(503, str(exc)) from None


def _shown(value: Any) -> str:
    """A request value quoted in an error message, cut short (a message never grows with the request)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


async def _json_object(request: Request) -> dict[str, Any]:
    """The body (capped by _Guard while it is read) as a JSON object."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def create_app(pool: EnginePool, catalog: VoiceCatalog, **options: Any) -> FastAPI:
    """The FastAPI app over ``pool`` and ``catalog``; ``options`` go to ``SpeechApp`` (api_key, model...)."""
    api = SpeechApp(pool, catalog, **options)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        pool.close()

    app = FastAPI(title="Qwen3-TTS Edge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.api = api
    app.add_middleware(_Guard, api=api)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(VoiceRequestError)
    async def _voice_error(_request: Request, exc: VoiceRequestError) -> JSONResponse:
        return ApiError(exc.status, str(exc), param=exc.param).response()

    @app.exception_handler(Qwen3TTSEdgeError)
    async def _user_error(_request: Request, exc: Qwen3TTSEdgeError) -> JSONResponse:
        return ApiError(400, str(exc), param=param_for(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route; see /v1/audio/speech, /v1/audio/voices, /v1/models, /health" \
            if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    async def _auth(request: Request) -> None:
        # A dependency rather than a middleware: an HTTP middleware would sit between the streamed body and
        # the client and hide disconnects.
        if not api.authorized(request):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                           "server was started with (--api-key)", code="invalid_api_key")

    v1 = {"dependencies": [Depends(_auth)]}
    app.add_api_route("/v1/audio/speech", api.speech, methods=["POST"], **v1)
    app.add_api_route("/v1/models", api.models, methods=["GET"], **v1)
    app.add_api_route("/v1/audio/voices", api.list_voices, methods=["GET"], **v1)
    app.add_api_route("/v1/audio/voices", api.create_voice, methods=["POST"], **v1)
    app.add_api_route("/v1/audio/voices/{name}", api.delete_voice, methods=["DELETE"], **v1)
    app.add_api_route("/health", api.health, methods=["GET"])
    return app
