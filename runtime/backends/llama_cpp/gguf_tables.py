"""Host-side tensors of a GGUF, memory-mapped: the talker's embedding rows, the predictor's residual tables.

The runtime looks up input embeddings on the host (the talker and predictor are fed float vectors), so it
reads those tensors straight from the GGUF files that llama.cpp also loads. Errors are :class:`LlamaError`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from .bindings import LlamaError


class GGUFTables:
    """Read-only tensors and metadata of a GGUF file, memory-mapped.

    The header is parsed here (gguf-py's ``GGUFReader`` builds a numpy object per vocabulary entry, slow on a
    talker GGUF with 155k tokens + 151k merges: bench/README); large arrays are skipped, not decoded. Shapes are
    numpy order (rows, cols), the reverse of GGUF's ``ne``. Rows of any ggml type come back as float32 (F32 as
    is, F16 upcast, others through gguf-py's dequantizer).
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
    _ARRAY_KEEP = 4096  # arrays up to this many elements are decoded (suppress lists, rope sections, ...)

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.fields: dict[str, Any] = {}
        self.field_offsets: dict[str, tuple[int, str]] = {}  # scalar key -> (file offset, struct format)
        self._tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}  # name -> (ne, ggml type, offset)
        self._parse()

    def _parse(self) -> None:
        import struct

        buf = memoryview(self._mm)
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            v = bytes(buf[pos:pos + n]).decode("utf-8", "replace")
            pos += n
            return v

        def skip_strings(count: int) -> None:
            nonlocal pos
            for _ in range(count):
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]

        if bytes(buf[:4]) != b"GGUF":
            raise LlamaError(f"{self.path} is not a GGUF file")
        pos = 4
        version = take("<I")
        if version < 2:
            raise LlamaError(f"{self.path}: GGUF version {version} is not supported")
        n_tensors, n_kv = take("<Q"), take("<Q")
        for _ in range(n_kv):
            key = string()
            vtype = take("<I")
            if vtype in self._SCALARS:
                self.field_offsets[key] = (pos, self._SCALARS[vtype])
                self.fields[key] = take(self._SCALARS[vtype])
            elif vtype == 8:
                self.fields[key] = string()
            elif vtype == 9:
                etype, count = take("<I"), take("<Q")
                if etype == 8:
                    if count <= self._ARRAY_KEEP:
                        self.fields[key] = [string() for _ in range(count)]
                    else:
                        skip_strings(count)
                        self.fields[key] = None
                elif etype in self._SCALARS:
                    fmt = self._SCALARS[etype]
                    size = struct.calcsize(fmt)
                    if count <= self._ARRAY_KEEP:
                        self.fields[key] = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
                    else:
                        self.fields[key] = None
                    pos += size * count
                else:
                    raise LlamaError(f"{self.path}: nested arrays in {key!r} are not supported")
            else:
                raise LlamaError(f"{self.path}: unknown GGUF value type {vtype} for {key!r}")
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            ne = tuple(take("<Q") for _ in range(n_dims))
            ttype, offset = take("<I"), take("<Q")
            infos.append((name, ne, ttype, offset))
        align = int(self.fields.get("general.alignment") or 32)
        data_start = (pos + align - 1) // align * align
        self._tensors = {name: (ne, ttype, data_start + off) for name, ne, ttype, off in infos}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def field(self, key: str) -> Any:
        return self.fields.get(key)

    def _info(self, name: str) -> tuple[tuple[int, ...], int, int]:
        try:
            return self._tensors[name]
        except KeyError:
            raise LlamaError(f"{self.path.name} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._info(name)[0]))

    def type_name(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self._info(name)[1]).name

    def type_counts(self) -> dict[str, int]:
        from gguf import GGMLQuantizationType

        counts: dict[str, int] = {}
        for _ne, ttype, _off in self._tensors.values():
            key = GGMLQuantizationType(ttype).name
            counts[key] = counts.get(key, 0) + 1
        return counts

    def raw(self, name: str) -> np.ndarray:
        """The stored data: (rows, cols) float32/float16 for F32/F16, (rows, bytes per row) uint8 otherwise."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        ne, ttype, off = self._info(name)
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        if ttype == 0:
            return np.ndarray((rows, ne[0]), dtype=np.float32, buffer=self._mm, offset=off)
        if ttype == 1:
            return np.ndarray((rows, ne[0]), dtype=np.float16, buffer=self._mm, offset=off)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        return np.ndarray((rows, ne[0] // block * size), dtype=np.uint8, buffer=self._mm, offset=off)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a 2-D tensor as float32 (n, cols)."""
        return self._to_f32(name, self.raw(name)[np.asarray(ids, dtype=np.int64)])

    def array(self, name: str) -> np.ndarray:
        """The whole tensor as a float32 array (a copy; use for weights used every call)."""
        return np.ascontiguousarray(self._to_f32(name, self.raw(name))).reshape(self.shape(name))

    def _to_f32(self, name: str, raw: np.ndarray) -> np.ndarray:
        if raw.dtype == np.float32:
            return np.array(raw, dtype=np.float32)
        if raw.dtype == np.float16:
            return raw.astype(np.float32)
        from gguf import GGMLQuantizationType, quants

        qtype = GGMLQuantizationType(self._info(name)[1])
        return quants.dequantize(np.asarray(raw), qtype).astype(np.float32, copy=False)

    def close(self) -> None:
        self._tensors = {}
        mm = getattr(self, "_mm", None)
        self._mm = None
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            with contextlib.suppress(BufferError, ValueError):  # still-referenced views keep it open
                mm._mmap.close()
