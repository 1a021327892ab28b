"""The modulation codecs (pipeline/modulation_codec.py): exact byte counts, round-trip error bounds, PCA at full rank
is lossless, a basis refuses states of another width, the token codec keeps the selector's best tokens in order."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.modulation_codec import Fp16, Int8, PcaBasis, PcaInt8, Tokens, codec, nbytes, quantize_int8

T, D = 48, 576


def modulation(seed: int = 0, t: int = T, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    x[:, :3] *= 40  # a few large channels, as mid-layer states have
    return x.astype(np.float16)


def fitted(rank: int, d: int = D, n: int = 2000, seed: int = 1) -> PcaBasis:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32)) @ rng.standard_normal((32, d)) + rng.standard_normal((n, d)) * 0.1
    return PcaBasis.fit(x, rank, checkpoint="abc")


def test_fp16_is_the_identity_at_55296_bytes() -> None:
    x = modulation()
    parts = Fp16().encode(x)
    assert nbytes(parts) == Fp16().bytes_per_window(T, D) == 55_296
    np.testing.assert_array_equal(Fp16().decode(parts), x)


def test_int8_bytes_and_error_within_half_a_scale_per_channel() -> None:
    x = modulation()
    c = Int8()
    parts = c.encode(x)
    assert parts["codes"].dtype == np.int8 and parts["codes"].shape == (T, D)
    assert parts["scale"].dtype == np.float16 and parts["scale"].shape == (D,)
    assert nbytes(parts) == c.bytes_per_window(T, D) == T * D + 2 * D == 28_800
    y = c.decode(parts)
    assert y.dtype == np.float16 and y.shape == (T, D)
    err = np.abs(y.astype(np.float32) - x.astype(np.float32))
    scale = parts["scale"].astype(np.float32)
    # half a scale, plus the float16 rounding of the decoded value
    bound = scale / 2 + np.abs(x.astype(np.float32)) * 2.0 ** -10 + 1e-7
    assert (err <= bound).all()
    assert (np.abs(x.astype(np.float32)).max(0) <= scale * 127 * (1 + 1e-6)).all()  # no code clipped


def test_int8_zero_and_tiny_channels() -> None:
    x = np.zeros((4, 3), np.float32)
    x[:, 1] = [1e-6, -2e-6, 0, 3e-6]  # below float16's normal range: the scale rounds up, never to 0
    codes, scale = quantize_int8(x)
    assert scale[0] == 0 and (codes[:, 0] == 0).all()
    assert scale[1] > 0 and np.abs(codes).max() <= 127
    y = Int8().decode({"codes": codes, "scale": scale}).astype(np.float32)
    assert np.abs(y[:, 1] - x[:, 1]).max() <= scale[1].astype(np.float32) / 2 + 1e-7


def test_pca_at_full_rank_is_nearly_lossless_and_counts_its_bytes() -> None:
    basis = fitted(D)
    x = modulation(3)
    c = PcaInt8(basis, quantize=False)
    y = c.round_trip(x).astype(np.float32)
    assert np.abs(y - x.astype(np.float32)).max() < 0.05  # float16 coefficients only
    q = PcaInt8(basis.truncate(128))
    assert q.name == "pca128-int8"
    assert nbytes(q.encode(x)) == q.bytes_per_window(T, D) == T * 128 + 2 * 128 == 6_400
    assert basis.truncate(128).nbytes == (D + D * 128) * 4


def test_pca_keeps_what_lies_in_its_span() -> None:
    basis = fitted(32)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((T, 32)) @ basis.components.T + basis.mean).astype(np.float16)
    y = PcaInt8(basis).round_trip(x).astype(np.float32)
    rel = np.linalg.norm(y - x.astype(np.float32)) / np.linalg.norm(x.astype(np.float32) - basis.mean)
    assert rel < 0.02  # int8 on the coefficients only


def test_a_fitted_basis_refuses_a_modulation_of_another_width() -> None:
    c = PcaInt8(fitted(16))
    with pytest.raises(ValueError, match="D=384.*fitted on D=576"):
        c.encode(modulation(d=384))
    with pytest.raises(ValueError, match="D=384"):
        c.bytes_per_window(T, 384)


def test_basis_save_load_and_checkpoint_check(tmp_path) -> None:
    basis = fitted(8)
    size = basis.save(tmp_path / "codec-pca8.npz")
    assert size > basis.nbytes
    back = PcaBasis.load(tmp_path / "codec-pca8.npz", checkpoint="abc")
    np.testing.assert_array_equal(back.components, basis.components)
    with pytest.raises(ValueError, match="checkpoint 'abc', not 'other'"):
        PcaBasis.load(tmp_path / "codec-pca8.npz", checkpoint="other")
    with pytest.raises(ValueError, match="rank 9"):
        basis.truncate(9)


def test_tokens_keeps_the_best_scored_in_stored_order() -> None:
    x = modulation(7).astype(np.float32)
    w = np.zeros(D, np.float32)
    w[10] = 1.0
    x[:, 10] = np.arange(T)[::-1]  # token 0 scores highest
    x[[5, 20]] *= 0  # zero padding never wins
    x[5, 10] = x[20, 10] = 0
    c = Tokens(24, Int8(), w, 0.5)
    keep = c.keep(x.astype(np.float16))
    assert list(keep) == sorted(keep) and len(keep) == 24
    assert 5 not in keep and 20 not in keep and 0 in keep
    parts = c.encode(x.astype(np.float16))
    assert nbytes(parts) == c.bytes_per_window(T, D) == 24 * D + 2 * D == 14_976
    assert c.decode(parts).shape == (24, D)
    assert list(Tokens(4).keep(x.astype(np.float16))) == [0, 1, 2, 3]  # no selector: the first t
    assert Tokens(60).keep(x.astype(np.float16)).tolist() == list(range(T))


def test_codec_names() -> None:
    basis = fitted(64)
    assert codec("fp16").name == "fp16" and codec("int8").name == "int8"
    assert codec("pca32-int8", basis).name == "pca32-int8" and codec("pca32", basis).name == "pca32"
    assert codec("tokens24-int8").name == "tokens24-int8" and codec("tokens24+int8").name == "tokens24-int8"
    assert codec("tokens24").name == "tokens24"
    assert codec("tokens12-pca32-int8", basis).bytes_per_window(T, D) == 12 * 32 + 64
    with pytest.raises(ValueError, match="needs a fitted PCA basis"):
        codec("pca32-int8")
    with pytest.raises(ValueError, match="expected fp16, int8"):
        codec("int3")


def test_int4_packs_two_codes_a_byte_within_half_a_scale() -> None:
    from pipeline.modulation_codec import Int4, pack_int4, unpack_int4

    codes = np.arange(-7, 8, dtype=np.int8).repeat(3)[:44].reshape(4, 11)  # odd count: a padded last byte
    np.testing.assert_array_equal(unpack_int4(pack_int4(codes), codes.shape), codes)
    x = modulation(9)
    c = Int4()
    parts = c.encode(x)
    assert nbytes(parts) == c.bytes_per_window(T, D) == T * D // 2 + 2 * D + 4 == 14_980
    err = np.abs(c.decode(parts).astype(np.float32) - x.astype(np.float32))
    scale = parts["scale"].astype(np.float32)
    assert (err <= scale / 2 + np.abs(x.astype(np.float32)) * 2.0 ** -10 + 1e-7).all()
    assert codec("int4").name == "int4" and codec("tokens24-int4").bytes_per_window(T, D) == 24 * D // 2 + 2 * D + 4


def _uncentred(seed: int) -> np.ndarray:
    """States whose channels are not centred: some all positive, some all negative, one constant, one zero, and
    zero-padding rows at the end (a short window)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)) * rng.uniform(0.01, 40, D) + rng.uniform(-3, 3, D)
    x[:, :50], x[:, 50:100] = np.abs(x[:, :50]), -np.abs(x[:, 50:100])
    x[:, 100], x[:, 101], x[40:] = 2.5, 0.0, 0.0
    return x.astype(np.float16)


def test_int4z_spans_each_channel_within_half_a_scale_and_costs_15268_bytes() -> None:
    from pipeline.modulation_codec import Int4, Int4Z

    x = _uncentred(4)
    c = Int4Z()
    parts = c.encode(x)
    assert nbytes(parts) == c.bytes_per_window(T, D) == T * D // 2 + 2 * D + D // 2 + 4 == 15_268
    y = c.decode(parts)
    x32, err = x.astype(np.float32), np.abs(y.astype(np.float32) - x.astype(np.float32))
    scale = parts["scale"].astype(np.float32)
    assert (err <= scale / 2 + np.abs(x32) * 2.0 ** -10 + 1e-7).all()
    assert (y[40:] == 0).all() and (y[:, 101] == 0).all()  # 0.0 is a level of every channel: padding stays zero
    assert np.abs(y[:40, 100].astype(np.float32) - 2.5).max() <= scale[100] / 2 + 1e-3
    # a channel's levels span its own range, not ±absmax: less error than symmetric int4 on uncentred states
    symmetric = np.linalg.norm(Int4().round_trip(x).astype(np.float32) - x32)
    assert np.linalg.norm(y.astype(np.float32) - x32) < 0.8 * symmetric
    assert codec("int4z").name == "int4z"
    assert codec("tokens24-int4z").bytes_per_window(T, D) == 24 * D // 2 + 2 * D + D // 2 + 4


def test_int4zw_codes_the_widest_channels_in_8_bits_within_16000_bytes() -> None:
    from pipeline.modulation_codec import WIDE, Int4Z, Int4ZW, quantize_int4zw

    x = _uncentred(5)
    c = Int4ZW()
    parts = c.encode(x)
    assert nbytes(parts) == c.bytes_per_window(T, D) == 15_268 + T * WIDE // 2 + 2 * WIDE == 15_996
    y = c.decode(parts).astype(np.float32)
    x32 = x.astype(np.float32)
    width = np.maximum(x32.max(0), 0) - np.minimum(x32.min(0), 0)
    chosen = parts["channels"]
    assert len(chosen) == WIDE and list(chosen) == sorted(chosen)
    assert set(chosen) == set(np.argsort(-width)[:WIDE])  # the widest: where int4z's step is largest
    scale = parts["scale"].astype(np.float32)
    assert (np.abs(y - x32) <= scale / 2 + np.abs(x32) * 2.0 ** -10 + 1e-7).all()
    assert (scale[chosen] <= np.abs(x32[:, chosen]).max(0) / 127 * 1.01).all()  # 8-bit steps on those
    assert np.linalg.norm(y - x32) < 0.95 * np.linalg.norm(Int4Z().round_trip(x).astype(np.float32) - x32)
    # a window of one token: every channel sits on a 4-bit grid exactly, so none needs 8 bits and none is spent
    one = np.zeros((T, D), np.float16)
    one[0] = x[0]
    *_, channels = quantize_int4zw(one)
    assert (channels == D).all()
    np.testing.assert_array_equal(c.round_trip(one).view(np.uint16), one.view(np.uint16))
    np.testing.assert_array_equal(c.round_trip(x[:1]).view(np.uint16), x[:1].view(np.uint16))  # a one-row window
    assert codec("int4zw").name == "int4zw"


@pytest.mark.parametrize("name", ["int4z", "int4zw"])
@pytest.mark.parametrize("seed", range(6))
def test_4_bit_codecs_code_their_own_output_to_the_same_bits(seed, name) -> None:
    """Export → import re-codes decoded states: their grid may span fewer than 16 levels (the zero point's rounding)
    and float16 rounding moves them, yet coding them again reproduces them bit for bit (int4zw: the same channels are
    found again in 8 bits, since the others now sit exactly on their 4-bit grids)."""
    from pipeline.modulation_codec import from_store_vectors, store_vectors

    c = codec(name)
    x = _uncentred(seed) if seed % 2 else modulation(seed)
    y = c.round_trip(x)
    np.testing.assert_array_equal(c.round_trip(y).view(np.uint16), y.view(np.uint16))
    stored = from_store_vectors(store_vectors(x, name), name)  # what a Qdrant store keeps, read back
    np.testing.assert_array_equal(stored.view(np.uint16), y.view(np.uint16))
    np.testing.assert_array_equal(from_store_vectors(store_vectors(stored, name), name).view(np.uint16),
                                  y.view(np.uint16))
