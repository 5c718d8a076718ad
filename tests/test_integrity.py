"""Payload integrity (issue 12, item 2): every message sealed behind a 96-bit header, checked by the
learner; corrupted and truncated messages never reach the model, clean ones all pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdata import faults as qfaults
from qdata import integrity
from qdata import results as qresults
from qdata.codecs import compressors
from qdata.codecs.ledger import Bits
from qdata.config import RunConfig
from qdata.run import final_params, train

NAME = "gradient"


def _message():
    """A top-k message of a small tree: fp32 values, packed indices."""
    tree = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), "b": jnp.arange(5.0)}
    comp = compressors.topk(7)
    payload, _ = comp.encode(jax.random.PRNGKey(0), tree, comp.init(tree))
    return payload, Bits.of(comp.bits(payload))


def _check(sealed, ident, bits):
    return integrity.verify(sealed, ident, lambda m: bits)


def test_a_clean_message_passes_and_its_header_is_96_bits():
    message, bits = _message()
    ident = integrity.identity(message, NAME)
    sealed = integrity.seal(message, ident, bits)
    assert bool(_check(sealed, ident, bits))
    assert integrity.header_bits(sealed).total() == integrity.HEADER_BITS == 96
    other = integrity.identity(compressors.qsgd(4).encode(jax.random.PRNGKey(0), {"w": jnp.ones(3)}, ())[0], NAME)
    assert other != ident  # another codec, another identity
    assert not bool(_check(sealed, other, bits))


def test_every_single_bit_flip_of_header_or_body_is_caught():
    message, bits = _message()
    ident = integrity.identity(message, NAME)
    sealed = integrity.seal(message, ident, bits)
    leaves = jax.tree_util.tree_leaves((sealed.header, sealed.body))
    widths = [np.dtype(leaf.dtype).itemsize * 8 for leaf in leaves]
    flips = [(offset + e, b) for offset, leaf, w in zip(np.cumsum([0] + [x.size for x in leaves]), leaves, widths)
             for e in range(leaf.size) for b in range(w)]
    at, bit = (jnp.asarray(v, jnp.int32) for v in zip(*flips))

    @jax.jit
    @jax.vmap
    def accepted(at, bit):
        damaged = qfaults._flip(leaves, at, bit)
        header, body = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure((sealed.header, sealed.body)), damaged)
        return _check(integrity.Sealed(header, body, sealed.arrived), ident, bits)

    result = np.asarray(accepted(at, bit))
    assert len(flips) > 300 and not result.any(), f"{int(result.sum())} of {len(flips)} flips passed"


def test_a_truncated_message_is_rejected_wherever_it_is_cut():
    message, bits = _message()
    ident = integrity.identity(message, NAME)
    sealed = integrity.seal(message, ident, bits)
    leaves = jax.tree_util.tree_leaves((sealed.header, sealed.body))
    total = sum(leaf.size for leaf in leaves)

    @jax.jit
    @jax.vmap
    def accepted(keep):
        cut, lost = qfaults._cut(leaves, keep)
        header, body = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure((sealed.header, sealed.body)), cut)
        return _check(integrity.Sealed(header, body, sealed.arrived - lost), ident, bits)

    assert not np.asarray(accepted(jnp.arange(total))).any()


def test_host_wire_format_refuses_truncated_foreign_and_corrupted_bytes():
    message, _ = _message()
    data = integrity.to_bytes(message, NAME)
    back = integrity.from_bytes(data, message, NAME)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(message)):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="truncated"):
        integrity.from_bytes(data[:-3], message, NAME)
    with pytest.raises(ValueError, match="shorter than the 12-byte header"):
        integrity.from_bytes(data[:5], message, NAME)
    with pytest.raises(ValueError, match="codec identity"):
        integrity.from_bytes(data, message, "sgd")
    flipped = bytearray(data)
    flipped[20] ^= 0x10
    with pytest.raises(ValueError, match="checksum mismatch"):
        integrity.from_bytes(bytes(flipped), message, NAME)


# The run level: 4 nodes, node 1's messages damaged on the link in about half the rounds.
RUN = dict(dataset="digits", model="logreg", num_nodes=4, batch_size=16, rounds=6, eval_every=3, checkpoint_every=6,
           seed=2, method="qdata", bits=4, gate="bernoulli", rho=0.5, correction="ef:topk:32", integrity=True)


def _final(tmp_path, label, **change):
    config = RunConfig(**{**RUN, **change})
    train(config, tmp_path / label)
    _, rounds = qresults.load(tmp_path / label)
    return final_params(tmp_path / label, config), rounds


def _gap(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# The drop and corrupt runs are two compiled programs, whose float sums XLA may fuse in another
# order: measured 3e-8 apart at most (a last bit of the weights). An applied corrupted message
# moves them by far more (the unchecked run below: a flipped bit of a code, a weight or a float).
SAME = 1e-6


def test_no_corrupted_or_truncated_update_reaches_the_model_and_clean_messages_all_pass(tmp_path):
    # drop:1:0.5 and corrupt:1:0.5 (each the first rule) hit the same rounds: a rejected message must
    # leave the run as if node 1 had sent nothing (up to the order of float sums, SAME).
    dropped, drop_rounds = _final(tmp_path, "drop", faults="drop:1:0.5")
    missed = 6 - drop_rounds[-1]["cumulative_answered_per_node"][1]
    assert 0 < missed < 6
    for kind in ("corrupt", "truncate"):
        params, rounds = _final(tmp_path, kind, faults=f"{kind}:1:0.5")
        assert rounds[-1]["cumulative_rejected_per_node"] == [0, missed, 0, 0]
        assert rounds[-1]["cumulative_answered_per_node"] == [6, 6 - missed, 6, 6]
        assert _gap(params, dropped) < SAME, kind
    # Clean messages: all pass; every message carries its 96-bit header, charged as its own part.
    clean, rounds = _final(tmp_path, "clean")
    assert rounds[-1]["cumulative_rejected_per_node"] == [0] * 4
    assert rounds[-1]["cumulative_answered_per_node"] == [6] * 4
    assert rounds[-1]["cumulative_uplink_bits"]["integrity"] == 96 * 4 * 6
    plain, plain_rounds = _final(tmp_path, "plain", integrity=False)
    assert "integrity" not in plain_rounds[-1]["cumulative_uplink_bits"]
    assert (rounds[-1]["cumulative_uplink_bits"]["total"] - plain_rounds[-1]["cumulative_uplink_bits"]["total"]
            == 96 * 4 * 6)
    for a, b in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the same updates (summed in another order)
    # The negative control: without the check, the corrupted messages reach the model.
    damaged, _ = _final(tmp_path, "unchecked", faults="corrupt:1:0.5", integrity=False)
    assert _gap(damaged, dropped) > 1000 * SAME and _gap(damaged, plain) > 1000 * SAME
