"""Prompt-prefix reuse: keep the previous prompt's KV and prefill only the positions that changed.

The prompt's voice part (role, codec tags, speaker/instruct) is identical across segments and requests, so
its KV positions are kept and only the new positions are prefilled. Works with any talker backend that can
``rewind`` and ``extend`` (see ``runtime/backends``). Torch-free.
"""

from __future__ import annotations

import numpy as np


class PrefixReusingTalker:
    """Talker wrapper that keeps the previous prompt's KV and reuses its longest common prefix.

    Prompts for the same voice differ only after the voice part (streaming-text layout: only in the last
    position), so a repeat request prefills one position instead of the whole prompt.
    """

    def __init__(self, talker):
        self.inner = talker
        self._last: np.ndarray | None = None
        self.reused_positions = 0
        self.prefilled_positions = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def reset(self) -> None:
        """The KV is kept on purpose; ``prefill`` decides what can be reused."""

    def forget(self) -> None:
        self._last = None
        self.inner.reset()

    def prefill(self, embeds: np.ndarray):
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        n = 0
        if self._last is not None:
            m = min(len(self._last), len(embeds) - 1)  # at least one new position must run to get outputs
            same = np.all(self._last[:m] == embeds[:m], axis=1)
            n = int(m if same.all() else np.argmin(same))
        self._last = None  # if the prefill fails midway, nothing is trusted next time
        if n > 0 and self.inner.n_past >= n:
            self.inner.rewind(n)
            out = self.inner.extend(embeds[n:])
        else:
            n = 0
            out = self.inner.prefill(embeds)
        self._last = embeds.copy()
        self.reused_positions, self.prefilled_positions = n, len(embeds) - n
        return out

    def step(self, embed: np.ndarray):
        return self.inner.step(embed)
