"""Choosing the next token from logits: greedy, temperature, top-k and top-p (numpy only).

Used by the lockstep :class:`kvcl.onnx.Generator` and by :class:`kvcl.scheduler.Scheduler`
(one :class:`SamplingParams` per request). Greedy is ``temperature == 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidArgument

__all__ = ["SamplingParams", "sample", "check_sampling"]


def check_sampling(temperature: Any, top_k: Any = None, top_p: Any = 1.0, *, greedy_ok: bool = True) -> None:
    """Refuse bad sampling options (before anything runs), naming the argument."""
    low = 0 if greedy_ok else 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < low or (not greedy_ok and temperature == 0):
        want = "a finite float >= 0 (0: greedy)" if greedy_ok else "a finite float > 0"
        raise InvalidArgument(f"temperature: expected {want}, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InvalidArgument(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise InvalidArgument(f"top_p: expected a float in (0, 1], got {top_p!r}")


@dataclass
class SamplingParams:
    """How one request picks its tokens.

    Parameters
    ----------
    temperature : float
        0 picks the most likely token (greedy, deterministic); > 0 samples from
        ``softmax(logits / temperature)``.
    top_k : int or None
        Sample among the ``top_k`` most likely tokens only.
    top_p : float
        Sample among the smallest set of tokens whose probability reaches ``top_p`` (nucleus).
    seed : int or None
        Seeds this request's own generator (reproducible sampling whatever else is batched).
    """

    temperature: float = 0.0
    top_k: "int | None" = None
    top_p: float = 1.0
    seed: "int | None" = None
    rng: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise InvalidArgument(f"seed: expected None or an int, got {self.seed!r}")
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, params: SamplingParams) -> int:
    """The next token of one row of ``logits`` [vocab]."""
    if params.greedy:
        return int(np.argmax(logits))
    z = np.asarray(logits, np.float64) / params.temperature
    if params.top_k is not None and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(csum, params.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(params.rng.choice(p.shape[-1], p=p))
