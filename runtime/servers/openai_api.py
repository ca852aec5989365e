"""The OpenAI-compatible speech API: ``POST /v1/audio/speech`` and the routes clients look for around it.

Routes: ``POST /v1/audio/speech``, ``GET /v1/models``, ``GET/POST /v1/audio/voices``,
``DELETE /v1/audio/voices/{name}``, ``GET /health``. Errors always have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` (the ``openai`` client reads ``param`` and ``code`` from it),
so the JSON body is checked here rather than by FastAPI's validation (whose 422 ``detail`` clients cannot read).

Audio is sent as it is made (``pcm``, ``wav``, ``opus``; ``flac`` and ``mp3`` once complete, see
``audio_formats``), raw or as server-sent events (``stream_format: "sse"``). A client that goes away cancels
its request: the worker stops within two frames and takes the next request.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..aio import AsyncAudioStream, AsyncTTS
from ..errors import Qwen3TTSEdgeError
from ..options import SpeakOptions
from .audio_formats import FORMATS, Encoder
from .pool import SERVER_CHUNK_FRAMES, EnginePool, PoolClosed, QueueFull
from .voices import VoiceCatalog, VoiceChoice, VoiceRequestError, language_name

log = logging.getLogger("qwen3_tts_edge.server")

MAX_INPUT_CHARS = 4096
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # OpenAI's limit for a voice sample
SPEED_RANGE = (0.25, 4.0)
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


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


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)[:60]}", param=name)
    return value


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MiB"


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
                 max_frames: int | None = None):
        self.pool, self.catalog, self.api_key = pool, catalog, api_key
        engine = pool.engines[0]
        self.model = model or model_id(engine)
        self.model_type = engine.ids.model_type
        self.languages = list(engine.languages)
        self.sample_rate = engine.sample_rate
        self.max_upload_bytes = max_upload_bytes
        self.max_frames = max_frames  # server cap on frames per request (None: the bundle's)
        self.started = int(time.time())

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
        if fmt not in FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}",
                           param="response_format")
        stream_format = body.get("stream_format") or "audio"
        if stream_format not in ("audio", "sse"):
            raise ApiError(400, f"stream_format must be 'audio' or 'sse', got {stream_format!r}", param="stream_format")
        speed = _field(body, "speed", (int, float), "a number from 0.25 to 4.0")
        if speed is not None:
            if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
                raise ApiError(400, f"speed must be between 0.25 and 4.0, got {speed}", param="speed")
            if speed != 1.0:
                raise ApiError(400, f"speed {speed} is not supported: this server does not time-stretch; send 1.0 "
                               "or leave speed out (the voice's own pace)", param="speed")
        instructions = _field(body, "instructions", str, "a string") or None
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
        if self.max_frames is not None:
            max_new = min(max_new or self.max_frames, self.max_frames)
        if min_new is not None and (min_new < 0 or (max_new is not None and min_new > max_new)):
            raise ApiError(400, f"min_new_tokens must be between 0 and max_new_tokens, got {min_new}",
                           param="min_new_tokens")

        ref_b64 = _field(body, "ref_audio", str, "base64-encoded audio")
        ref_text = _field(body, "ref_text", str, "a string (the transcript of ref_audio)")
        x_only = bool(_field(body, "x_vector_only_mode", bool, "true or false"))
        ref_audio = None
        choice: VoiceChoice | None = None
        if ref_b64:
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
                                   voice=choice.voice if choice else None, **limits)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc), param=param_for(exc)) from None
        return SpeechRequest(text=text, fmt=fmt, sse=stream_format == "sse", choice=choice, options=options,
                             ref_audio=ref_audio, ref_text=ref_text or None, x_vector_only=x_only)

    # ---- speech ------------------------------------------------------------------------------------------
    async def speech(self, request: Request) -> StreamingResponse:
        req = self.parse_speech(await _json_object(request))
        encoder = Encoder(req.fmt, self.sample_rate)
        try:
            # The engine and the stream outlive this call: the response body closes them (``held``).
            async with contextlib.AsyncExitStack() as stack:
                with _pool_errors():
                    engine = await stack.enter_async_context(self.pool.checkout())
                input_tokens = len(engine.tts.tokenizer.encode(req.text))  # before the engine's thread uses it
                stream = await stack.enter_async_context(await self._start(engine, req))
                held = stack.pop_all()
        except (Qwen3TTSEdgeError, ValueError) as exc:
            raise ApiError(400, str(exc), param=param_for(exc)) from None
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Sample-Rate": str(self.sample_rate)}
        if req.sse:
            return StreamingResponse(self._sse_body(stream, encoder, held, input_tokens),
                                     media_type="text/event-stream", headers=headers)
        return StreamingResponse(self._audio_body(stream, encoder, held), media_type=encoder.content_type,
                                 headers=headers)

    async def _start(self, engine: AsyncTTS, req: SpeechRequest) -> AsyncAudioStream:
        """The request's stream on ``engine``; a one-off clone (``ref_audio``) is made first, on the engine."""
        options = req.options
        if req.ref_audio is not None:
            import soundfile as sf

            try:
                samples, rate = sf.read(io.BytesIO(req.ref_audio), dtype="float32", always_2d=False)
            except (RuntimeError, TypeError) as exc:  # libsndfile could not read it
                raise VoiceRequestError(f"ref_audio is not audio soundfile can read ({exc}); send wav, flac, "
                                        "ogg or mp3", param="ref_audio") from None
            voice = await engine.create_voice((samples, rate), req.ref_text, x_vector_only=req.x_vector_only)
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
                status = 400 if isinstance(exc, Qwen3TTSEdgeError | ValueError) else 500
                yield event({"type": "speech.audio.error", **error_body(status, str(exc) or type(exc).__name__,
                                                                         param_for(exc), type(exc).__name__)})
            finally:
                encoder.close()

    # ---- voices ------------------------------------------------------------------------------------------
    def list_voices(self) -> dict[str, Any]:
        return {"voices": self.catalog.listing(), "uploaded_voices": self.catalog.saved()}

    async def create_voice(self, request: Request) -> JSONResponse:
        if self.model_type != "base":
            raise ApiError(400, f"voices are cloned by Base bundles only; this is a {self.model_type} bundle "
                           "(its voices are the presets in GET /v1/audio/voices)", param="audio_sample")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_upload_bytes + 64 * 1024:
            raise ApiError(413, f"upload is larger than {_size(self.max_upload_bytes)}",
                           param="audio_sample")
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=self.max_upload_bytes)
        except Exception as exc:  # starlette's multipart errors (size, shape; starlette >= 0.40 takes max_part_size)
            if "maximum size" in str(exc):
                raise ApiError(413, f"audio_sample is larger than {_size(self.max_upload_bytes)}",
                               param="audio_sample") from None
            raise ApiError(400, f"could not read the multipart form: {exc}", param="audio_sample") from None
        try:
            name = form.get("name")
            if not isinstance(name, str) or not name:
                raise ApiError(400, "name is required (the new voice's id)", param="name")
            self.catalog.check_new_name(name)
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
            language = form.get("language") if isinstance(form.get("language"), str) else None
            x_only = str(form.get("x_vector_only_mode") or form.get("x_vector_only") or "").lower() in ("1", "true")
        finally:
            await form.close()
        if language:
            language = language_name(language, self.languages)
        suffix = os.path.splitext(getattr(upload, "filename", "") or "")[1][:8]
        fd, tmp = tempfile.mkstemp(prefix="qwen3-tts-edge-upload-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                with _pool_errors():
                    async with self.pool.checkout() as engine:
                        voice = await engine.create_voice(tmp, ref_text or None, x_vector_only=x_only,
                                                          language=language)
            except VoiceRequestError:
                raise
            except (Qwen3TTSEdgeError, ValueError, RuntimeError) as exc:
                raise ApiError(400, f"could not clone a voice from audio_sample: {exc}", param="audio_sample") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.catalog.create(name, voice)
        return JSONResponse({"id": name, "name": name, "object": "audio.voice", "type": "audio_sample",
                             "created_at": int(time.time()), "mode": voice.mode}, status_code=201)

    def delete_voice(self, name: str) -> dict[str, Any]:
        self.catalog.delete(name)
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


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
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
