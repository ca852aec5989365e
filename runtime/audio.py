"""Where audio goes: files (written atomically), raw s16le PCM on a stream, or the sound card.

Sinks take float32 mono chunks as they arrive. A file is written to a temporary sibling and renamed only
when complete, so a failed or cancelled run never leaves half a file; playback imports sounddevice lazily
and explains what is missing (PortAudio, an output device) instead of failing deep inside.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import Qwen3TTSEdgeError
from .files import atomic_temp

FILE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


class AudioError(Qwen3TTSEdgeError):
    """An output cannot be opened or written; the message says why."""


def to_s16le(pcm: np.ndarray) -> bytes:
    """Float PCM in [-1, 1] -> little-endian signed 16-bit bytes."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class FileSink:
    """Streams chunks into a .wav/.flac/.ogg file that appears only when ``close()`` succeeds."""

    def __init__(self, path: Path, sample_rate: int):
        import soundfile as sf

        self.path = Path(path)
        fmt = FILE_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise AudioError(f"cannot write {self.path.name}: use one of {', '.join(FILE_FORMATS)}")
        if not self.path.parent.is_dir():
            raise AudioError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        fd, tmp = atomic_temp(self.path, suffix=self.path.suffix)
        os.close(fd)
        self._tmp = Path(tmp)
        self._file = sf.SoundFile(tmp, "w", samplerate=sample_rate, channels=1, format=fmt[0], subtype=fmt[1])

    def write(self, pcm: np.ndarray) -> None:
        self._file.write(np.asarray(pcm, dtype=np.float32))

    def close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


class RawSink:
    """s16le mono PCM on a binary stream (stdout by default), e.g. piped into ``aplay -f S16_LE -r 24000``."""

    def __init__(self, stream: BinaryIO | None = None):
        self.stream = stream if stream is not None else sys.stdout.buffer

    def write(self, pcm: np.ndarray) -> None:
        self.stream.write(to_s16le(pcm))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # e.g. the reader closed the pipe
            self.stream.flush()


class PlaybackSink:
    """Plays chunks through sounddevice from a bounded queue, so a slow consumer applies back-pressure."""

    def __init__(self, sample_rate: int, max_queued_chunks: int = 64, device: int | str | None = None):
        try:
            import sounddevice as sd
        except (ImportError, OSError) as exc:
            raise AudioError(f"--play needs sounddevice and the PortAudio library ({exc}); install "
                             "'qwen3-tts-edge[audio]' and libportaudio2, or write a file with -o") from exc
        try:
            sd.query_devices(device, kind="output")
        except Exception as exc:
            raise AudioError(f"no audio output device available ({exc}); write a file with -o instead") from exc
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=max_queued_chunks)
        self._stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32", device=device)
        self._stream.start()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._play, daemon=True)
        self._thread.start()

    def _play(self) -> None:
        try:
            while (chunk := self._queue.get()) is not None:
                self._stream.write(chunk.reshape(-1, 1))
        except BaseException as exc:  # reported on the caller's thread
            self._error = exc

    def write(self, pcm: np.ndarray) -> None:
        if self._error:
            raise AudioError(f"playback failed: {self._error}")
        self._queue.put(np.asarray(pcm, dtype=np.float32))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._stream.stop()
        self._stream.close()
        if self._error:
            raise AudioError(f"playback failed: {self._error}")

    def abort(self) -> None:
        self._stream.abort()
        self._stream.close()
