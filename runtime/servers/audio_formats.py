"""Float PCM chunks in, bytes of a response format out, chunk by chunk.

What streams and what cannot (measured with soundfile / libsndfile 1.2):

- ``pcm``: raw 16-bit little-endian mono at 24 kHz, each chunk as it is made.
- ``wav``: a RIFF header whose sizes say "unknown" (0xFFFFFFFF), then the samples as they are made.
- ``opus``: Ogg/Opus through libsndfile; it streams, in Ogg pages (libogg flushes about once a second of audio).
- ``flac`` and ``mp3``: written whole. libsndfile seeks back at the end to fill in the FLAC STREAMINFO (length,
  MD5) and the LAME tag of the MP3; a stream without them is legal but many readers (libsndfile among them)
  then misread the length and stop early. So these two are sent when the utterance is complete; ask for
  ``pcm``, ``wav`` or ``opus`` when the first byte should come early.
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np

from ..audio import to_s16le

FORMATS = ("mp3", "opus", "flac", "wav", "pcm")
CONTENT_TYPES = {"pcm": "audio/pcm", "wav": "audio/wav", "flac": "audio/flac", "opus": "audio/ogg; codecs=opus",
                 "mp3": "audio/mpeg"}
STREAMED = frozenset({"pcm", "wav", "opus"})  # the others are sent once the utterance is complete
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "opus": ("OGG", "OPUS"), "mp3": ("MP3", "MPEG_LAYER_III")}


class UnsupportedFormat(ValueError):
    """A response format this server cannot write (the message lists the supported ones)."""


def wav_header(sample_rate: int, channels: int = 1, bits: int = 16, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM WAV header; without ``data_bytes`` the sizes are 0xFFFFFFFF (length unknown: streaming)."""
    block = channels * bits // 8
    data = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels,
            sample_rate, sample_rate * block, block, bits) + b"data" + struct.pack("<I", data))


class _Sink:
    """A seekable in-memory file for libsndfile; ``take()`` hands over the bytes written since the last take."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def write(self, data) -> int:
        data = bytes(data)
        end = self.pos + len(data)
        if end > len(self.buf):
            self.buf.extend(b"\0" * (end - len(self.buf)))
        self.buf[self.pos:end] = data
        self.pos = end
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else len(self.buf) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        out = bytes(self.buf[self.pos:] if n < 0 else self.buf[self.pos:self.pos + n])
        self.pos += len(out)
        return out


class Encoder:
    """Encode one utterance: ``write(pcm)`` returns the bytes ready now, ``finish()`` the rest."""

    def __init__(self, fmt: str, sample_rate: int):
        if fmt not in FORMATS:
            raise UnsupportedFormat(f"response_format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
        self.format, self.sample_rate = fmt, sample_rate
        self.content_type = CONTENT_TYPES[fmt]
        self.streamed = fmt in STREAMED
        self._started = False
        self._sink: _Sink | None = None
        self._file = None
        self._sent = 0
        if fmt in _SOUNDFILE:
            import soundfile as sf

            container, subtype = _SOUNDFILE[fmt]
            self._sink = _Sink()
            self._file = sf.SoundFile(self._sink, "w", samplerate=sample_rate, channels=1, format=container,
                                      subtype=subtype)

    def _take(self) -> bytes:
        if not self.streamed or self._sink is None:
            return b""
        out = bytes(self._sink.buf[self._sent:])
        self._sent = len(self._sink.buf)
        return out

    def write(self, pcm: np.ndarray) -> bytes:
        if self._file is not None:
            if len(pcm):
                self._file.write(np.asarray(pcm, np.float32))
            return self._take()
        head = b""
        if not self._started and self.format == "wav":
            head = wav_header(self.sample_rate)
        self._started = True
        return head + to_s16le(pcm)

    def finish(self) -> bytes:
        if self._file is None or self._sink is None:
            started, self._started = self._started, True
            return wav_header(self.sample_rate) if self.format == "wav" and not started else b""
        self._file.close()
        out = bytes(self._sink.buf[self._sent:])
        self._sent = len(self._sink.buf)
        return out

    def close(self) -> None:
        """Drop an unfinished encoder (the request was cancelled)."""
        if self._file is not None and not self._file.closed:
            with contextlib.suppress(RuntimeError):
                self._file.close()
