"""The floors: what it costs to ship each node's raw data once (DESIGN.md section 7).

Beside every comparison table stand two one-shot floors. Node i sends its whole shard (its rows of
the training set) once, coded by a real coder, with its labels; the learner decodes the shards and
trains centrally on them. No round of any method should cost a node more than its floor.

1. **Lossless floor** (``bits=None``): the shard in the dataset's source dtype (8-bit images stay
   uint8; float32 data only through zstd), coded losslessly; it decodes bit-identical to the shard.
2. **Quantized floor** (``bits=B``, B in 1..8): each value ``v = to_float(x)`` is first quantized on
   the dataset's range ``[lo, hi]`` to one of ``2^B`` levels with qdata's own data quantizers
   (:mod:`qdata.codecs.quantizers`): ``rounding="nearest"``, ``level = round((v - lo) / Delta)``
   (deterministic, biased, ``|error| <= Delta / 2``), or ``rounding="stochastic"``,
   ``level = floor((v - lo) / Delta + U)`` (unbiased, the codes qdata's methods send; its noise also
   costs the coders bits), ``Delta = (hi - lo) / (2^B - 1)``. The levels, as uint8, are coded
   losslessly the same way; they decode to the levels exactly, and the learner trains on
   ``lo + Delta level``.

Coders (:data:`CODERS`), each a well-kept library at its strongest setting that runs in seconds:

* ``"png"``: PNG through Pillow (zlib level 9). For grey-scale images two encodings are made and the
  smaller kept: 8-bit grey with PNG's adaptive filters, and a palette image (identity palette) at the
  smallest PNG bit depth holding the levels (1, 2, 4 or 8), unfiltered. The decoder reads which from
  the file's header.
* ``"webp"``: WebP lossless through Pillow (libwebp, ``method=6``, ``quality=99``; quality 100, the
  ``cwebp -z 9`` setting, measured 0.8% smaller on a stack of 585 Fashion-MNIST images for 40 times
  the time: 12 s against 0.3 s). WebP has no
  grey-scale mode: grey images go in as RGB with three equal channels (its subtract-green and
  palette transforms take the redundancy out), and channel 0 is read back.
* ``"zstd"``: Zstandard (``zstandard``, level 19) of the raw bytes of the shard in sample order.

Layouts (:data:`LAYOUTS`) for the image coders: ``"stack"`` stacks the node's images vertically
into tall images of at most 16383 rows (WebP's limit; one image for most shards), ``"each"`` codes
every image as its own file (more headers, no context across images; measured larger everywhere).
zstd codes the whole shard in one frame with ``"stack"``, one frame per sample with ``"each"``.

Labels travel exactly, packed at ``w = ceil(log2 C)`` bits each into whole bytes, the stream qdata's
messages send (:func:`qdata.codecs.base.pack_codes`): ``8 ceil(m w / 8)`` bits for m labels.

Bits (:func:`floor_bits`): 8 times the coded bytes, data files plus labels, per node. Each file is
self-delimiting (a PNG ends with its IEND chunk, a WebP file's RIFF header holds its length, a zstd
frame marks its last block) and says how many samples it holds (the image height, the frame's
content size), and the labels' length follows from the sample count, so the concatenated bytes
decode without any framing. Not counted, as in every qdata message: what both sides know before
the first message (the sample shape and dtype, the coder, layout, B, rounding, range and C).
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdata.codecs import base, quantizers
from qdata.data import Dataset

__all__ = [
    "CODERS", "LAYOUTS", "ROUNDINGS", "FloorMeta", "FloorPayload", "cannot_code", "node_shards", "quantize_levels",
    "encode_floor", "floor_payloads", "decode_floor", "floor_bits", "floor_bits_per_node", "central_dataset",
    "floor_rows",
]

CODERS = ("png", "webp", "zstd")
LAYOUTS = ("stack", "each")
ROUNDINGS = ("nearest", "stochastic")
MAX_LEVEL_BITS = 8  # quantized levels travel as uint8

PNG_LEVEL = 9
WEBP_METHOD, WEBP_QUALITY = 6, 99
WEBP_MAX_SIDE = 16383  # libwebp's largest width or height
ZSTD_LEVEL = 19
_PNG_DEPTHS = (1, 2, 4, 8)


class FloorMeta(NamedTuple):
    """What both sides know before a floor is sent (never sent, never counted).

    Attributes:
      coder: one of :data:`CODERS`.
      layout: one of :data:`LAYOUTS`.
      sample_shape: shape of one sample.
      dtype: "uint8" or "float32", the dtype of the coded values.
      bits: B for a quantized floor (the values are levels in 0..2^B-1), None for the lossless one.
      rounding: "nearest" or "stochastic" for a quantized floor, None for the lossless one.
      lo, hi: the quantizer's range (the dataset's ``value_range``); None for the lossless floor.
      num_classes: C; labels travel at ceil(log2 C) bits.
    """

    coder: str
    layout: str
    sample_shape: tuple
    dtype: str
    bits: int | None
    rounding: str | None
    lo: float | None
    hi: float | None
    num_classes: int


class FloorPayload(NamedTuple):
    """One node's floor as it crosses the link.

    Attributes:
      data: the coded files, in order (one tall image or zstd frame per tile, or one per sample).
      labels: the labels packed at ceil(log2 C) bits each.
      meta: the :class:`FloorMeta` both sides know.
    """

    data: tuple[bytes, ...]
    labels: bytes
    meta: FloorMeta


# ----------------------------------------------------------------------------------------------
# Checks.


def _check_coder(coder) -> str:
    if coder not in CODERS:
        raise ValueError(f"coder must be one of {CODERS}, got {coder!r}")
    return coder


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_level_bits(bits) -> int | None:
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_LEVEL_BITS:
        raise ValueError(f"bits must be None (the lossless floor) or an integer B in 1..{MAX_LEVEL_BITS} "
                         f"(levels sent as uint8), got {bits!r}")
    return int(bits)


def _check_rounding(rounding) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def cannot_code(dataset: Dataset, coder: str, bits: int | None = None) -> str | None:
    """Why ``coder`` cannot code ``dataset``'s floor at ``bits`` (None: it can).

    zstd codes anything; PNG and WebP code 8-bit grey or RGB images, so the lossless floor of float32
    data and samples that are not images are zstd's alone."""
    coder, bits = _check_coder(coder), _check_level_bits(bits)
    if coder == "zstd":
        return None
    if bits is None and dataset.x_train.dtype != np.uint8:
        return (f"coder {coder!r} codes 8-bit images, but dataset {dataset.name!r} holds "
                f"{dataset.x_train.dtype} samples: use coder 'zstd' for its lossless floor, or quantize it (bits=B)")
    try:
        _image_geometry(dataset.sample_shape, coder)
    except ValueError as err:
        return str(err)
    return None


def _image_geometry(sample_shape: tuple, coder: str) -> tuple[int, int, int]:
    """(H, W, C) of image samples the image coders take: grey (H, W) or (H, W, 1), or RGB (H, W, 3)."""
    shape = tuple(sample_shape)
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise ValueError(f"coder {coder!r} codes grey-scale (H, W, 1) or RGB (H, W, 3) images, got samples of "
                         f"shape {tuple(sample_shape)}; use coder 'zstd'")
    if max(shape[0], shape[1]) > WEBP_MAX_SIDE:
        raise ValueError(f"coder {coder!r}: images of {shape[0]}x{shape[1]} exceed {WEBP_MAX_SIDE} pixels a side")
    return shape


# ----------------------------------------------------------------------------------------------
# What a node ships: its shard, optionally quantized to levels.


def node_shards(dataset: Dataset, index, count) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each node's shard ``(x, y)``: its training-set rows ``index[i, :count[i]]``, in arrival order.

    Args:
      dataset: the :class:`~qdata.data.Dataset`.
      index, count: the nodes as :func:`qdata.data.stack_nodes` gives them (``NodeData.index``,
        ``NodeData.counts``).

    Returns:
      A list of ``(x, y)`` per node, ``x`` in the dataset's stored dtype, ``y`` int32.
    """
    index, count = np.asarray(index), np.asarray(count).reshape(-1)
    if index.ndim != 2 or index.shape[0] != count.shape[0]:
        raise ValueError(f"index must be (num_nodes, max_len) and count (num_nodes,), got shapes {index.shape} "
                         f"and {count.shape}")
    if count.min() < 1 or count.max() > index.shape[1]:
        raise ValueError(f"count must lie in 1..{index.shape[1]} (the width of index), got {count.tolist()}")
    rows = [index[i, :c] for i, c in enumerate(count)]
    return [(dataset.x_train[r], dataset.y_train[r]) for r in rows]


def quantize_levels(dataset: Dataset, x: np.ndarray, bits: int, rounding: str = "nearest",
                    key: jax.Array | None = None) -> np.ndarray:
    """The levels in 0..2^B-1 of samples ``x`` under qdata's data quantizer on the dataset's range.

    ``rounding="nearest"`` is :func:`qdata.codecs.quantizers.nearest_rounding`, ``"stochastic"`` is
    :func:`qdata.codecs.quantizers.stochastic_rounding` (which needs ``key``), both with
    ``[lo, hi] = dataset.value_range`` on the float values ``dataset.to_float(x)``; the levels are the
    codes those quantizers pack and send, unpacked.

    Returns:
      uint8 levels of ``x``'s shape.
    """
    bits, rounding = _check_level_bits(bits), _check_rounding(rounding)
    if bits is None:
        raise ValueError("quantize_levels needs bits B in 1..8")
    lo, hi = dataset.value_range
    factory = quantizers.nearest_rounding if rounding == "nearest" else quantizers.stochastic_rounding
    if key is None:
        if rounding == "stochastic":
            raise ValueError("stochastic rounding needs a key")
        key = jax.random.PRNGKey(0)  # unused by nearest rounding
    payload = factory(bits, lo, hi).encode(key, jnp.asarray(dataset.to_float(np.asarray(x))))
    codes = base.unpack_codes(payload.rows["codes"], bits, math.prod(x.shape[1:]))
    return np.asarray(codes, np.uint8).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# The coders: values (m, *sample_shape) <-> self-delimiting files.


def _tiles(values: np.ndarray, layout: str, geometry: tuple) -> list[np.ndarray]:
    """The images to code: tall stacks of whole samples (at most WEBP_MAX_SIDE rows), or one per sample."""
    h, w, c = geometry
    per = 1 if layout == "each" else max(1, WEBP_MAX_SIDE // h)
    shape = (-1, w) if c == 1 else (-1, w, c)
    return [values[s:s + per].reshape(shape) for s in range(0, values.shape[0], per)]


def _saved(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_file(tile: np.ndarray) -> bytes:
    """The smaller of the filtered grey/RGB PNG and, for grey, the palette PNG at the smallest depth."""
    from PIL import Image

    candidates = [_saved(Image.fromarray(tile), "PNG", compress_level=PNG_LEVEL)]
    if tile.ndim == 2:
        top = int(tile.max())
        depth = next(d for d in _PNG_DEPTHS if top < 1 << d)
        palette = Image.frombytes("P", (tile.shape[1], tile.shape[0]), tile.tobytes())
        palette.putpalette(np.repeat(np.arange(top + 1, dtype=np.uint8), 3).tobytes(), "RGB")
        candidates.append(_saved(palette, "PNG", bits=depth, compress_level=PNG_LEVEL))
    return min(candidates, key=len)


def _webp_file(tile: np.ndarray) -> bytes:
    from PIL import Image

    return _saved(Image.fromarray(tile), "WEBP", lossless=True, method=WEBP_METHOD, quality=WEBP_QUALITY)


def _read_image(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        # A palette PNG reads as its indices (the identity palette makes them the levels).
        array = np.asarray(image)
    if channels == 1 and array.ndim == 3:
        array = array[..., 0]  # WebP's grey images come back as three equal channels
    return array


def _encode_values(values: np.ndarray, coder: str, layout: str) -> tuple[bytes, ...]:
    if coder == "zstd":
        import zstandard

        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # writes the content size
        chunks = [values] if layout == "stack" else list(values)
        return tuple(compressor.compress(np.ascontiguousarray(v).tobytes()) for v in chunks)
    geometry = _image_geometry(values.shape[1:], coder)
    write = _png_file if coder == "png" else _webp_file
    return tuple(write(np.ascontiguousarray(tile)) for tile in _tiles(values, layout, geometry))


def _decode_values(data: Sequence[bytes], meta: FloorMeta) -> np.ndarray:
    shape = tuple(meta.sample_shape)
    if meta.coder == "zstd":
        import zstandard

        decompressor = zstandard.ZstdDecompressor()
        raw = b"".join(decompressor.decompress(chunk) for chunk in data)
        return np.frombuffer(raw, np.dtype(meta.dtype)).reshape((-1,) + shape).copy()
    channels = _image_geometry(shape, meta.coder)[2]
    tiles = [_read_image(chunk, channels) for chunk in data]
    return np.concatenate([t.reshape((-1,) + shape) for t in tiles]).astype(np.uint8, copy=False)


def _pack_labels(y: np.ndarray, num_classes: int) -> bytes:
    width = base.index_width(num_classes)
    return np.asarray(base.pack_codes(jnp.asarray(y, jnp.uint32), width)).tobytes()


def _unpack_labels(labels: bytes, count: int, num_classes: int) -> np.ndarray:
    width = base.index_width(num_classes)
    packed = np.frombuffer(labels, np.dtype(base.code_dtype(width)))
    return np.asarray(base.unpack_codes(jnp.asarray(packed), width, count), np.int32)


# ----------------------------------------------------------------------------------------------
# Floors.


def encode_floor(x: np.ndarray, y: np.ndarray, meta: FloorMeta) -> FloorPayload:
    """Code one node's values ``x`` (the shard, or its uint8 levels) and labels ``y`` as ``meta`` says."""
    if np.dtype(x.dtype).name != meta.dtype or tuple(x.shape[1:]) != tuple(meta.sample_shape):
        raise ValueError(f"values of shape {x.shape} and dtype {x.dtype} do not match the floor's samples "
                         f"{meta.sample_shape} of {meta.dtype}")
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"a floor needs at least one sample and a label for each, got {x.shape[0]} samples and "
                         f"{y.shape[0]} labels")
    return FloorPayload(data=_encode_values(x, meta.coder, meta.layout), labels=_pack_labels(y, meta.num_classes),
                        meta=meta)


def floor_payloads(dataset: Dataset, index, count, coder: str, bits: int | None = None, *,
                   rounding: str = "nearest", layout: str = "stack", seed: int = 0) -> list[FloorPayload]:
    """Every node's floor: its shard (``bits=None``) or its B-bit levels, coded by ``coder``.

    Args:
      dataset: the :class:`~qdata.data.Dataset` the nodes' rows index.
      index, count: the nodes (``NodeData.index``, ``NodeData.counts`` of :func:`qdata.data.stack_nodes`).
      coder: one of :data:`CODERS`.
      bits: None for the lossless floor, or B in 1..8 for the quantized one.
      rounding: the quantizer, "nearest" or "stochastic" (see the module docstring); unused when
        ``bits`` is None.
      layout: one of :data:`LAYOUTS`.
      seed: stochastic rounding's key is ``fold_in(PRNGKey(seed), i)`` at node i.

    Returns:
      One :class:`FloorPayload` per node; :func:`floor_bits` counts it.

    Raises:
      ValueError: an unknown coder, layout or rounding, bits outside None or 1..8, or an image coder
        given samples that are not 8-bit grey or RGB images.
    """
    coder, layout, bits = _check_coder(coder), _check_layout(layout), _check_level_bits(bits)
    rounding = _check_rounding(rounding) if bits is not None else None
    quantized = bits is not None
    lo, hi = dataset.value_range if quantized else (None, None)
    dtype = "uint8" if quantized else np.dtype(dataset.x_train.dtype).name
    meta = FloorMeta(coder, layout, dataset.sample_shape, dtype, bits, rounding, lo, hi, dataset.num_classes)
    reason = cannot_code(dataset, coder, bits)
    if reason:
        raise ValueError(reason)
    payloads = []
    for i, (x, y) in enumerate(node_shards(dataset, index, count)):
        if quantized:
            # The padded row of ``index`` gives every node the same shape, hence one compilation;
            # the padding's levels are dropped.
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            padded = dataset.x_train[np.asarray(index)[i]]
            x = quantize_levels(dataset, padded, bits, rounding, key)[: x.shape[0]]
        payloads.append(encode_floor(x, y, meta))
    return payloads


def decode_floor(payload: FloorPayload) -> tuple[np.ndarray, np.ndarray]:
    """What the learner reads off a floor: ``(x, y)``, the shard in its stored dtype (lossless) or
    the uint8 levels (quantized), and the int32 labels."""
    x = _decode_values(payload.data, payload.meta)
    return x, _unpack_labels(payload.labels, x.shape[0], payload.meta.num_classes)


def floor_bits(payload: FloorPayload) -> dict[str, int]:
    """Exact bits of a floor: 8 times the coded bytes. Returns ``{"data", "labels", "total"}``."""
    data = 8 * sum(len(chunk) for chunk in payload.data)
    labels = 8 * len(payload.labels)
    return {"data": data, "labels": labels, "total": data + labels}


def floor_bits_per_node(payloads: Sequence[FloorPayload]) -> np.ndarray:
    """(num_nodes,) int64: each node's total floor bits (:func:`floor_bits`)."""
    return np.array([floor_bits(p)["total"] for p in payloads], np.int64)


# ----------------------------------------------------------------------------------------------
# The learner trains centrally on what it received.


def _dequantized(dataset: Dataset, levels: np.ndarray, meta: FloorMeta) -> tuple[np.ndarray, np.ndarray, float]:
    """(x_train, x_test, x_divisor) holding ``lo + Delta level`` for training, the test split as before.

    uint8 levels times an integer k keep the dataset's uint8 storage and divisor when that is exact
    (``lo = 0`` and ``k = x_divisor (hi - lo) / (2^B - 1)`` an integer, as for 8-bit images at
    B = 1, 2, 4, 8: k = 255, 85, 17, 1); otherwise both splits become float32 values.
    """
    top = (1 << meta.bits) - 1
    lo, hi = meta.lo, meta.hi
    if dataset.x_train.dtype == np.uint8 and lo == 0.0:
        k = dataset.x_divisor * (hi - lo) / top
        if float(k).is_integer() and k * top <= 255:
            return (levels * np.uint8(k)).astype(np.uint8), dataset.x_test, dataset.x_divisor
    values = (lo + levels.astype(np.float64) * ((hi - lo) / top)).astype(np.float32)
    return values, dataset.to_float(dataset.x_test), 1.0


def central_dataset(dataset: Dataset, payloads: Sequence[FloorPayload]) -> Dataset:
    """The dataset the learner holds after every node sent its floor: the decoded shards, node after
    node, as the training set; the test split, classes and range unchanged.

    Lossless: the nodes' rows as stored (a permutation of the training set when the nodes hold all
    of it). Quantized: the values ``lo + Delta level`` (within a float32 ulp of qdata's quantizer
    decode), stored as uint8 with the dataset's divisor where exact, else float32 (test split too).

    Args:
      dataset: the dataset the floors were made from (its test split is kept).
      payloads: one floor per node, all with the same :class:`FloorMeta`.

    Returns:
      A :class:`~qdata.data.Dataset` named after the floor, e.g. ``"digits, 4-bit nearest floor"``.
    """
    if not payloads:
        raise ValueError("central_dataset needs the floor of at least one node")
    meta = payloads[0].meta
    if any(p.meta != meta for p in payloads):
        raise ValueError("the floors differ in coder, layout, quantizer or samples; pass one floor per node")
    if tuple(meta.sample_shape) != dataset.sample_shape or meta.num_classes != dataset.num_classes:
        raise ValueError(f"the floors hold samples {meta.sample_shape} of {meta.num_classes} classes, the dataset "
                         f"{dataset.sample_shape} of {dataset.num_classes}")
    decoded = [decode_floor(p) for p in payloads]
    x = np.concatenate([d[0] for d in decoded])
    y = np.concatenate([d[1] for d in decoded])
    if meta.bits is None:
        return dataclasses.replace(dataset, x_train=x, y_train=y, name=f"{dataset.name}, lossless floor",
                                   source=f"decoded {meta.coder} floors of {dataset.source or dataset.name}")
    x_train, x_test, divisor = _dequantized(dataset, x, meta)
    return dataclasses.replace(dataset, x_train=x_train, y_train=y, x_test=x_test, x_divisor=divisor,
                               name=f"{dataset.name}, {meta.bits}-bit {meta.rounding} floor",
                               source=f"decoded {meta.coder} floors of {dataset.source or dataset.name}")


def floor_rows(dataset: Dataset, index, count, *, bits: Sequence[int | None] = (None, 4),
               coders: Sequence[str] = CODERS, rounding: str = "nearest", layout: str = "stack",
               seed: int = 0) -> list[dict]:
    """The floors for a comparison table: one JSON-ready row per (B, coder).

    Each row: ``{"bits": B or None, "rounding", "coder", "layout", "bits_per_node": [...],
    "data_bits_per_node": [...], "label_bits_per_node": [...], "mean_bits_per_node", "best": bool}``;
    ``best`` marks the coder with the smallest mean at each B. A coder that cannot code the data
    (:func:`cannot_code`: an image coder on float32 data, lossless, or on samples that are not images)
    is left out.
    """
    rows = []
    for b in bits:
        group = []
        for coder in coders:
            if cannot_code(dataset, coder, b):
                continue
            payloads = floor_payloads(dataset, index, count, coder, b, rounding=rounding, layout=layout, seed=seed)
            counted = [floor_bits(p) for p in payloads]
            group.append({"bits": b, "rounding": rounding if b is not None else None, "coder": coder,
                          "layout": layout, "bits_per_node": [c["total"] for c in counted],
                          "data_bits_per_node": [c["data"] for c in counted],
                          "label_bits_per_node": [c["labels"] for c in counted],
                          "mean_bits_per_node": float(np.mean([c["total"] for c in counted]))})
        best = min(r["mean_bits_per_node"] for r in group)
        rows += [dict(r, best=r["mean_bits_per_node"] == best) for r in group]
    return rows
