"""Describe the machine a benchmark ran on and measure its memory bandwidth.

Autoregressive decoding at batch 1 is bound by how fast weights stream from memory, so every speed figure
is reported next to its bandwidth floor: bytes of weights read per frame / measured bandwidth.
"""

from __future__ import annotations

import time

import numpy as np

from ..runtime import machine as runtime_machine


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Sustained read bandwidth in GB/s: best of ``repeats`` full reductions over a buffer larger than cache.

    A sum reads every byte once (what a GEMV does with weights); the best run is the least disturbed one.
    """
    n = size_mb * 2**20 // 8
    buf = np.ones(n, dtype=np.float64)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def describe(threads: int | None = None, decoder_threads: int | None = None) -> dict:
    """The machine fields of a benchmark report (with llama.cpp's system-info line: which kernels ran) and the
    thread counts the run used: generation's (llama.cpp or ONNX Runtime) and the ONNX decoder's."""
    return {**runtime_machine.describe(), "threads_used": threads, "decoder_threads_used": decoder_threads}
