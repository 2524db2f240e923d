"""Mirror of bitpolar's ``kv_cache`` (TurboQuant): ``KvCacheConfig``, ``KvCacheCompressor``,
``MultiHeadKvCache`` and the ``TurboQuantError`` variants.

Compression is per-vector quantization, not eviction. Every key and value vector of a head is
rotated by a seeded Haar-random orthogonal matrix ``R``; each coordinate pair is kept as its
float32 radius and a ``bits``-bit code of its angle (PolarQuant); the part the polar code misses
(the residual) is sketched by ``projections`` Gaussian sign bits plus its L2 norm (QJL), which
corrects inner products without bias. Attention scores are estimated straight from the codes:

    score = (⟨polar_decode(code), R·q⟩ + ‖e‖·√(π/2)/m·Σ_p sign_p·(g_p·R·q)) / √d     (not softmaxed)

The matrices are drawn on the host (numpy's seeded ``Generator``) and uploaded once; encoding,
decoding and scoring run as the OpenCL kernels of ``kernels/turboquant.cl`` (launchers
:mod:`kvcl.ops.turboquant`, numpy twin and the full maths :mod:`kvcl.reference.turboquant`).
The codes live on the device, token-major ``[token][key|value][head]``: angle codes uint8
(bits ≤ 8) or uint16, radii float32 ``[.., head_dim/2]``, packed sign bytes ``[.., ⌈m/8⌉]``,
residual norms float32; the buffers grow by doubling.

Examples
--------
>>> import numpy as np
>>> from kvcl.bitpolar import KvCacheConfig, KvCacheCompressor
>>> cache = KvCacheCompressor(KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42))  # doctest: +SKIP
>>> cache.push(np.ones(8), np.ones(8)); cache.len()                                      # doctest: +SKIP
1
>>> cache.attention_scores(np.ones(8)).shape                                              # doctest: +SKIP
(1,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import DtypeError, InvalidArgument, KvclError, NonFiniteError, OutOfRangeError, ShapeError
from ..reference import turboquant as ref
from ..runtime import Device
from ..validate import is_device_array
from ._codes import DeviceCodes

__all__ = [
    "KvCacheConfig", "KvCacheCompressor", "MultiHeadKvCache", "TurboCodes",
    "TurboQuantError", "OddDimension", "ZeroDimension", "InvalidBitWidth", "ZeroProjections",
    "DimensionTooLarge", "DimensionMismatch", "EmptyInput", "NonFiniteInput",
    "DeserializationError", "IndexOutOfBounds", "MAX_HEAD_DIM", "MAX_PROJECTIONS",
]

#: Largest ``head_dim`` kvcl accepts (bitpolar: 131070, the compact format's 65535 pairs).
#: Each head keeps its d×d float32 rotation on the device (64 MiB at 4096) and the kernels'
#: dot products are sequential over d; real attention heads are ≤ 512.
MAX_HEAD_DIM = 4096
#: Largest ``projections`` (bitpolar's, the compact format's u16).
MAX_PROJECTIONS = 65535
_U64 = 2**64


# ---- errors ------------------------------------------------------------------------------------

class TurboQuantError(KvclError):
    """Base of bitpolar's ``TurboQuantError`` variants (each is also a kvcl / builtin error).

    Every variant is a subclass, reachable as a module attribute or as
    ``TurboQuantError.<Variant>``, and carries the Rust fields as attributes:

    ========================  =========================  ===========================
    variant                   attributes                 also a
    ========================  =========================  ===========================
    ``OddDimension``          ``dimension``              :class:`kvcl.InvalidArgument`
    ``ZeroDimension``         —                          :class:`kvcl.InvalidArgument`
    ``InvalidBitWidth``       ``bits``                   :class:`kvcl.InvalidArgument`
    ``ZeroProjections``       —                          :class:`kvcl.InvalidArgument`
    ``DimensionTooLarge``     ``dimension``, ``max``     :class:`kvcl.InvalidArgument`
    ``DimensionMismatch``     ``expected``, ``actual``   :class:`kvcl.ShapeError`
    ``EmptyInput``            ``message``                :class:`kvcl.InvalidArgument`
    ``NonFiniteInput``        ``index`` (+ kvcl's        :class:`kvcl.NonFiniteError`
                              ``head``, ``which``)
    ``DeserializationError``  ``reason``                 :class:`kvcl.InvalidArgument`
    ``IndexOutOfBounds``      ``index``, ``length``      :class:`kvcl.OutOfRangeError`
    ========================  =========================  ===========================

    All are ``ValueError`` except ``IndexOutOfBounds`` (``IndexError``). Messages are
    bitpolar's ``Display`` strings. kvcl raises the last two nowhere yet (bitpolar raises them
    from its serialization and windowed caches, which are not mirrored); they exist so that
    code matching on the full enum ports unchanged.

    Examples
    --------
    >>> try:
    ...     raise NonFiniteInput(2)
    ... except TurboQuantError.NonFiniteInput as exc:
    ...     exc.index
    2
    """


class OddDimension(TurboQuantError, InvalidArgument):
    """``head_dim`` is odd: coordinates are paired for the polar code."""

    def __init__(self, dimension: int):
        self.dimension = dimension
        super().__init__(f"dimension must be even, got {dimension}")


class ZeroDimension(TurboQuantError, InvalidArgument):
    """``head_dim`` is 0."""

    def __init__(self):
        super().__init__("dimension must be > 0")


class InvalidBitWidth(TurboQuantError, InvalidArgument):
    """``bits`` is outside 1..=16."""

    def __init__(self, bits: int):
        self.bits = bits
        super().__init__(f"bit width must be 1..=16, got {bits}")


class ZeroProjections(TurboQuantError, InvalidArgument):
    """``projections`` is 0."""

    def __init__(self):
        super().__init__("projections must be > 0")


class DimensionTooLarge(TurboQuantError, InvalidArgument):
    """``head_dim`` above :data:`MAX_HEAD_DIM` or ``projections`` above :data:`MAX_PROJECTIONS`."""

    def __init__(self, dimension: int, max: int):  # noqa: A002 - the Rust field's meaning
        self.dimension = dimension
        self.max = max
        super().__init__(f"dimension {dimension} too large (max {max})")


class DimensionMismatch(TurboQuantError, ShapeError):
    """A vector's length (or a per-head list's length) differs from what the cache holds."""

    def __init__(self, expected: int, actual: int):
        self.expected = expected
        self.actual = actual
        super().__init__(f"dimension mismatch: quantizer expects {expected}, got {actual}")


class EmptyInput(TurboQuantError, InvalidArgument):
    """An operation got nothing to work on (``MultiHeadKvCache`` with 0 heads)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"empty input: {message}")


class NonFiniteInput(TurboQuantError, NonFiniteError):
    """A vector holds NaN or ±Inf; ``index`` is the first such position *within that vector*.

    kvcl adds ``which`` (``"key"``, ``"value"`` or ``"query"``) and ``head`` (the head's index
    for :class:`MultiHeadKvCache`, else ``None``) to say which vector it was.
    """

    def __init__(self, index: int, *, which: "str | None" = None, head: "int | None" = None):
        self.index = index
        self.which = which
        self.head = head
        where = "" if which is None else f" ({which}" + ("" if head is None else f" of head {head}") + ")"
        super().__init__(f"input contains non-finite values (NaN or Inf) at index {index}{where}")


class DeserializationError(TurboQuantError, InvalidArgument):
    """Compact bytes could not be decoded (bitpolar's serialization; not mirrored)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"deserialization failed: {reason}")


class IndexOutOfBounds(TurboQuantError, OutOfRangeError):
    """An index past a collection's end."""

    def __init__(self, index: int, length: int):
        self.index = index
        self.length = length
        super().__init__(f"index {index} out of bounds (length {length})")


for _variant in (OddDimension, ZeroDimension, InvalidBitWidth, ZeroProjections, DimensionTooLarge,
                 DimensionMismatch, EmptyInput, NonFiniteInput, DeserializationError,
                 IndexOutOfBounds):
    setattr(TurboQuantError, _variant.__name__, _variant)
del _variant


# ---- configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class KvCacheConfig:
    """bitpolar's ``KvCacheConfig``: fully determines the quantizer. No defaults, as in Rust.

    Parameters
    ----------
    head_dim : int
        Length of each key / value / query vector; even, 2 .. :data:`MAX_HEAD_DIM`.
    bits : int
        Angle code width, 1..=16 (``2**bits`` angle levels per coordinate pair).
    projections : int
        QJL sign bits per vector, 1 .. :data:`MAX_PROJECTIONS`.
    seed : int
        0 .. 2**64 - 1; fixes the rotation and the projections (head ``h`` of a
        :class:`MultiHeadKvCache` uses ``seed + h`` modulo 2**64).

    The values are checked when a cache is built from the config (as bitpolar's
    ``KvCacheCompressor::new`` does), not here.

    Examples
    --------
    >>> KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42)
    KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42)
    """

    head_dim: int
    bits: int
    projections: int
    seed: int


def _plain_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DtypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_config(config: Any) -> KvCacheConfig:
    """bitpolar's checks in bitpolar's order (TurboQuantizer::new), plus Python's type checks."""
    if not isinstance(config, KvCacheConfig):
        raise DtypeError(f"config: expected a kvcl.bitpolar.KvCacheConfig, got {type(config).__name__}")
    head_dim = _plain_int("head_dim", config.head_dim)
    bits = _plain_int("bits", config.bits)
    projections = _plain_int("projections", config.projections)
    seed = _plain_int("seed", config.seed)
    if head_dim < 0:
        raise InvalidArgument(f"head_dim: expected a non-negative int, got {head_dim}")
    if projections < 0:
        raise InvalidArgument(f"projections: expected a non-negative int, got {projections}")
    if not 0 <= seed < _U64:
        raise InvalidArgument(f"seed: expected 0 <= seed < 2**64 (a u64), got {seed}")
    if head_dim == 0:
        raise ZeroDimension()
    if head_dim % 2:
        raise OddDimension(head_dim)
    if head_dim > MAX_HEAD_DIM:
        raise DimensionTooLarge(head_dim, MAX_HEAD_DIM)
    if not 1 <= bits <= 16:
        raise InvalidBitWidth(bits)
    if projections == 0:
        raise ZeroProjections()
    if projections > MAX_PROJECTIONS:
        raise DimensionTooLarge(projections, MAX_PROJECTIONS)
    return KvCacheConfig(head_dim, bits, projections, seed)


# ---- host input --------------------------------------------------------------------------------

def _as_vector(name: str, x: Any) -> np.ndarray:
    """A 1-D float32 copy of ``x`` (values past float32's range become ±Inf, as ``as f32``)."""
    if is_device_array(x):
        x = x.get()
    try:
        with np.errstate(over="ignore"):
            arr = np.array(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DtypeError(f"{name}: expected a vector of floats, got {type(x).__name__} ({exc})") from None
    if arr.ndim != 1:
        raise ShapeError(f"{name}: expected a 1-D vector, got shape {arr.shape}")
    return arr


def _first_non_finite(x: np.ndarray) -> "int | None":
    bad = np.flatnonzero(~np.isfinite(x))
    return int(bad[0]) if bad.size else None


def _check_pair(key: np.ndarray, value: np.ndarray, head_dim: int, head: "int | None") -> None:
    """bitpolar's order for one (key, value): finite key, finite value, key length, value length."""
    for which, x in (("key", key), ("value", value)):
        index = _first_non_finite(x)
        if index is not None:
            raise NonFiniteInput(index, which=which, head=head)
    for x in (key, value):
        if len(x) != head_dim:
            raise DimensionMismatch(head_dim, len(x))


def _check_query(query: np.ndarray, head_dim: int, head: "int | None") -> None:
    index = _first_non_finite(query)
    if index is not None:
        raise NonFiniteInput(index, which="query", head=head)
    if len(query) != head_dim:
        raise DimensionMismatch(head_dim, len(query))


def _per_head(name: str, rows: Any) -> list:
    if isinstance(rows, np.ndarray) and rows.ndim != 2:
        raise ShapeError(f"{name}: expected [num_heads][head_dim], got shape {rows.shape}")
    if is_device_array(rows):
        rows = rows.get()
    try:
        return list(rows)
    except TypeError:
        raise DtypeError(f"{name}: expected a sequence of per-head vectors, "
                         f"got {type(rows).__name__}") from None


# ---- codes read back (the device side is kvcl.bitpolar._codes) ------------------------------------

class TurboCodes(NamedTuple):
    """Stored codes read back from the device (bitpolar's ``TurboCode``, as arrays).

    Attributes
    ----------
    angle_indices : numpy.ndarray, uint8 (bits ≤ 8) or uint16, shape [n, head_dim/2]
    radii : numpy.ndarray, float32, shape [n, head_dim/2]
    signs : numpy.ndarray, uint8, shape [n, ⌈projections/8⌉]
        QJL sign bits, bit p of byte p // 8 (LSB first), 1 when ``g_p·residual ≥ 0``.
    norms : numpy.ndarray, float32, shape [n]
        The residuals' L2 norms.
    """

    angle_indices: np.ndarray
    radii: np.ndarray
    signs: np.ndarray
    norms: np.ndarray


def _code_bytes(config: KvCacheConfig) -> int:
    """bitpolar's ``TurboCode::size_bytes``: polar ``3d + 1`` (f32 radii, u16 angles, bits byte)
    plus QJL ``⌈m/8⌉ + 6`` (sign bytes, u16 projection count, f32 norm)."""
    return 3 * config.head_dim + 1 + ref.sign_bytes(config.projections) + 6


# ---- the mirrors -------------------------------------------------------------------------------

class KvCacheCompressor:
    """One head's TurboQuant-compressed KV cache on an OpenCL device (bitpolar ``KvCacheCompressor``).

    Mirrors ``bitpolar::kv_cache::KvCacheCompressor``: ``new``, ``push``, ``len``,
    ``is_empty``, ``attention_scores``, ``decode_values``, ``decode_keys``, ``key_codes``,
    ``value_codes``, ``compression_ratio``, ``clear``, with the same meanings. See the module
    docstring for the compression and :mod:`kvcl.reference.turboquant` for the exact maths.

    Parameters
    ----------
    config : KvCacheConfig
    device : kvcl.Device or str, optional
        Where the matrices and codes live; default :func:`kvcl.default_device`.

    Raises
    ------
    ZeroDimension, OddDimension, DimensionTooLarge, InvalidBitWidth, ZeroProjections
        In bitpolar's order (``head_dim`` checks, then ``bits``, then ``projections``).
    kvcl.DtypeError, kvcl.InvalidArgument
        A field that is not an int, negative, or a seed outside u64.
    kvcl.DeviceMemoryError
        The rotation (d²·4 bytes) or projection (m·d·4 bytes) matrix exceeds the device's
        largest allocation.

    Notes
    -----
    Deliberate differences from the Rust type:

    * **Random matrices**: numpy's ``default_rng([seed, 0])`` (rotation) and
      ``default_rng([seed, 1])`` (projections) instead of ChaCha8 seeded with ``seed`` and
      ``seed + 1``: same distributions, other numbers (bit-exactness with Rust's RNG is no
      goal). Two streams from one seed also avoid bitpolar's overlap, where head ``h``'s
      projections reuse head ``h + 1``'s rotation stream. The rotation's signs are fixed so
      ``diag(R_qr) > 0`` (exactly Haar); bitpolar instead flips the whole matrix by the sign
      of its determinant.
    * **Angle codebook**: Lloyd-Max for the distribution the normalised angle actually has,
      uniform on [-1, 1] after a Haar rotation: uniform cells, midpoint centroids. bitpolar
      applies a Lloyd-Max codebook computed for N(0, 1) to the same values, which leaves most of
      its levels outside [-1, 1] (at 4 bits only ~6 of 16 are usable). kvcl's scores are
      therefore closer to the exact ``q·k/√d`` than bitpolar's for the same ``bits``.
    * **Bad input raises, and changes nothing**: all checks run before any launch, in
      bitpolar's order (finite key, finite value, key length, value length). ``push`` also
      accepts lists and any float dtype (converted to float32, where values beyond its range
      become Inf and are refused), and raises :class:`kvcl.ShapeError` for input that is not
      1-D. ``attention_scores`` checks the query's length even when the cache is empty
      (bitpolar returns an empty vector without looking).
    * ``NonFiniteInput.index`` is the position within the vector that failed (the key is
      checked before the value), as in Rust; kvcl adds ``which`` ("key" / "value" / "query").
    * ``DimensionTooLarge``: ``head_dim`` above :data:`MAX_HEAD_DIM` = 4096 (bitpolar: 131070);
      ``projections`` above 65535 as in bitpolar.
    * Results are numpy float32 arrays (``attention_scores`` [n], ``decode_values`` [n, d]);
      ``key_codes`` / ``value_codes`` return :class:`TurboCodes` arrays, not ``Vec<TurboCode>``.
    * ``compression_ratio`` keeps bitpolar's accounting of its in-memory code (f32 radii, u16
      angles, ``3d + 1 + ⌈m/8⌉ + 6`` bytes per vector), not kvcl's device bytes, which are
      fewer for bits ≤ 8 (uint8 codes, no per-vector headers).
    * Not mirrored: ``evict_outside_window`` and the serde / compact-bytes serialization.
      Pushes and queries are serialised by a lock (Rust needs ``&mut self``).

    Examples
    --------
    >>> cfg = KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42)
    >>> cache = KvCacheCompressor.new(cfg)                               # doctest: +SKIP
    >>> cache.push(np.arange(8.0), -np.arange(8.0))                      # doctest: +SKIP
    >>> cache.len(), cache.decode_values().shape                         # doctest: +SKIP
    (1, (1, 8))
    >>> bool(cache.compression_ratio() > 0)                              # doctest: +SKIP
    True
    """

    def __init__(self, config: KvCacheConfig, *, device: Any = None):
        self._codes = DeviceCodes(1, _check_config(config), device)

    @classmethod
    def new(cls, config: KvCacheConfig, *, device: Any = None) -> "KvCacheCompressor":
        """Rust ``KvCacheCompressor::new``; the same as the constructor."""
        return cls(config, device=device)

    @property
    def config(self) -> KvCacheConfig:
        return self._codes.config

    @property
    def device(self) -> Device:
        return self._codes.device

    def push(self, key: Any, value: Any) -> None:
        """Compress and append one (key, value) pair.

        Parameters
        ----------
        key, value : array-like of float, shape [head_dim]

        Raises
        ------
        NonFiniteInput
            First NaN / Inf, in the key, else in the value (``index`` within that vector).
        DimensionMismatch
            A vector's length is not ``head_dim``.

        Examples
        --------
        >>> cache.push([0.5] * 8, [1.0] * 8); cache.len()                # doctest: +SKIP
        1
        """
        key, value = _as_vector("key", key), _as_vector("value", value)
        _check_pair(key, value, self.config.head_dim, None)
        with self._codes.lock:
            self._codes.push(np.stack([key, value])[:, None, :])

    def len(self) -> int:
        """Number of (key, value) pairs stored."""
        return self._codes.length

    def __len__(self) -> int:
        return self._codes.length

    def is_empty(self) -> bool:
        return self._codes.length == 0

    def attention_scores(self, query: Any) -> np.ndarray:
        """Estimated ``⟨k_t, q⟩ / √d`` for every stored key ``k_t`` (NOT softmaxed).

        Parameters
        ----------
        query : array-like of float, shape [head_dim]

        Returns
        -------
        numpy.ndarray, float32, shape [len]

        Raises
        ------
        NonFiniteInput, DimensionMismatch

        Examples
        --------
        >>> cache.attention_scores(np.ones(8)).shape                     # doctest: +SKIP
        (1,)
        """
        query = _as_vector("query", query)
        _check_query(query, self.config.head_dim, None)
        with self._codes.lock:
            return self._codes.scores(query[None])[0]

    def decode_values(self) -> np.ndarray:
        """Every stored value, approximately: ``Rᵀ·polar_decode`` (the residual sketch is unused).

        Returns
        -------
        numpy.ndarray, float32, shape [len, head_dim]
        """
        with self._codes.lock:
            return self._codes.decode(1)[:, 0]

    def decode_keys(self) -> np.ndarray:
        """Every stored key, approximately (as :meth:`decode_values`). float32 [len, head_dim]."""
        with self._codes.lock:
            return self._codes.decode(0)[:, 0]

    def key_codes(self) -> TurboCodes:
        """The stored key codes, read back from the device (arrays of ``len`` rows)."""
        with self._codes.lock:
            return TurboCodes(*(a[:, 0] for a in self._codes.read(0)))

    def value_codes(self) -> TurboCodes:
        """The stored value codes, read back from the device (arrays of ``len`` rows)."""
        with self._codes.lock:
            return TurboCodes(*(a[:, 0] for a in self._codes.read(1)))

    def compression_ratio(self) -> float:
        """Original bytes / compressed bytes over all stored keys and values (bitpolar's sizes).

        1.0 when empty, else ``(n·d·4) / Σ (3d + 1 + ⌈m/8⌉ + 6)`` over the ``n = 2·len``
        codes, which is the same for every ``len ≥ 1``.

        Examples
        --------
        >>> cache.compression_ratio()   # d=8, m=16: 32 / (25 + 2 + 6)    # doctest: +SKIP
        0.9696969696969697
        """
        codes = 2 * self._codes.length
        if codes == 0:
            return 1.0
        return (codes * self.config.head_dim * 4) / (codes * _code_bytes(self.config))

    def clear(self) -> None:
        """Drop every stored pair (the device buffers are kept for reuse)."""
        with self._codes.lock:
            self._codes.length = 0

    def __repr__(self) -> str:
        return f"<kvcl.bitpolar.KvCacheCompressor len={self.len()} {self.config}>"


class MultiHeadKvCache:
    """One :class:`KvCacheCompressor` per attention head, on one device (bitpolar ``MultiHeadKvCache``).

    Mirrors ``bitpolar::kv_cache::MultiHeadKvCache``: ``new``, ``push_token``,
    ``attention_scores``, ``len``, ``is_empty``, ``num_heads``, ``clear``. Head ``h`` uses
    ``config`` with ``seed + h`` (mod 2**64), as in Rust. All heads share one set of device
    buffers, so a token is encoded for every head in one pass and scores for every head come
    from one launch.

    Parameters
    ----------
    num_heads : int
        At least 1.
    config : KvCacheConfig
    device : kvcl.Device or str, optional

    Raises
    ------
    EmptyInput
        ``num_heads == 0``.
    ZeroDimension, OddDimension, DimensionTooLarge, InvalidBitWidth, ZeroProjections
        As :class:`KvCacheCompressor`.

    Notes
    -----
    Deliberate differences from the Rust type (besides those of :class:`KvCacheCompressor`):

    * **push_token is atomic.** Rust pushes head by head and returns at the first bad head,
      leaving the heads before it one token longer (``len`` then reports head 0's count).
      kvcl checks every head first, in the same order (count, then per head: finite key,
      finite value, key length, value length) and writes nothing unless all pass.
    * ``DimensionMismatch`` for a wrong number of per-head vectors reports the length of the
      list that is wrong (Rust always reports ``keys.len()``, even when ``values`` is wrong).
    * ``NonFiniteInput`` carries kvcl's ``head`` and ``which`` besides Rust's ``index``.
    * ``attention_scores`` returns one float32 array [num_heads, len] (Rust: ``Vec<Vec<f32>>``).
    * Not mirrored: ``head(index)`` (per-head compressor access); the codes of every head are
      readable as one array through the shared device buffers only.

    Examples
    --------
    >>> cfg = KvCacheConfig(head_dim=8, bits=4, projections=16, seed=42)
    >>> cache = MultiHeadKvCache.new(2, cfg)                             # doctest: +SKIP
    >>> cache.push_token(np.ones((2, 8)), np.ones((2, 8)))               # doctest: +SKIP
    >>> cache.attention_scores(np.ones((2, 8))).shape                    # doctest: +SKIP
    (2, 1)
    """

    def __init__(self, num_heads: int, config: KvCacheConfig, *, device: Any = None):
        num_heads = _plain_int("num_heads", num_heads)
        if num_heads < 0:
            raise InvalidArgument(f"num_heads: expected a non-negative int, got {num_heads}")
        if num_heads == 0:
            raise EmptyInput("num_heads must be > 0")
        self._codes = DeviceCodes(num_heads, _check_config(config), device)

    @classmethod
    def new(cls, num_heads: int, config: KvCacheConfig, *, device: Any = None) -> "MultiHeadKvCache":
        """Rust ``MultiHeadKvCache::new``; the same as the constructor."""
        return cls(num_heads, config, device=device)

    @property
    def config(self) -> KvCacheConfig:
        """The shared config (head ``h`` uses ``seed + h``)."""
        return self._codes.config

    @property
    def device(self) -> Device:
        return self._codes.device

    def num_heads(self) -> int:
        return self._codes.num_heads

    def push_token(self, keys: Any, values: Any) -> None:
        """Compress and append one token's key and value for every head.

        Parameters
        ----------
        keys, values : array-like of float, shape [num_heads][head_dim]
            A 2-D array or a sequence of per-head vectors.

        Raises
        ------
        DimensionMismatch
            ``expected=num_heads`` for a wrong number of vectors, ``expected=head_dim`` for a
            vector of the wrong length.
        NonFiniteInput
            ``index`` within the first bad vector; ``head`` and ``which`` say which one.

        Examples
        --------
        >>> cache.push_token([[1.0] * 8] * 2, [[2.0] * 8] * 2); cache.len()   # doctest: +SKIP
        1
        """
        heads, d = self._codes.num_heads, self.config.head_dim
        keys, values = _per_head("keys", keys), _per_head("values", values)
        for rows in (keys, values):
            if len(rows) != heads:
                raise DimensionMismatch(heads, len(rows))
        rows = np.empty((2, heads, d), np.float32)
        checked = []
        for h in range(heads):
            key = _as_vector(f"keys[{h}]", keys[h])
            value = _as_vector(f"values[{h}]", values[h])
            _check_pair(key, value, d, h)
            checked.append((key, value))
        for h, (key, value) in enumerate(checked):
            rows[0, h], rows[1, h] = key, value
        with self._codes.lock:
            self._codes.push(rows)

    def attention_scores(self, queries: Any) -> np.ndarray:
        """Estimated ``⟨k_t, q_h⟩ / √d`` for every head and stored token (NOT softmaxed).

        Parameters
        ----------
        queries : array-like of float, shape [num_heads][head_dim]

        Returns
        -------
        numpy.ndarray, float32, shape [num_heads, len]

        Raises
        ------
        DimensionMismatch, NonFiniteInput
        """
        heads, d = self._codes.num_heads, self.config.head_dim
        queries = _per_head("queries", queries)
        if len(queries) != heads:
            raise DimensionMismatch(heads, len(queries))
        rows = np.empty((heads, d), np.float32)
        for h in range(heads):
            query = _as_vector(f"queries[{h}]", queries[h])
            _check_query(query, d, h)
            rows[h] = query
        with self._codes.lock:
            return self._codes.scores(rows)

    def len(self) -> int:
        """Number of tokens stored."""
        return self._codes.length

    def __len__(self) -> int:
        return self._codes.length

    def is_empty(self) -> bool:
        return self._codes.length == 0

    def clear(self) -> None:
        """Drop every token of every head (the device buffers are kept for reuse)."""
        with self._codes.lock:
            self._codes.length = 0

    def __repr__(self) -> str:
        return (f"<kvcl.bitpolar.MultiHeadKvCache num_heads={self.num_heads()} len={self.len()} "
                f"{self.config}>")
