"""Payload integrity: a header on every message, checked by the learner before it applies one.

Issue 12 item 2. A sealed message is the method's message (its packed payloads, unchanged) behind a
header of :data:`HEADER_WORDS` uint32 words, sent first and charged in the ledger as its own part
``'integrity'`` (read off the header payload: 3 x 32 = 96 bits a message):

1. the codec's identity: CRC-32 of the method's name and the message's static structure (its
   pytree with every codec's static metadata: kind, bits, range, sizes; every leaf's shape and
   dtype), so a message of another codec or other parameters is refused;
2. the declared length: the message's exact uplink bits (:class:`~qdata.codecs.ledger.Bits`),
   mod 2^32; the learner compares it with the bits that arrived and with the bits it reads off the
   message it received (a flipped count or bitmap changes those);
3. a checksum: a 32-bit hash of the two words above and of every element of every leaf, each
   element's word keyed by its position, ``sum_k mix(w_k ^ mix(k phi))`` mod 2^32 with ``mix``
   the bijective lowbias32 mixer of :mod:`qdata.codecs.randomness`. One changed element changes
   exactly one term (``mix`` is a bijection), so a single bit flip is always caught; other damage
   passes with probability about 2^-32. It is computed under ``jit`` in O(size), in parallel (not
   CRC-32, whose bytewise recurrence is sequential).

The learner also checks every :class:`~qdata.codecs.streams.Stream`'s count against its room. A
message that fails any check is rejected: not applied, counted in the results, and NACKed to its
node (which then keeps its state, as if it had not sent; the engine charges the 1-bit acknowledgement
per node and round as downlink, :data:`ACK_BITS`).

On the host, :func:`to_bytes` and :func:`from_bytes` write and read the same wire format (header,
then each leaf's bytes in tree order, little-endian; no pickle), refusing a truncated, foreign or
corrupted message with a ValueError that says which check failed.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdata.codecs.ledger import Bits
from qdata.codecs.payloads import Payload, payload_bits
from qdata.codecs.randomness import _WEYL, _mix32
from qdata.codecs.streams import Stream

HEADER_WORDS = 3
HEADER_BITS = 32 * HEADER_WORDS
ACK_BITS = 1  # the learner's accept / reject, per node and round


@struct.dataclass
class Sealed:
    """A message behind its header. ``header`` and ``body`` cross the link; ``arrived`` is the
    receiving end's own count of the bits that came in (mod 2^32), never sent, never charged."""

    header: Payload
    body: Any
    arrived: jax.Array


def identity(message, name: str) -> int:
    """The static identity word of ``message``'s codec (module docstring, word 1)."""
    leaves, treedef = jax.tree_util.tree_flatten(message)
    shapes = [(tuple(leaf.shape), np.dtype(leaf.dtype).str) for leaf in leaves]
    # Object addresses in a repr differ between processes; the structure does not.
    text = re.sub(r"0x[0-9a-fA-F]+", "", f"{name}|{treedef}|{shapes}")
    return zlib.crc32(text.encode())


def bits_mod32(bits: Bits) -> jax.Array:
    """``bits`` mod 2^32 as a uint32 scalar (each count times its unit in wrapping uint32)."""
    total = jnp.uint32(0)
    for count, unit in zip(bits.counts, bits.units):
        total = total + jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(unit % 2**32)
    return total


def _words(leaf) -> jax.Array:
    """Each element of ``leaf`` as one uint32 word (its bits, zero-extended)."""
    leaf = jnp.asarray(leaf)
    if leaf.dtype == bool:
        return leaf.astype(jnp.uint32).reshape(-1)
    width = np.dtype(leaf.dtype).itemsize * 8
    if width > 32:
        raise ValueError(f"integrity: leaves of at most 32-bit elements are sealed, got {leaf.dtype}")
    return jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{width}")).reshape(-1).astype(jnp.uint32)


def checksum(leaves: list) -> jax.Array:
    """The position-keyed 32-bit hash of the leaves' elements laid end to end (module docstring)."""
    total, offset = jnp.uint32(0), 0
    for leaf in leaves:
        words = _words(leaf)
        position = jax.lax.iota(jnp.uint32, words.size) + jnp.uint32(offset % 2**32)
        total = total + jnp.sum(_mix32(words ^ _mix32(position * jnp.uint32(_WEYL))), dtype=jnp.uint32)
        offset += words.size
    return total


def seal(message, ident: int, bits: Bits) -> Sealed:
    """``message`` behind its header, given its identity and exact uplink ``bits``."""
    head = jnp.stack([jnp.uint32(ident), bits_mod32(bits)])
    check = checksum([head] + jax.tree_util.tree_leaves(message))
    header = Payload(arrays={"words": jnp.concatenate([head, check[None]])})
    return Sealed(header, message, bits_mod32(bits) + jnp.uint32(HEADER_BITS))


def header_bits(sealed: Sealed) -> Bits:
    """The header's bits, read off its payload (the ledger's ``'integrity'`` part)."""
    return Bits.of(payload_bits(sealed.header))


def _counts_in_range(message) -> jax.Array:
    ok = jnp.bool_(True)
    for node in jax.tree_util.tree_leaves(message, is_leaf=lambda n: isinstance(n, Stream)):
        if isinstance(node, Stream):
            ok = ok & (node.count >= 0) & (node.count <= node.meta.length)
    return ok


def verify(sealed: Sealed, ident: int, bits_of) -> jax.Array:
    """bool: whether the learner accepts ``sealed`` (every check of the module docstring).

    Args:
      ident: the identity the learner expects (:func:`identity` of its own template).
      bits_of: ``message -> Bits``, the exact bits the learner reads off the message received.
    """
    words = sealed.header.arrays["words"]
    declared = words[1]
    ok = (words[0] == jnp.uint32(ident)) & (sealed.arrived == declared + jnp.uint32(HEADER_BITS))
    ok = ok & _counts_in_range(sealed.body)
    ok = ok & (bits_mod32(bits_of(sealed.body)) == declared)
    return ok & (checksum([words[:2]] + jax.tree_util.tree_leaves(sealed.body)) == words[2])


# ----------------------------------------------------------------------------------------------
# The same wire format on the host.


def to_bytes(message, name: str) -> bytes:
    """``message`` (host or device arrays) as sent: the header, then each leaf's bytes. The
    declared length here is the body's byte length (every element sent), mod 2^32."""
    leaves = [np.ascontiguousarray(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(message)]
    body = b"".join(leaf.astype(leaf.dtype.newbyteorder("<")).tobytes() for leaf in leaves)
    head = np.asarray([identity(message, name), (8 * len(body)) % 2**32], np.uint32)
    check = np.uint32(checksum([head] + leaves))
    return np.concatenate([head, [check]]).astype("<u4").tobytes() + body


def from_bytes(data: bytes, template, name: str):
    """Read :func:`to_bytes`' output back into ``template``'s structure (shapes, dtypes, static
    metadata); a ValueError says which check failed: too short, codec identity, length, checksum."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"integrity: a message is bytes, got {type(data).__name__}")
    if len(data) < 4 * HEADER_WORDS:
        raise ValueError(f"integrity: {len(data)} bytes is shorter than the {4 * HEADER_WORDS}-byte header "
                         "(a truncated message)")
    ident, declared, check = (int(w) for w in np.frombuffer(data[:4 * HEADER_WORDS], "<u4"))
    expected = identity(template, name)
    if ident != expected:
        raise ValueError(f"integrity: codec identity {ident:#010x}, expected {expected:#010x} for {name!r} "
                         "(a message of another codec, other parameters or shapes)")
    body = data[4 * HEADER_WORDS:]
    if (8 * len(body)) % 2**32 != declared:
        raise ValueError(f"integrity: the header declares {declared} bits, {8 * len(body)} arrived "
                         "(a truncated or padded message)")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    out, at = [], 0
    for leaf in leaves:
        dtype = np.dtype(leaf.dtype)
        size = int(np.prod(leaf.shape, dtype=np.int64)) * dtype.itemsize
        out.append(np.frombuffer(body[at:at + size], dtype.newbyteorder("<")).astype(dtype).reshape(leaf.shape))
        at += size
    if at != len(body):
        raise ValueError(f"integrity: the body has {len(body)} bytes, {name!r}'s message has {at}")
    if int(checksum([np.asarray([ident, declared], np.uint32)] + out)) != check:
        raise ValueError("integrity: checksum mismatch (the message was corrupted on the link)")
    message = jax.tree_util.tree_unflatten(treedef, out)
    if not bool(_counts_in_range(message)):
        raise ValueError("integrity: a stream's count is out of its range")
    return message
