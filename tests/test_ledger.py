"""The bit ledger (qdata.codecs.ledger.Bits): exact counts at ImageNet and d = 10^9 scales, under jit,
vmap and scan, with no 64-bit integer on device and no large array allocated (the payloads at scale
are abstract, from ``jax.eval_shape``: a count is read off shapes)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from qdata.codecs import base, ledger
from qdata.codecs.base import EmptyState, Payload
from qdata.codecs.compressors import fp32, qsgd
from qdata.codecs.ledger import Bits
from qdata.codecs.quantizers import per_sample_range, stochastic_rounding, subtractive_dither
from qdata.codecs.packing import code_dtype
from qdata.codecs.streams import Stream, StreamMeta, stream_bits
from qdata.methods.qdata import qdata_estimator
from qdata.gate import bernoulli_gate
from qdata.methods import sgd
from qdata.methods.gradient import gradient_compression

IMAGENET = (224, 224, 3)
N_IMAGENET = math.prod(IMAGENET)  # 150,528 coordinates
B_IMAGENET = 4096


def _abstract_imagenet_payload(quantizer):
    x = jax.ShapeDtypeStruct((B_IMAGENET,) + IMAGENET, jnp.float32)
    return jax.eval_shape(quantizer.encode, jax.random.key(0), x)


# ----------------------------------------------------------------------------------------------
# Arithmetic: exact Python-int sums.

_TERM = st.tuples(st.booleans(), st.integers(0, 2**31 - 1), st.integers(-(2**45), 2**45))


@given(terms=st.lists(_TERM, min_size=1, max_size=8), entries=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_sum_of_bits_is_the_python_int_sum(terms, entries, seed):
    rng = np.random.default_rng(seed)
    parts, expected = [], np.zeros(entries, object)
    for static, value, unit in terms:
        if static:  # a static size: the same for every entry
            parts.append(Bits.of(value * unit))
            expected = expected + value * unit
        else:  # a dynamic count of a static unit, one count per entry
            counts = rng.integers(0, value, entries, endpoint=True).astype(np.int32)
            parts.append(Bits.count(jnp.asarray(counts), unit))
            expected = expected + counts.astype(object) * unit
    got = sum(parts)  # 0 + Bits + ... : __radd__ with the int 0
    # Only dynamic counts carry the entries' axis (static ones broadcast, as under vmap).
    assert [int(v) for v in np.broadcast_to(got.per_entry(), (entries,))] == list(expected)
    if all(static for static, _, _ in terms):
        assert int(got) == expected[0]
    else:
        assert int(got) == got.total() == ledger.host_total(got) == sum(expected)
    head, rest = parts[0], sum(parts[1:], 0)
    entry = lambda bits: [int(v) for v in np.broadcast_to(bits.per_entry(), (entries,))]
    assert entry(got - rest) == entry(head) and entry(rest - got) == entry(-head)


def test_units_merge_and_the_structure_does_not_depend_on_the_order():
    a, b, c = Bits.count(jnp.int32(3), 8), Bits.of(100), Bits.count(jnp.int32(5), 8)
    left, right = (a + b) + c, c + (b + a)
    assert left.units == right.units == (8, 100)
    assert jax.tree_util.tree_structure(left) == jax.tree_util.tree_structure(right)
    assert int(left) == int(right) == 3 * 8 + 100 + 5 * 8
    # A zero part leaves no term behind, but a lone zero keeps one (so that it still has a shape).
    assert (a + 0).units == (8,) and Bits.of(0).units == (0,) and int(Bits.of(0)) == 0


def test_equality_is_by_value_and_needs_concrete_counts():
    five = Bits.of(5)
    assert five == 5 and five != 6 and five == Bits.count(jnp.int32(5), 1) == Bits.count(jnp.int32(1), 5)
    assert five != Bits.of(4)
    # The dataclass' field-wise __eq__ would say these differ (other counts, other units).
    assert Bits.count(jnp.int32(2), 3) == Bits.count(jnp.int32(3), 2)
    with pytest.raises(TypeError):
        hash(five)
    with pytest.raises(TypeError, match="host"):
        jax.jit(lambda n: int(Bits.count(n, 7)))(jnp.int32(1))


def test_a_count_that_is_not_a_count_is_refused():
    with pytest.raises(ValueError, match="int32"):
        Bits.count(np.asarray([2**31], np.int64), 1)  # a number of bits passed where a count belongs
    with pytest.raises(TypeError):
        Bits.count(jnp.float32(3.0), 8)
    with pytest.raises(TypeError):
        Bits.count(jnp.int32(3), 8.0)
    assert int(Bits.count(np.int64(2**31 - 1), 2**33)) == (2**31 - 1) * 2**33


def test_per_entry_falls_back_to_python_ints_beyond_int64():
    counts = np.full((3,), 2**31 - 1, np.int32)
    bits = Bits((counts, counts), (2**62, 2**40))
    want = (2**31 - 1) * (2**62 + 2**40)
    assert bits.per_entry().dtype == object and list(bits.per_entry()) == [want] * 3
    assert int(bits) == 3 * want
    assert list(Bits((np.zeros(2, np.int32),), (2**70,)).per_entry()) == [0, 0]  # a unit beyond int64
    small = Bits((counts,), (2**30,))
    assert small.per_entry().dtype == np.int64 and int(small.per_entry()[0]) == (2**31 - 1) * 2**30


# ----------------------------------------------------------------------------------------------
# jit, vmap over nodes, scan over rounds, and the host helpers the engine uses.


def test_jit_round_trip_keeps_the_exact_value():
    f = jax.jit(lambda n: Bits.count(n, 2**40) + Bits.of(7 * 2**33))
    got = f(jnp.int32(3))
    assert isinstance(got, Bits) and got.units == (7 * 2**33, 2**40)  # sorted
    assert int(got) == 3 * 2**40 + 7 * 2**33
    same = jax.jit(lambda b: b)(got)
    assert int(same) == int(got) and jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(got)


def test_vmap_broadcasts_static_counts_over_nodes():
    def one_node(mask):
        return {"data": Bits.count(jnp.sum(mask, dtype=jnp.int32), 3 * 2**30), "fixed": Bits.of(2**35)}

    masks = jnp.asarray([[1, 0, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0]], jnp.int32)
    bits = jax.jit(jax.vmap(one_node))(masks)
    assert bits["fixed"].shape == (4,) and all(np.shape(c) == (4,) for c in bits["fixed"].counts)
    np.testing.assert_array_equal(bits["data"].per_entry(), np.asarray([2, 0, 3, 1]) * 3 * 2**30)
    assert list(ledger.host_per_entry(bits["fixed"])) == [2**35] * 4
    assert int(bits["fixed"]) == 4 * 2**35
    assert int(bits["data"][2]) == 3 * 3 * 2**30  # indexing the node axis


def test_scan_over_rounds_and_the_cumulative_ledger():
    # The engine's shape: per round, vmap over nodes; the rounds stacked by scan; fetched; added.
    def one_round(carry, masks):
        def one_node(mask):
            parts = {"data": Bits.count(jnp.sum(mask, dtype=jnp.int32), 602112), "mask": Bits.of(4096)}
            parts["total"] = sum(parts.values())
            return parts
        return carry, jax.vmap(one_node)(masks)

    rounds, nodes = 3, 2
    masks = jnp.ones((rounds, nodes, 4096), jnp.int32)
    _, bits = jax.jit(lambda m: jax.lax.scan(one_round, 0, m))(masks)
    bits = jax.device_get(bits)
    assert bits["total"].shape == (rounds, nodes)
    per_node_round = 4096 * 602112 + 4096
    assert per_node_round > 2**31
    np.testing.assert_array_equal(ledger.host_per_entry(bits["total"]), np.full((rounds, nodes), per_node_round))
    cumulative = ledger.add_totals({}, bits)
    cumulative = ledger.add_totals(cumulative, bits)
    assert cumulative == {"data": 2 * rounds * nodes * 4096 * 602112, "mask": 2 * rounds * nodes * 4096,
                          "total": 2 * rounds * nodes * per_node_round}
    assert all(type(v) is int for v in cumulative.values())


def test_as_float_is_a_device_approximation():
    bits = jax.jit(lambda n: (Bits.count(n, 602112) + 32).as_float())(jnp.int32(4096))
    assert bits.dtype == jnp.float32
    np.testing.assert_allclose(float(bits), 4096 * 602112 + 32, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Exact at scale: 4,096 ImageNet samples, d = 10^9.


@pytest.mark.parametrize("make, extra_per_row, extra_fixed", [
    (lambda: stochastic_rounding(4, 0.0, 1.0), 0, 0),
    (lambda: subtractive_dither(4, 0.0, 1.0), 0, 32),  # the shared dither's seed
    (lambda: per_sample_range(4), 32, 0),  # fp16 lo and hi per sample
])
def test_imagenet_batch_at_4_bits_exceeds_int32_and_is_exact(make, extra_per_row, extra_fixed):
    q = make()
    payload = _abstract_imagenet_payload(q)
    per_row = N_IMAGENET * 4 + extra_per_row
    want = B_IMAGENET * per_row + extra_fixed
    assert want > 2**31  # an int32 product would have wrapped (negative, here)
    assert q.bits(payload) == want  # no mask: a static Python int
    ones = jnp.ones((B_IMAGENET,), jnp.float32)
    masked = q.bits(payload, ones)
    assert isinstance(masked, Bits) and int(masked) == want and masked == want
    # Under jit (the payload's shapes are static, closed over), and vmapped over two nodes.
    jitted = jax.jit(lambda m: base.payload_bits(payload, m))(ones)
    assert int(jitted) == want
    nodes = jax.jit(jax.vmap(lambda m: base.payload_bits(payload, m)))(jnp.stack([ones, ones.at[1:].set(0)]))
    np.testing.assert_array_equal(nodes.per_entry(), [want, per_row + extra_fixed])


def test_fp32_sgd_at_a_billion_parameters_is_32e9_bits():
    d = 10**9
    tree = {"embed": jax.ShapeDtypeStruct((50_000, 10_000), jnp.float32),
            "rest": jax.ShapeDtypeStruct((d - 50_000 * 10_000,), jnp.float32)}
    payload, _ = jax.eval_shape(fp32().encode, jax.random.key(0), tree, EmptyState())
    method = sgd(lambda p, x, y: jnp.zeros(x.shape[0]))
    bits = method.uplink_bits(payload)
    assert int(bits["total"]) == int(bits["gradient"]) == 32 * d == 32_000_000_000
    # Traceable: under eval_shape the ledger is a few int32 scalars, not a d-sized anything.
    abstract = jax.eval_shape(method.uplink_bits, payload)
    assert all(leaf.shape == () and leaf.dtype == jnp.int32 for leaf in jax.tree_util.tree_leaves(abstract))
    # A fixed-length compressor at the same d: the count formula of qdata.codecs.compressors.
    payload, _ = jax.eval_shape(qsgd(4).encode, jax.random.key(0), tree, EmptyState())
    got = gradient_compression(lambda p, x, y: jnp.zeros(x.shape[0]), qsgd(4)).uplink_bits(payload)
    bucket = payload.arrays["norms"].shape[0]
    assert int(got["total"]) == 32 * bucket + 8 * math.ceil(d * (1 + math.ceil(math.log2(5))) / 8)


def _imagenet_estimator(gate=None):
    kwargs = {} if gate is None else {"gate": gate}

    def loss_fn(params, x, y):  # only traced (abstractly) for the gate's scores
        return jnp.mean(x.reshape(x.shape[0], -1), axis=1) * params["w"][0] + 0.0 * y

    est = qdata_estimator(loss_fn, per_sample_range(4), num_classes=1000, **kwargs)
    batch = {"x": jax.ShapeDtypeStruct((B_IMAGENET,) + IMAGENET, jnp.float32),
             "y": jax.ShapeDtypeStruct((B_IMAGENET,), jnp.int32)}
    params = {"w": jnp.ones((1,))}
    message, _ = jax.eval_shape(est.node_message, jax.random.key(0), params, batch, est.init(params))
    return est, message


def _with_label_count(message, sent):
    # The label stream carries its count (how many labels it sends): the one value of it the ledger reads.
    stream = message.samples["y"]
    return message.replace(samples={**message.samples, "y": stream.replace(count=jnp.int32(sent))})


def test_estimator_ledger_at_imagenet_scale():
    est, message = _imagenet_estimator()  # no gate: every sample sent, the codes' count needs no values
    bits = est.uplink_bits(_with_label_count(message, B_IMAGENET))
    assert int(bits["data"]) == B_IMAGENET * N_IMAGENET * 4 > 2**31
    assert int(bits["metadata"]) == B_IMAGENET * 32
    assert int(bits["labels"]) == 8 * math.ceil(B_IMAGENET * 10 / 8)  # ceil(log2 1000) = 10 bits
    assert int(bits["total"]) == sum(int(v) for k, v in bits.items() if k != "total")


def test_gated_estimator_ledger_at_imagenet_scale():
    # The codes stay abstract (their count is their shape); only the b-bit bitmap and the label
    # stream's count, which the ledger reads, are made concrete: 4,000 of the 4,096 samples sent.
    est, message = _imagenet_estimator(bernoulli_gate(0.5))
    sent = 4000
    mask = np.zeros(B_IMAGENET, bool)
    mask[np.random.default_rng(0).choice(B_IMAGENET, sent, replace=False)] = True
    bitmap = base.pack_codes(jnp.asarray(mask, jnp.uint32), 1)
    message = _with_label_count(message.replace(mask=Payload(arrays={"bitmap": bitmap})), sent)
    bits = est.uplink_bits(message)
    want = {"data": sent * N_IMAGENET * 4, "metadata": sent * 32, "weights": sent * 16,
            "labels": 8 * math.ceil(sent * 10 / 8), "mask": B_IMAGENET, "correction": 0}
    assert want["data"] > 2**31
    assert {k: int(v) for k, v in bits.items() if k != "total"} == want
    assert int(bits["total"]) == sum(want.values())


@given(count=st.integers(0, 2**31 - 1), width=st.sampled_from([1, 2, 3, 5, 7, 10, 13, 16, 31, 32]))
def test_stream_prefix_is_exact_for_any_count(count, width):
    word = {8: 8, 16: 16, 32: 32}.get(width, 8)
    want = -(-count * width // word) * word
    got = stream_bits(_stream(count, width))
    assert isinstance(got, Bits) and int(got) == want
    assert int(jax.jit(stream_bits)(_stream(count, width))) == want


def _stream(count, width):
    # Its bits are read off its count and its container's word (the values themselves are not read).
    return Stream(jnp.zeros((1,), code_dtype(width)), jnp.int32(count), StreamMeta(max(count, 1), width))


def test_stream_prefix_of_a_billion_labels():
    # 2^30 labels of 10 bits: the product count * width leaves int32, the word count does not.
    assert int(stream_bits(_stream(2**30, 10))) == 2**30 * 10
    assert int(stream_bits(_stream(2**31 - 1, 32))) == (2**31 - 1) * 32
    # Hypothesis's find: 1,321,528,399 positions of 13 bits fill 2,147,483,649 bytes, one past int32.
    assert int(stream_bits(_stream(1_321_528_399, 13))) == 17_179_869_192
