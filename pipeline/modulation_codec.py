"""Compact codecs for a stored modulation φ (T × D float16, 55,296 bytes at T=48, D=576): encode to a few numpy
arrays (the bytes a store would keep per window) and decode back to float16 states the readout reads.

- ``fp16``: the modulation as it is stored today (T·D·2 bytes);
- ``int8``: symmetric per-channel absmax: one float16 scale per hidden dimension (over the window's T tokens) and
  int8 codes, T·D + 2·D bytes; every state is off by at most half its channel's scale;
- ``int4``: the same per channel, 4-bit codes (-7..7) packed two to a byte: T·D/2 + 2·D + 4 bytes (the shape);
- ``int4z``: 4-bit codes 0..15 per channel with a float16 scale and a 4-bit zero point (the code of 0.0), so a
  channel's 16 levels span its own [min, max] (with 0 inside) instead of a symmetric ±absmax: stored states are not
  centred (a channel's mean is about a tenth of its absmax), and this cuts the state error by about a quarter at
  T·D/2 + 2·D + D/2 + 4 bytes (15,268 at T=48, D=576);
- ``int4zw``: ``int4z`` with each window's 28 widest channels (of those a 4-bit grid does not already hold exactly) in
  8 bits: the int8 code's high nibble sits in the channel's 4-bit slot, its low nibble and the channel's index are
  stored beside. The widest channels carry most of int4z's error (error ∝ a channel's range), so this cuts the state
  error by a fifth again for T·K/2 + 2·K bytes more (15,996 at T=48, D=576, K=28);
- ``pca{r}-int8``: the states projected on r principal directions (a :class:`PcaBasis` fitted once per checkpoint on
  modulations of *training* documents, stored beside the checkpoint, not per window), the r coefficients then int8
  per channel: T·r + 2·r bytes. The readout is linear in a state, so what a projection loses is exactly the part of
  the state off the basis;
- ``tokens{t}[-<inner>]``: keep t of the T tokens (the t the checkpoint's token selector scores highest, in stored
  order; without the selector's weights the first t), each kept token coded by ``inner`` (default fp16).

Decoding gives (T', D) with T' = t for the token codecs: a store pads with zero states to the checkpoint's T, as a
window shorter than T already is. numpy only (no torch): the record stays light, like :mod:`pipeline.modulation`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Parts = dict[str, np.ndarray]  # what a codec stores per window: named arrays; their bytes are the window's cost

_INT8_MAX = 127
_INT4_MAX = 7


def nbytes(parts: Parts) -> int:
    """The bytes a window's parts take (raw array bytes, no container overhead)."""
    return int(sum(a.nbytes for a in parts.values()))


def _check(tokens: np.ndarray, dim: int | None = None) -> np.ndarray:
    if tokens.ndim != 2:
        raise ValueError(f"modulation tokens: expected (T, D), got shape {tokens.shape}")
    if dim is not None and tokens.shape[1] != dim:
        raise ValueError(f"modulation of width D={tokens.shape[1]}, but this codec was fitted on D={dim}: "
                         "its basis belongs to another checkpoint/LM")
    return tokens


def _fp16_scale(absmax: np.ndarray, qmax: int = _INT8_MAX) -> np.ndarray:
    """Per-channel scales in float16 with scale·qmax ≥ absmax (rounded up where float16 rounding went below)."""
    want = absmax.astype(np.float32) / qmax
    s = want.astype(np.float16)
    low = s.astype(np.float32) * qmax < absmax
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def quantize_int8(x: np.ndarray, qmax: int = _INT8_MAX) -> tuple[np.ndarray, np.ndarray]:
    """(T, C) floats → int8 codes (T, C) and float16 scales (C,), symmetric per channel (column): code =
    round(x / scale) with scale = absmax / qmax (127; 7 for 4-bit codes), so |x - code·scale| ≤ scale / 2. An
    all-zero channel gets scale 0.

    Idempotent on its own output: float16 states that a decode produced (code·scale rounded to float16) are coded
    again to states that decode to exactly the same float16 values (the scale of each such channel is found again
    among its float16 neighbours), so an export → import → export of a compact store is bit-exact."""
    x32 = x.astype(np.float32)
    scale = _fp16_scale(np.abs(x32).max(0) if len(x32) else np.zeros(x32.shape[1], np.float32), qmax)

    def codes_for(v: np.ndarray, s: np.ndarray) -> np.ndarray:
        s32 = s.astype(np.float32)
        q = np.divide(v, s32, out=np.zeros_like(v), where=s32 > 0)
        return np.clip(np.rint(q), -qmax, qmax).astype(np.int8)

    def reproduces(rows: slice | np.ndarray, cols: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Per column: do these scales code x[rows, cols] back to exactly the same float16 values?"""
        return (dequantize_int8(codes_for(x32[rows][:, cols], s), s).astype(np.float16) == x[rows][:, cols]).all(0)

    codes = codes_for(x32, scale)
    if x.dtype == np.float16 and len(x):
        bits = scale.view(np.uint16).astype(np.int32)
        near = bits + np.array([0, -1, 1, -2, 2])[:, None]  # (5, C): the scale, then its float16 neighbours
        cands = np.where((scale > 0) & (near > 0) & (near < 0x7C00), near, bits).astype(np.uint16).view(np.float16)
        head = np.stack([dequantize_int8(codes_for(x32[:4], c), c) for c in cands]).astype(np.float16)  # (5, ≤4, C)
        todo = (head == x[None, :4]).all(1).any(0)  # (C,) a cheap screen, all candidates at once: fresh states fail
        for cand in cands:  # in order: the first candidate that reproduces a channel is its scale
            if not todo.any():
                break
            cols = np.flatnonzero(todo)
            cols = cols[reproduces(slice(0, 4), cols, cand[cols])]
            cols = cols[reproduces(slice(None), cols, cand[cols])] if len(cols) else cols
            scale[cols], todo[cols] = cand[cols], False
            codes[:, cols] = codes_for(x32[:, cols], cand[cols])
    return codes, scale


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int8 codes in -7..7, (T, C) → uint8 (T·C/2 rounded up,): two 4-bit two's-complement nibbles per byte."""
    flat = (codes.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], signed: bool = True) -> np.ndarray:
    """The inverse of :func:`pack_int4`: int8 codes of ``shape`` (-8..7; with ``signed=False``, 0..15, which
    :func:`pack_int4` packs unchanged)."""
    nib = np.stack([packed & 0xF, packed >> 4], 1).reshape(-1)[: int(np.prod(shape))].astype(np.int8)
    return (np.where(nib > 7, nib - 16, nib) if signed else nib).astype(np.int8).reshape(shape)


_UINT4_MAX = 15


def dequantize_uint4z(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The inverse of :func:`quantize_uint4z`, float32: (code - zero) · scale per channel."""
    return (codes.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)


def quantize_uint4z(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, C) floats → codes (T, C) uint8 in 0..15, float16 scales (C,) and zero points (C,) uint8 in 0..15, per
    channel (column): the range [min(x, 0), max(x, 0)] is cut in 15 steps of ``scale`` (rounded up to float16), the
    zero point is the code nearest 0.0, and code = clip(round(x / scale) + zero, 0, 15). So 0.0 decodes exactly, and
    every state is off by at most half its channel's scale (where rounding the zero point moved the grid by up to half
    a step, the clipped end is still within half a step). An all-zero channel gets scale 0.

    Idempotent on its own output, as :func:`quantize_int8` is: a channel of decoded float16 states (at most 16
    distinct values) is coded again with the scale and zero point that reproduce it bit for bit (its grid may span
    fewer than 16 levels, so the scale is searched as its range / k, k = 15..1, and float16 neighbours)."""
    return _uint4z(x)[:3]


def _uint4z(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`quantize_uint4z`, then which channels (C,) bool its codes reproduce bit for bit (float16 channels of at
    most 16 values on a grid the search found; a channel of more values never is) and each channel's range (C,)
    float32, max(x, 0) - min(x, 0)."""
    x32 = x.astype(np.float32)
    c = x32.shape[1]
    lo = np.minimum(x32.min(0), 0) if len(x32) else np.zeros(c, np.float32)
    hi = np.maximum(x32.max(0), 0) if len(x32) else np.zeros(c, np.float32)

    def fit(scale: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s32 = scale.astype(np.float32)
        z = np.clip(np.rint(np.divide(-lo[cols], s32, out=np.zeros_like(s32), where=s32 > 0)), 0, _UINT4_MAX)
        q = np.divide(x32[:, cols], s32, out=np.zeros((len(x32), len(cols)), np.float32), where=s32 > 0)
        return np.clip(np.rint(q) + z, 0, _UINT4_MAX).astype(np.uint8), z.astype(np.uint8)

    every = np.arange(c)
    scale = _fp16_scale(hi - lo, _UINT4_MAX)
    codes, zero = fit(scale, every)
    exact = np.zeros(c, bool)
    if x.dtype == np.float16 and len(x):
        srt = np.sort(x, 0)
        grid = np.flatnonzero(((srt[1:] != srt[:-1]).sum(0) + 1 <= _UINT4_MAX + 1) & (hi > lo))  # ≤ 16 values
        for k in range(_UINT4_MAX, 0, -1):
            if not len(grid):
                break
            base = _fp16_scale((hi[grid] - lo[grid]) * (_UINT4_MAX / k), _UINT4_MAX)  # range / k, in float16
            for step in (0, -1, 1, -2, 2):
                if not len(grid):
                    break
                near = base.view(np.uint16).astype(np.int32) + step
                cand = np.where((near > 0) & (near < 0x7C00), near, base.view(np.uint16)).astype(
                    np.uint16).view(np.float16)
                q, z = fit(cand, grid)
                ok = (dequantize_uint4z(q, cand, z).astype(np.float16) == x[:, grid]).all(0)
                scale[grid[ok]], codes[:, grid[ok]], zero[grid[ok]], exact[grid[ok]] = cand[ok], q[:, ok], z[ok], True
                grid, base = grid[~ok], base[~ok]
    return codes, scale, zero, exact, hi - lo


WIDE = 28  # int4zw: channels per window in 8 bits, the most that keeps a window (T=48, D=576) within 16,000 bytes


def quantize_int4zw(x: np.ndarray, wide: int = WIDE) -> tuple[np.ndarray, ...]:
    """(T, C) floats → ``int4z`` with up to ``wide`` channels in 8 bits: codes (T, C) uint8 0..15, float16 scales
    (C,), zero points (C,) uint8 0..15, low nibbles (T, wide) uint8 0..15 and channels (wide,) uint16 (C: unused).

    The 8-bit channels are the widest (by the range int4z would cut in 15 steps) among those whose values a 4-bit grid
    does not already reproduce exactly; each is coded by :func:`quantize_int8`, its code + 128 split in a high nibble
    (in the channel's 4-bit slot of ``codes``) and a low one, its zero point 0. Decoded states are within half a
    scale, as for int4z and int8.

    Idempotent on its own output: in decoded states the 4-bit channels are exact on their grids (int4z's property), so
    only the 8-bit channels remain candidates, and int8 codes its own output to the same bits; a freshly encoded window
    has no channel on an exact 4-bit grid except degenerate ones (constant, or a window of a token or two), which cost
    nothing in 4 bits."""
    t, c = x.shape
    codes, scale, zero, exact, width = _uint4z(x)
    candidates = np.flatnonzero(~exact & (width > 0))
    chosen = np.sort(candidates[np.argsort(-width[candidates], kind="stable")[:wide]])  # (k ≤ wide,)
    channels = np.full(wide, c, np.uint16)
    channels[: len(chosen)] = chosen
    low = np.zeros((t, wide), np.uint8)
    if len(chosen):
        q8, s8 = quantize_int8(x[:, chosen])  # (T, k) int8, (k,) float16
        u = (q8.astype(np.int16) + 128).astype(np.uint8)
        codes[:, chosen], low[:, : len(chosen)] = u >> 4, u & 0xF
        scale[chosen], zero[chosen] = s8, 0
    return codes, scale, zero, low, channels


def dequantize_int4zw(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, low: np.ndarray,
                      channels: np.ndarray) -> np.ndarray:
    """The inverse of :func:`quantize_int4zw`, float32 (T, C)."""
    y = dequantize_uint4z(codes, scale, zero)
    chosen = channels[channels < codes.shape[1]].astype(np.int64)
    if len(chosen):
        u = (codes[:, chosen].astype(np.int16) << 4) | low[:, : len(chosen)]  # (T, k) the int8 codes + 128
        y[:, chosen] = (u - 128).astype(np.float32) * scale[chosen].astype(np.float32)
    return y


def dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of :func:`quantize_int8`, float32."""
    return codes.astype(np.float32) * scale.astype(np.float32)


class Codec:
    """A modulation codec: ``encode`` (T, D) → parts, ``decode`` parts → (T', D) float16, ``bytes_per_window``."""

    name: str

    def encode(self, tokens: np.ndarray) -> Parts:
        raise NotImplementedError

    def decode(self, parts: Parts) -> np.ndarray:
        raise NotImplementedError

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        """Exact bytes of one window's parts for a (num_tokens, dim) modulation."""
        raise NotImplementedError

    def round_trip(self, tokens: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(tokens))


class Fp16(Codec):
    """The modulation as stored today."""

    name = "fp16"

    def encode(self, tokens: np.ndarray) -> Parts:
        return {"tokens": _check(tokens).astype(np.float16)}

    def decode(self, parts: Parts) -> np.ndarray:
        return parts["tokens"].astype(np.float16)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        return num_tokens * dim * 2


class Int8(Codec):
    """Symmetric per-channel (per hidden dimension) absmax int8: T·D int8 codes + D float16 scales."""

    name = "int8"

    def encode(self, tokens: np.ndarray) -> Parts:
        codes, scale = quantize_int8(_check(tokens))
        return {"codes": codes, "scale": scale}

    def decode(self, parts: Parts) -> np.ndarray:
        return dequantize_int8(parts["codes"], parts["scale"]).astype(np.float16)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        return num_tokens * dim + 2 * dim


class Int4(Codec):
    """Symmetric per-channel absmax with 4-bit codes (-7..7), two per byte: T·D/2 + 2·D bytes (the token count is
    the window's T, known to the store)."""

    name = "int4"

    def encode(self, tokens: np.ndarray) -> Parts:
        codes, scale = quantize_int8(_check(tokens), _INT4_MAX)
        return {"codes": pack_int4(codes), "scale": scale, "shape": np.array(codes.shape, np.uint16)}

    def decode(self, parts: Parts) -> np.ndarray:
        t, d = (int(v) for v in parts["shape"])
        return dequantize_int8(unpack_int4(parts["codes"], (t, d)), parts["scale"]).astype(np.float16)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        return (num_tokens * dim + 1) // 2 + 2 * dim + 4


class Int4Z(Codec):
    """4-bit codes 0..15 per channel with a float16 scale and a 4-bit zero point (:func:`quantize_uint4z`), codes
    and zero points packed two per byte: T·D/2 + 2·D + D/2 + 4 bytes (the shape)."""

    name = "int4z"

    def encode(self, tokens: np.ndarray) -> Parts:
        codes, scale, zero = quantize_uint4z(_check(tokens))
        return {"codes": pack_int4(codes), "scale": scale, "zero": pack_int4(zero),
                "shape": np.array(codes.shape, np.uint16)}

    def decode(self, parts: Parts) -> np.ndarray:
        t, d = (int(v) for v in parts["shape"])
        codes = unpack_int4(parts["codes"], (t, d), signed=False)
        return dequantize_uint4z(codes, parts["scale"], unpack_int4(parts["zero"], (d,), signed=False)).astype(
            np.float16)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        return (num_tokens * dim + 1) // 2 + 2 * dim + (dim + 1) // 2 + 4


class Int4ZW(Codec):
    """``int4z`` with a window's :data:`WIDE` widest channels in 8 bits (:func:`quantize_int4zw`): T·D/2 + 2·D + D/2
    + T·K/2 + 2·K + 4 bytes."""

    name = "int4zw"

    def encode(self, tokens: np.ndarray) -> Parts:
        codes, scale, zero, low, channels = quantize_int4zw(_check(tokens))
        return {"codes": pack_int4(codes), "scale": scale, "zero": pack_int4(zero), "low": pack_int4(low),
                "channels": channels, "shape": np.array(codes.shape, np.uint16)}

    def decode(self, parts: Parts) -> np.ndarray:
        t, d = (int(v) for v in parts["shape"])
        k = len(parts["channels"])
        return dequantize_int4zw(unpack_int4(parts["codes"], (t, d), signed=False), parts["scale"],
                                 unpack_int4(parts["zero"], (d,), signed=False),
                                 unpack_int4(parts["low"], (t, k), signed=False), parts["channels"]).astype(np.float16)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        return Int4Z().bytes_per_window(num_tokens, dim) + (num_tokens * WIDE + 1) // 2 + 2 * WIDE


MODULATION, SCALE, ZERO, WIDE_CHANNELS = "modulation", "scale", "zero", "wide"  # the named vectors of a window's φ
_PACKED = ("int4", "int4z", "int4zw")  # codecs whose codes go two to a byte


def store_vectors(tokens: np.ndarray, codec: str) -> dict[str, list]:
    """(T, d_LM) float16 → the named vectors a store writes for one window under ``codec`` (``fp16``, ``int8``,
    ``int4``, ``int4z``, ``int4zw``; as lists: Qdrant's bindings convert a list about twice as fast as an array):

    - ``fp16``: ``modulation``, T float16 rows of d_LM;
    - ``int8``: ``modulation``, T uint8 rows of d_LM (the int8 codes + 128), and ``scale``, d_LM float16;
    - ``int4``: ``modulation``, T uint8 rows of d_LM/2 (two 4-bit codes a byte), and ``scale``;
    - ``int4z``: ``modulation``, T uint8 rows of d_LM/2 (two codes 0..15 a byte), ``scale``, and ``zero``, uint8 of
      d_LM/2 (two zero points a byte);
    - ``int4zw``: as ``int4z``, each row followed by the 8-bit channels' low nibbles (d_LM/2 + K/2 bytes), and
      ``wide``, uint8 of 2·K: the K channel indices, little-endian uint16 (d_LM: unused).
    """
    if codec == "fp16":
        return {MODULATION: tokens.astype(np.float32).tolist()}
    out: dict[str, np.ndarray] = {}
    low = None
    if codec == "int4zw":
        codes, scale, zero, low, channels = quantize_int4zw(_check(tokens))  # ..., (T, K) uint8, (K,) uint16
        out[ZERO], out[WIDE_CHANNELS] = pack_int4(zero), channels.astype("<u2").view(np.uint8)  # (d/2,), (2K,)
    elif codec == "int4z":
        codes, scale, zero = quantize_uint4z(_check(tokens))  # (T, d) uint8, (d,) float16, (d,) uint8
        out[ZERO] = pack_int4(zero)  # (d_LM / 2,) uint8
    else:
        codes, scale = quantize_int8(_check(tokens), _INT8_MAX if codec == "int8" else _INT4_MAX)  # (T, d) int8, (d,)
    if codec in _PACKED:
        rows = pack_int4(codes).reshape(len(tokens), -1)  # (T, d_LM / 2) uint8, row by row
        if low is not None:
            rows = np.concatenate([rows, pack_int4(low).reshape(len(tokens), -1)], 1)  # (T, (d_LM + K) / 2)
    else:
        rows = (codes.astype(np.int16) + 128).astype(np.uint8)  # (T, d_LM) uint8
    out |= {MODULATION: rows, SCALE: scale}
    return {k: v.astype(np.float32).tolist() for k, v in out.items()}


def from_store_vectors(vectors: dict, codec: str) -> np.ndarray:
    """The inverse of :func:`store_vectors` → (T, d_LM) float16. Exact for ``fp16``; for the others, coding the result
    again gives the same vectors (an export → import round trip is bit-exact)."""
    rows = np.asarray(vectors[MODULATION], dtype=np.float32)
    if codec == "fp16":
        return rows.astype(np.float16)
    scale = np.asarray(vectors[SCALE], dtype=np.float32).astype(np.float16)
    t, d = len(rows), len(scale)
    if codec in ("int4z", "int4zw"):
        packed = rows.astype(np.uint8)  # (T, d/2 [+ K/2])
        codes = unpack_int4(packed[:, : d // 2].reshape(-1), (t, d), signed=False)
        zero = unpack_int4(np.asarray(vectors[ZERO], dtype=np.float32).astype(np.uint8), (d,), signed=False)
        if codec == "int4z":
            return dequantize_uint4z(codes, scale, zero).astype(np.float16)
        channels = np.asarray(vectors[WIDE_CHANNELS], dtype=np.float32).astype(np.uint8).view("<u2")  # (K,)
        low = unpack_int4(packed[:, d // 2:].reshape(-1), (t, len(channels)), signed=False)
        return dequantize_int4zw(codes, scale, zero, low, channels).astype(np.float16)
    if codec == "int4":
        codes = unpack_int4(rows.astype(np.uint8).reshape(-1), (t, d))
    else:
        codes = (rows.astype(np.int16) - 128).astype(np.int8)
    return dequantize_int8(codes, scale).astype(np.float16)


def store_vector_sizes(codec: str, d_lm: int) -> dict[str, int]:
    """Row length of each named vector :func:`store_vectors` writes (the packed codecs refuse an odd d_LM).
    ``modulation``, ``zero`` and ``wide`` hold uint8 (``modulation`` float16 for ``fp16``), ``scale`` float16."""
    if codec in _PACKED and d_lm % 2:
        raise ValueError(f"codec {codec} packs two states a byte: d_LM={d_lm} is odd (use int8)")
    rows = {MODULATION: d_lm // 2 if codec in _PACKED else d_lm}
    if codec != "fp16":
        rows[SCALE] = d_lm
    if codec in ("int4z", "int4zw"):
        rows[ZERO] = d_lm // 2
    if codec == "int4zw":
        rows[MODULATION] += WIDE // 2
        rows[WIDE_CHANNELS] = 2 * WIDE
    return rows


def store_vector_names(codec: str) -> list[str]:
    """The named vectors a read of one window under ``codec`` fetches."""
    return list(store_vector_sizes(codec, 2))  # the names do not depend on d_LM (any even width)


@dataclass(frozen=True)
class PcaBasis:
    """Principal directions of a checkpoint's stored states: mean (D,) and components (D, r), orthonormal columns,
    by decreasing variance. Fitted on modulations of training documents only; one file per checkpoint."""

    mean: np.ndarray  # (D,) float32
    components: np.ndarray  # (D, r) float32
    explained: np.ndarray  # (r,) share of the fitted states' variance each direction explains
    checkpoint: str = ""

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the artifact's arrays (what the checkpoint carries once, not per window)."""
        return int(self.mean.nbytes + self.components.nbytes)

    @classmethod
    def fit(cls, states: np.ndarray, rank: int, checkpoint: str = "") -> PcaBasis:
        """states: (N, D) rows (every stored token of the fit windows; drop zero padding rows first)."""
        x = np.asarray(states, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"PCA fit: expected (N, D) states, got shape {x.shape}")
        n, d = x.shape
        if not 1 <= rank <= d:
            raise ValueError(f"PCA rank {rank}: expected 1..{d} (the states' width)")
        if n < 2:
            raise ValueError(f"PCA fit needs at least 2 states, got {n}")
        mean = x.mean(0)
        xc = x - mean
        evals, evecs = np.linalg.eigh(xc.T @ xc / (n - 1))  # ascending
        order = np.argsort(evals)[::-1][:rank]
        total = max(float(evals.clip(min=0).sum()), 1e-30)
        return cls(mean.astype(np.float32), evecs[:, order].astype(np.float32),
                   (evals[order].clip(min=0) / total).astype(np.float32), checkpoint)

    def truncate(self, rank: int) -> PcaBasis:
        """The first ``rank`` directions (a basis fitted at a larger rank serves every smaller one)."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"PCA rank {rank}: this basis has {self.rank} directions")
        return PcaBasis(self.mean, self.components[:, :rank], self.explained[:rank], self.checkpoint)

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """(T, D) → coefficients (T, r), float32."""
        x = _check(tokens, self.dim).astype(np.float32)
        return (x - self.mean) @ self.components

    def reconstruct(self, coeffs: np.ndarray) -> np.ndarray:
        """(T, r) → (T, D), float32."""
        if coeffs.ndim != 2 or coeffs.shape[1] != self.rank:
            raise ValueError(f"PCA coefficients: expected (T, {self.rank}), got shape {coeffs.shape}")
        return coeffs.astype(np.float32) @ self.components.T + self.mean

    def save(self, path: str | Path) -> int:
        """Write ``codec-pca{r}.npz``-style file; returns its size in bytes."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("wb") as fh:
            np.savez(fh, mean=self.mean, components=self.components, explained=self.explained,
                     checkpoint=np.array(self.checkpoint))
        return p.stat().st_size

    @classmethod
    def load(cls, path: str | Path, checkpoint: str | None = None) -> PcaBasis:
        """Read a saved basis; with ``checkpoint``, refuse one fitted for another checkpoint version."""
        with np.load(path) as z:
            basis = cls(z["mean"], z["components"], z["explained"], str(z["checkpoint"]))
        if checkpoint is not None and basis.checkpoint != checkpoint:
            raise ValueError(f"{path}: PCA basis of checkpoint {basis.checkpoint!r}, not {checkpoint!r}")
        return basis


class PcaInt8(Codec):
    """Project on a fitted basis's r directions, then int8 per channel (per direction): T·r + 2·r bytes."""

    def __init__(self, basis: PcaBasis, quantize: bool = True):
        self.basis, self.quantize = basis, quantize
        self.name = f"pca{basis.rank}" + ("-int8" if quantize else "")

    def encode(self, tokens: np.ndarray) -> Parts:
        c = self.basis.project(tokens)
        if not self.quantize:
            return {"coeffs": c.astype(np.float16)}
        codes, scale = quantize_int8(c)
        return {"codes": codes, "scale": scale}

    def decode(self, parts: Parts) -> np.ndarray:
        c = dequantize_int8(parts["codes"], parts["scale"]) if self.quantize else parts["coeffs"]
        return self.basis.reconstruct(c).astype(np.float16)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        if dim != self.basis.dim:
            raise ValueError(f"D={dim}, but this basis was fitted on D={self.basis.dim}")
        r = self.basis.rank
        return num_tokens * r + 2 * r if self.quantize else num_tokens * r * 2


class Tokens(Codec):
    """Keep ``t`` of the window's tokens, coded by ``inner``. With the token selector's score (``weight`` (D,),
    ``bias``: the logit the checkpoint's :class:`~pipeline.model.readout.TokenSelector` gives a stored, RMS-normalised
    state) the t best-scored non-zero tokens, kept in their stored (document) order; without it the first t."""

    def __init__(self, t: int, inner: Codec | None = None, weight: np.ndarray | None = None, bias: float = 0.0):
        if t < 1:
            raise ValueError(f"tokens{t}: keep at least one token")
        self.t, self.inner = t, inner or Fp16()
        self.weight = None if weight is None else np.asarray(weight, np.float32).reshape(-1)
        self.bias = float(bias)
        self.name = f"tokens{t}" + ("" if isinstance(self.inner, Fp16) else f"-{self.inner.name}")

    def keep(self, tokens: np.ndarray) -> np.ndarray:
        """Indices of the kept tokens, ascending (stored order)."""
        x = _check(tokens, None if self.weight is None else self.weight.shape[0])
        if self.t >= len(x):
            return np.arange(len(x))
        if self.weight is None:
            return np.arange(self.t)
        x = x.astype(np.float32)
        score = x @ self.weight + self.bias
        score[~x.any(1)] = -np.inf  # zero padding of a short window: last
        return np.sort(np.argsort(-score, kind="stable")[: self.t])

    def encode(self, tokens: np.ndarray) -> Parts:
        return self.inner.encode(tokens[self.keep(tokens)])

    def decode(self, parts: Parts) -> np.ndarray:
        return self.inner.decode(parts)

    def bytes_per_window(self, num_tokens: int, dim: int) -> int:
        return self.inner.bytes_per_window(min(self.t, num_tokens), dim)


_SPEC = re.compile(r"^(?:tokens(?P<t>\d+)[-+])?(?:(?P<plain>fp16|int8|int4zw|int4z|int4)|pca(?P<r>\d+)(?P<q>-int8)?)$")


def codec(spec: str, basis: PcaBasis | None = None, selector: tuple[np.ndarray, float] | None = None) -> Codec:
    """``fp16``, ``int8``, ``pca{r}`` / ``pca{r}-int8`` (``basis``: fitted at rank ≥ r, truncated to r), each
    optionally behind ``tokens{t}-`` (``selector``: the token selector's (weight, bias); ``tokens{t}`` alone keeps
    fp16). A ValueError names the accepted forms."""
    m = _SPEC.match(spec) or re.match(r"^tokens(?P<t>\d+)$", spec)
    if not m:
        raise ValueError(f"codec {spec!r}: expected fp16, int8, int4, int4z, int4zw, pca<r>, pca<r>-int8, each "
                         "optionally behind tokens<t>- (e.g. tokens24-int8), or tokens<t> alone")
    g = m.groupdict()
    if g.get("r"):
        if basis is None:
            raise ValueError(f"codec {spec!r} needs a fitted PCA basis")
        inner: Codec = PcaInt8(basis.truncate(int(g["r"])), quantize=bool(g["q"]))
    else:
        inner = {"int8": Int8(), "int4": Int4(), "int4z": Int4Z(), "int4zw": Int4ZW()}.get(g.get("plain") or "", Fp16())
    if g.get("t"):
        w, b = selector if selector is not None else (None, 0.0)
        return Tokens(int(g["t"]), inner, w, b)
    return inner
