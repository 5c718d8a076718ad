"""What crosses a link: the payload, its exact bits, and the two codec shapes that produce one.

Every message in qdata is a :class:`Payload`: a pytree of *packed* arrays (uint8/uint16/uint32 codes,
fp16/fp32 scalars) exactly as they would be put on the wire, plus static metadata that both sides know
in advance (shapes, dtypes, the tree structure of the model) and that is therefore never counted.
The bit count of a payload is read off the arrays' own sizes (``size * itemsize * 8``), never from a
formula, so the ledger cannot drift from what the code actually sends.

Two codec shapes, in the optax style (a factory returns a NamedTuple of pure functions):

* :class:`Quantizer` for data samples: ``encode(key, x) -> Payload`` with ``x`` of shape
  ``(b, *sample_shape)`` (samples on the leading axis), ``decode(payload) -> x_hat`` and
  ``bits(payload, mask=None)`` (a Python int, or with a mask a :class:`ledger.Bits`). Per-sample
  arrays live in ``payload.rows`` (leading axis b), so a gate that sends only some samples is
  charged only for their rows. (A stateful data codec, the shape the estimator composes, is
  :class:`qdata.codecs.data_codec.DataCodec`; :func:`~qdata.codecs.data_codec.from_quantizer` turns a
  Quantizer into one.)
* :class:`Compressor` for vectors and pytrees of parameters (the correction term, gradient
  compression): ``init(params) -> state``, ``encode(key, tree, state) -> (payload, state)``,
  ``decode(payload) -> tree`` and ``bits(payload)``. Stateless compressors use :class:`EmptyState`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs.ledger import Bits

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any


@struct.dataclass
class Payload:
    """A message as it crosses the link.

    Attributes:
      arrays: per-message arrays that are sent (dict of packed arrays).
      rows: per-sample arrays that are sent, each with the sample axis first; under a gate only the
        rows of transmitted samples count.
      meta: static metadata known to both sides before the message (shapes, dtypes, tree structure,
        hyper-parameters). Never sent, never counted. Must be hashable.
      info: local diagnostics of the encoder (e.g. how many values were clipped). Never sent, never
        counted; the decoder must not read it.
    """

    arrays: dict = struct.field(default_factory=dict)
    rows: dict = struct.field(default_factory=dict)
    meta: Any = struct.field(pytree_node=False, default=None)
    info: dict = struct.field(default_factory=dict)


def array_bits(x) -> int:
    """Exact bits of one packed array as sent: ``size * itemsize * 8`` (a static Python int)."""
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize * 8


def payload_bits(payload: Payload, mask: Array | None = None):
    """Exact uplink bits of ``payload``.

    Args:
      payload: the message (its arrays may be ``jax.ShapeDtypeStruct``: only shapes are read).
      mask: optional 0/1 vector over the sample axis of ``payload.rows``; only rows with mask 1 are
        counted (a gated message). Leading batch axes (e.g. from ``vmap`` over nodes) are not
        supported here: count per node, inside the vmap.

    Returns:
      A Python int when ``mask`` is None (sizes are static); else a :class:`ledger.Bits`, the static
      bits of ``payload.arrays`` plus the number of rows sent times the static bits of one row, so
      that no int32 product is formed (4,096 ImageNet samples at 4 bits exceed 2^31 bits).
    """
    fixed = sum(array_bits(a) for a in jax.tree_util.tree_leaves(payload.arrays))
    row_leaves = jax.tree_util.tree_leaves(payload.rows)
    if mask is None:
        return fixed + sum(array_bits(a) for a in row_leaves)
    per_row = sum(array_bits(a) // a.shape[0] for a in row_leaves)
    sent = jnp.sum(jnp.asarray(mask) > 0, dtype=jnp.int32)
    return Bits.of(fixed) + Bits.count(sent, per_row)


@struct.dataclass
class Sent:
    """A message that crosses only where ``sent`` is 1: a schedule both ends know in advance (the
    turns of sequential split learning, :mod:`qdata.methods.split`) says who sends in which round.

    Attributes:
      body: the message as it crosses when sent (a :class:`Payload` or a dict of them).
      sent: int32 scalar, 1 if it crosses this round, 0 if not. Framing, like a stream's count: a
        message arrives or does not, so the flag itself is not charged; the body's bits count only
        where it is 1 (``Bits.times``), and a receiver reads the body only then.
    """

    body: Any
    sent: Array


class Quantizer(NamedTuple):
    """A data-sample codec. ``encode(key, x)`` with samples on the leading axis of ``x``.

    ``unbiased`` says whether ``E[decode(encode(key, x))] = x`` for values inside the range;
    ``delta`` is the step ``Delta = (hi - lo) / (2^B - 1)`` of a dataset-wide range (None when the
    range is per sample and travels with the payload).
    """

    encode: Callable[[PRNGKey, Array], Payload]
    decode: Callable[[Payload], Array]
    bits: Callable[..., Any]
    unbiased: bool = False
    delta: float | None = None


class EmptyState(NamedTuple):
    """State of a stateless compressor."""


class Compressor(NamedTuple):
    """A vector/pytree codec with optional state (warm starts, error memory).

    ``init(params) -> state``; ``encode(key, tree, state) -> (payload, new_state)``;
    ``decode(payload) -> tree`` with the structure, shapes and dtypes of the encoded tree;
    ``bits(payload) -> int``. ``unbiased`` says whether ``E[decode(encode(key, x))] = x``.
    """

    init: Callable[[PyTree], PyTree]
    encode: Callable[[PRNGKey, PyTree, PyTree], tuple[Payload, PyTree]]
    decode: Callable[[Payload], PyTree]
    bits: Callable[[Payload], int]
    unbiased: bool = False
    # Relative variance bound of an unbiased compressor as a function of d:
    # E||C(x) - x||^2 <= omega(d) * ||x||^2. None where no bound is claimed (biased compressors).
    omega: Callable[[int], float] | None = None
