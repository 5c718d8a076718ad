"""Tests of qdata.estimator: unbiasedness, the bias bound without correction, the bit ledger, jit/vmap.

The model throughout is a small flax MLP, 8 inputs -> 16 tanh units -> 10 logits (314 parameters),
with softmax cross-entropy; inputs live in the box [0, 1]^8, the range of the dataset-wide quantizers.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from qdata.codecs.compressors import fp32, qsgd, randk
from qdata.codecs.quantizers import nearest_rounding, per_sample_range, stochastic_rounding, subtractive_dither
from qdata.estimator import NodeMessage, full_gradient
from qdata.gate import bernoulli_gate, no_gate, top_fraction_gate
from qdata.methods.qdata import qdata_estimator
from tests.one_node import node_gradient, one_node_gradient

N_IN, HIDDEN, CLASSES, B = 8, 16, 10, 16


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(HIDDEN, name="hidden")(x))
        return nn.Dense(CLASSES, name="head")(h)


MODEL = MLP()


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply(params, x), y)


@pytest.fixture(scope="module")
def problem():
    x = jax.random.uniform(jax.random.key(0), (B, N_IN))
    y = jax.random.randint(jax.random.key(1), (B,), 0, CLASSES)
    params = MODEL.init(jax.random.key(2), x)
    return params, {"x": x, "y": y}


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def gradient_draws(est, params, batch, draws, seed=7):
    """g_i(node_message(key)) for `draws` keys, flattened: (draws, d)."""
    state = est.init(params)

    def one(key):
        message, _ = est.node_message(key, params, batch, state)
        return ravel_pytree(node_gradient(est, params, message))[0]

    keys = jax.random.split(jax.random.key(seed), draws)
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def max_standard_score(draws, reference):
    """max over coordinates of |mean - reference| / standard error (coordinates with spread only)."""
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
    spread = se > 1e-7 * np.abs(reference).max()
    assert spread.sum() > 0.9 * reference.size  # the statistic looks at (almost) every coordinate
    exact = np.abs(mean - reference)[~spread]
    assert np.all(exact <= 1e-5 * np.abs(reference).max())  # zero-variance coordinates must be exact
    return np.max(np.abs(mean - reference)[spread] / se[spread])


# ----------------------------------------------------------------------------------------------
# Unbiasedness with the correction on.


@pytest.mark.parametrize(
    "quantizer, correction, gate",
    [
        (stochastic_rounding(2, 0.0, 1.0), randk(32), bernoulli_gate(0.5)),
        (subtractive_dither(3, 0.0, 1.0), qsgd(4), bernoulli_gate(0.25)),
        (per_sample_range(2), fp32(), bernoulli_gate(0.5)),
    ],
    ids=["sr2-randk-bern", "dither3-qsgd-bern", "persample2-fp32-bern"],
)
def test_correction_makes_the_estimate_unbiased(problem, quantizer, correction, gate):
    params, batch = problem
    draws = 3000
    g = gradient_draws(qdata_estimator(loss_fn, quantizer, num_classes=CLASSES, gate=gate, correction=correction),
                       params, batch, draws)
    ref = flat(full_gradient(loss_fn)(params, batch["x"], batch["y"]))
    # E[g] = ref exactly (gate, Q and C unbiased; the gate's p~ is the one drawn with). Each coordinate
    # of the mean of 3000 i.i.d. draws is within 5 empirical standard errors of ref (a two-sided normal
    # tail of 6e-7 per coordinate, 2e-4 over the 314 coordinates); the seed is fixed, so no flake.
    assert max_standard_score(g, ref) <= 5.0
    # Not vacuous: the 5-standard-error band is narrow compared with the gradient itself.
    se = g.std(0, ddof=1) / np.sqrt(draws)
    assert 5 * np.linalg.norm(se) < 0.5 * np.linalg.norm(ref)


def test_unbiasedness_check_detects_a_biased_estimate(problem):
    # The same statistic on a biased configuration (nearest rounding to 2 bits, no correction) must
    # exceed 5 standard errors, so the test above can fail.
    params, batch = problem
    est = qdata_estimator(loss_fn, nearest_rounding(2, 0.0, 1.0), num_classes=CLASSES, gate=bernoulli_gate(0.5))
    g = gradient_draws(est, params, batch, 3000)
    ref = flat(full_gradient(loss_fn)(params, batch["x"], batch["y"]))
    assert max_standard_score(g, ref) > 10.0


@pytest.mark.parametrize("gate", [no_gate(), top_fraction_gate(0.5), bernoulli_gate(0.3)], ids=["none", "top", "bern"])
def test_fp32_correction_recovers_the_weighted_full_precision_gradient(problem, gate):
    # With C = fp32 (exact), g = (1/b) sum_j a_j grad f(w; x_j, y_j) for every draw, whatever Q: a
    # deterministic check that decode, the label stream and the weights line up on both sides.
    params, batch = problem
    est = qdata_estimator(loss_fn, nearest_rounding(2, 0.0, 1.0), num_classes=CLASSES, gate=gate, correction=fp32())
    message, _ = jax.jit(est.node_message)(jax.random.key(3), params, batch, est.init(params))
    g = flat(jax.jit(functools.partial(node_gradient, est))(params, message))

    # The a_j the learner uses, read back from the message independently of the estimator's code.
    mask = np.unpackbits(np.asarray(message.mask.arrays["bitmap"]), bitorder="little")[:B] if gate.rho < 1 else np.ones(B)
    a = mask / np.where(mask > 0, np.asarray(message.weights.rows["prob"], np.float32), 1) if gate.weighted else mask
    ref = flat(jax.grad(lambda p: jnp.sum(jnp.asarray(a, jnp.float32) * loss_fn(p, batch["x"], batch["y"])) / B)(params))
    # Same sums in float32 along different paths: 1e-5 of the largest coordinate.
    np.testing.assert_allclose(g, ref, atol=1e-5 * np.abs(ref).max())
    assert 0 < mask.sum() <= B
    if gate.rho < 1:  # gated: the weighted gradient differs from the full one
        assert np.linalg.norm(ref - flat(full_gradient(loss_fn)(params, batch["x"], batch["y"]))) > 0


# ----------------------------------------------------------------------------------------------
# Bias without the correction: ||E g - grad F|| <= L_x E||x - Q(x)||.


def certified_lipschitz_x(params, radius):
    """A certified bound L_x >= sup_x ||d grad_w f(w; x, y) / dx||_op over {||x|| <= radius}, all y.

    For u = W1 x + b1, h = tanh(u), z = W2 h + b2, p = softmax(z), e = p - onehot(y), the parameter
    gradient is (e h^T, e, r x^T, r) with r = (1 - h^2) * (W2^T e). For a unit direction v, with
    s1 = ||W1||_2, s2 = ||W2||_2 and H hidden units:
      ||dh|| <= s1 (|tanh'| <= 1);  ||de|| <= s2 s1 / 2 =: A (softmax Jacobian norm <= 1/2);
      ||e|| <= sqrt(2);  ||h|| <= sqrt(H);  |d(1 - h^2)/du| = |2 h (1 - h^2)| <= 4 / (3 sqrt 3);
      ||d(e h^T)|| <= A sqrt(H) + sqrt(2) s1;
      ||dr|| <= (4 / (3 sqrt 3)) s1 sqrt(2) s2 + s2 A =: c;
      ||d(r x^T)|| <= c ||x|| + ||r|| <= c radius + sqrt(2) s2.
    The Jacobian stacks these four blocks, so its norm is at most the root of their squares' sum.
    """
    s1 = float(np.linalg.norm(np.asarray(params["params"]["hidden"]["kernel"]), 2))
    s2 = float(np.linalg.norm(np.asarray(params["params"]["head"]["kernel"]), 2))
    a = s2 * s1 / 2
    c = 4 / (3 * math.sqrt(3)) * s1 * math.sqrt(2) * s2 + s2 * a
    blocks = [a, a * math.sqrt(HIDDEN) + math.sqrt(2) * s1, c, c * radius + math.sqrt(2) * s2]
    return math.sqrt(sum(v * v for v in blocks))


def test_lipschitz_certificate_dominates_the_jacobian(problem):
    # Sanity of the certificate: at random points of the box and random labels it exceeds the exact
    # operator norm of x -> grad_w f(w; x, y) (computed with jax.jacfwd), but not by orders of magnitude.
    params, _ = problem
    lx = certified_lipschitz_x(params, math.sqrt(N_IN))

    def grad_at(x, y):
        return ravel_pytree(jax.grad(lambda p: loss_fn(p, x[None], y[None])[0])(params))[0]

    xs = jax.random.uniform(jax.random.key(4), (64, N_IN))
    ys = jax.random.randint(jax.random.key(5), (64,), 0, CLASSES)
    jacobians = np.asarray(jax.jit(jax.vmap(jax.jacfwd(grad_at)))(xs, ys), np.float64)
    norms = [np.linalg.norm(j, 2) for j in jacobians]
    assert max(norms) <= lx
    assert lx < 100 * max(norms)


@pytest.mark.parametrize("bits", [8, 2], ids=["small-error", "large-error"])
def test_bias_without_correction_is_within_lx_times_quantization_error(problem, bits):
    params, batch = problem
    x, y = batch["x"], batch["y"]
    ref = flat(full_gradient(loss_fn)(params, x, y))
    # Every x_j and Q(x_j) lies in the box [0, 1]^8, a convex set of radius sqrt(8): the segment between
    # them too, so the mean value inequality applies with L_x certified on that ball.
    lx = certified_lipschitz_x(params, math.sqrt(N_IN))

    # Nearest rounding is deterministic: E g = g, no sampling error at all.
    q = nearest_rounding(bits, 0.0, 1.0)
    est = qdata_estimator(loss_fn, q, num_classes=CLASSES)
    message, _ = jax.jit(est.node_message)(jax.random.key(0), params, batch, est.init(params))
    bias = np.linalg.norm(flat(jax.jit(functools.partial(node_gradient, est))(params, message)) - ref)
    err = np.mean(np.linalg.norm(np.asarray(x) - np.asarray(q.decode(message.samples["x"])), axis=1))
    assert bias <= lx * err
    assert bias > 1e-3 * np.linalg.norm(ref)  # the bias is real, not float noise
    # A tighter, empirical (not certified) version of the same inequality: L_x taken as 1.5 times the
    # largest Jacobian norm on a 5-point grid of each segment x_j -> Q(x_j) (the margin 1.5 covers the
    # variation between grid points of this smooth model). The certified L_x is ~10x looser, so this
    # is the check a wrong weight, label or decode would trip first.
    x_hat = np.asarray(q.decode(message.samples["x"]))

    def grad_at(xj, yj):
        return ravel_pytree(jax.grad(lambda p: loss_fn(p, xj[None], yj[None])[0])(params))[0]

    t = np.linspace(0.0, 1.0, 5)[:, None, None]
    points = (np.asarray(x)[None] + t * (x_hat - np.asarray(x))[None]).reshape(-1, N_IN)
    labels = np.tile(np.asarray(y), t.shape[0])
    jacobians = np.asarray(jax.jit(jax.vmap(jax.jacfwd(grad_at)))(jnp.asarray(points), jnp.asarray(labels)))
    l_grid = 1.5 * max(np.linalg.norm(j, 2) for j in jacobians)
    assert l_grid <= lx
    assert bias <= l_grid * err
    if bits == 8:
        assert lx * err < np.linalg.norm(ref)  # the bound is informative at 8 bits

    # Stochastic rounding: E||x - Q(x)|| <= sqrt(E||x - Q(x)||^2) = Delta sqrt(sum_i f_i (1 - f_i)),
    # f_i the fractional part of x_i / Delta. The bias is estimated from 2000 draws, whose mean error
    # has norm at most 5 sqrt(sum_i Var(g_i) / draws) (its expected square is the sum of variances;
    # 5 root-mean-squares is conservative since the norm of a 314-dim average concentrates).
    q = stochastic_rounding(bits, 0.0, 1.0)
    delta = 1.0 / (2**bits - 1)
    u = np.asarray(x, np.float64) / delta
    frac = u - np.floor(u)
    err_sr = np.mean(delta * np.sqrt(np.sum(frac * (1 - frac), axis=1)))
    g = gradient_draws(qdata_estimator(loss_fn, q, num_classes=CLASSES), params, batch, 2000)
    noise = 5 * np.sqrt(np.sum(g.var(0, ddof=1)) / g.shape[0])
    assert np.linalg.norm(g.mean(0) - ref) <= lx * err_sr + noise


def test_bias_grows_with_the_quantization_error(problem):
    params, batch = problem
    ref = flat(full_gradient(loss_fn)(params, batch["x"], batch["y"]))
    biases = []
    for bits in (8, 4, 2):
        est = qdata_estimator(loss_fn, nearest_rounding(bits, 0.0, 1.0), num_classes=CLASSES)
        message, _ = jax.jit(est.node_message)(jax.random.key(0), params, batch, est.init(params))
        biases.append(np.linalg.norm(flat(node_gradient(est, params, message)) - ref))
    assert biases[0] < biases[1] < biases[2]


# ----------------------------------------------------------------------------------------------
# The bit ledger.


class Linear(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


def _linear_problem(b, n, classes, seed=0):
    model = Linear(classes)
    x = jax.random.uniform(jax.random.key(seed), (b, n))
    y = jax.random.randint(jax.random.key(seed + 1), (b,), 0, classes)
    params = model.init(jax.random.key(seed + 2), x)

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y)

    return loss, params, {"x": x, "y": y}


def _sent_rows(message, b, gated):
    if not gated:
        return b
    return int(np.unpackbits(np.asarray(message.mask.arrays["bitmap"]), bitorder="little")[:b].sum())


def test_uplink_bits_by_hand_bernoulli_4bit():
    b, n, classes, k = 16, 64, 10, 20
    loss, params, batch = _linear_problem(b, n, classes)
    # 650 parameters (n * classes + classes): ceil(log2 650) = 10-bit indices
    est = qdata_estimator(loss, stochastic_rounding(4, 0.0, 1.0), num_classes=classes,
                          gate=bernoulli_gate(0.5), correction=randk(k))
    counts = set()
    node_message, uplink_bits = jax.jit(est.node_message), jax.jit(est.uplink_bits)
    for seed in range(4):
        message, _ = node_message(jax.random.key(seed), params, batch, est.init(params))
        bits = {key: int(v) for key, v in uplink_bits(message).items()}
        m = _sent_rows(message, b, True)
        counts.add(m)
        assert bits["data"] == m * math.ceil(n * 4 / 8) * 8  # 256 bits per transmitted sample
        assert bits["labels"] == math.ceil(m * 4 / 8) * 8  # ceil(log2 10) = 4 bits per label, packed
        assert bits["weights"] == m * 16  # p~_j in fp16
        assert bits["metadata"] == 0  # dataset-wide range: nothing per sample
        assert bits["mask"] == 16  # b = 16 bits of bitmap
        assert bits["correction"] == 32 * k + 8 * math.ceil(k * 10 / 8)  # k fp32 values + k 10-bit indices
        assert bits["total"] == sum(v for key, v in bits.items() if key != "total")
    assert len(counts) > 1  # the Bernoulli gate's count varies with the key


@settings(max_examples=6)  # each example compiles a new shape (~2 s)
@given(
    bits=st.integers(1, 16),
    classes=st.integers(2, 1000),
    b=st.integers(1, 12),
    n=st.integers(1, 40),
    gate_kind=st.sampled_from(["none", "top", "bernoulli"]),
    quantizer_kind=st.sampled_from(["fixed", "per_sample", "dither"]),
    seed=st.integers(0, 1000),
)
def test_uplink_bits_formulas(bits, classes, b, n, gate_kind, quantizer_kind, seed):
    loss, params, batch = _linear_problem(b, n, classes, seed)
    gate = {"none": no_gate(), "top": top_fraction_gate(0.5), "bernoulli": bernoulli_gate(0.4)}[gate_kind]
    quantizer = {"fixed": stochastic_rounding(bits, 0.0, 1.0), "per_sample": per_sample_range(bits),
                 "dither": subtractive_dither(bits, 0.0, 1.0)}[quantizer_kind]
    est = qdata_estimator(loss, quantizer, num_classes=classes, gate=gate)
    message, _ = jax.jit(est.node_message)(jax.random.key(seed), params, batch, est.init(params))
    got = {key: int(v) for key, v in jax.jit(est.uplink_bits)(message).items()}
    gated = gate_kind != "none"
    m = _sent_rows(message, b, gated)
    if gate_kind == "top":
        assert m == math.ceil(0.5 * b)
    width = max(1, math.ceil(math.log2(classes)))
    assert got["data"] == m * 8 * math.ceil(n * bits / 8)
    assert got["labels"] == 8 * math.ceil(m * width / 8)
    assert got["weights"] == (16 * m if gate_kind == "bernoulli" else 0)
    assert got["metadata"] == {"fixed": 0, "per_sample": 32 * m, "dither": 32}[quantizer_kind]
    assert got["mask"] == (8 * math.ceil(b / 8) if gated else 0)
    assert got["correction"] == 0
    assert got["total"] == sum(v for key, v in got.items() if key != "total")


# ----------------------------------------------------------------------------------------------
# jit and vmap over nodes.


def test_node_message_vmaps_over_nodes_and_matches_per_node_runs(problem):
    params, _ = problem
    nodes = 4
    xs = jax.random.uniform(jax.random.key(10), (nodes, B, N_IN))
    ys = jax.random.randint(jax.random.key(11), (nodes, B), 0, CLASSES)
    keys = jax.random.split(jax.random.key(12), nodes)
    est = qdata_estimator(loss_fn, per_sample_range(4), num_classes=CLASSES, gate=bernoulli_gate(0.5),
                          correction=randk(40))
    state = est.init(params)
    states = jax.tree_util.tree_map(lambda s: jnp.stack([s] * nodes), state)
    messages, _ = jax.jit(jax.vmap(est.node_message, in_axes=(0, None, 0, 0)))(keys, params, {"x": xs, "y": ys}, states)
    assert isinstance(messages, NodeMessage)
    grads = jax.jit(jax.vmap(functools.partial(node_gradient, est), in_axes=(None, 0)))(params, messages)
    bits = jax.jit(jax.vmap(est.uplink_bits))(messages)
    node_message, learner_gradient, uplink_bits = (
        jax.jit(est.node_message), jax.jit(functools.partial(node_gradient, est)), jax.jit(est.uplink_bits))
    for i in range(nodes):
        message, _ = node_message(keys[i], params, {"x": xs[i], "y": ys[i]}, state)
        node_i = jax.tree_util.tree_map(lambda a: a[i], messages)
        for got, want in zip(jax.tree_util.tree_leaves(node_i), jax.tree_util.tree_leaves(message)):
            if jnp.issubdtype(got.dtype, jnp.floating):  # correction values: jit vs eager float32 paths
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
            else:  # codes, labels, bitmap, indices: identical
                np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(flat(jax.tree_util.tree_map(lambda a: a[i], grads)),
                                   flat(learner_gradient(params, message)), rtol=1e-5, atol=1e-7)
        for key, value in uplink_bits(message).items():
            assert int(bits[key][i]) == int(value)
    # The message passes through jit unchanged (static metadata included).
    same = jax.jit(lambda m: m)(messages)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(messages)


def test_untransmitted_rows_carry_nothing(problem):
    params, batch = problem
    est = qdata_estimator(loss_fn, per_sample_range(4), num_classes=CLASSES, gate=top_fraction_gate(0.25))
    message, _ = jax.jit(est.node_message)(jax.random.key(0), params, batch, est.init(params))
    mask = np.unpackbits(np.asarray(message.mask.arrays["bitmap"]), bitorder="little")[:B]
    assert mask.sum() == 4
    for row in jax.tree_util.tree_leaves(message.samples["x"].rows):
        assert np.all(np.asarray(row)[mask == 0] == 0)
    # The label stream holds the transmitted labels, in order, then zeros.
    stream = np.asarray(message.samples["y"].values)
    labels = np.stack([stream & 15, stream >> 4], axis=1).reshape(-1)[:B]
    np.testing.assert_array_equal(labels[:4], np.asarray(batch["y"])[mask == 1])
    assert np.all(labels[4:] == 0)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_batches_raise_value_errors_naming_the_argument(problem):
    params, batch = problem
    est = qdata_estimator(loss_fn, stochastic_rounding(4, 0.0, 1.0), num_classes=CLASSES)
    state = est.init(params)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"][:-1]}, state)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"].at[0].set(CLASSES)}, state)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"].at[0].set(-1)}, state)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"].astype(jnp.float32)}, state)
    with pytest.raises(ValueError, match=r"batch\['x'\]"):
        est.node_message(key, params, {"x": batch["x"].at[3, 2].set(jnp.nan), "y": batch["y"]}, state)
    with pytest.raises(ValueError, match="batch"):
        est.node_message(key, params, {"x": batch["x"]}, state)
    # Shape errors are static, so they are raised under jit too.
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        jax.jit(est.node_message)(key, params, {"x": batch["x"], "y": batch["y"][:-1]}, state)


def test_bad_hyper_parameters_raise_at_construction():
    q = stochastic_rounding(4, 0.0, 1.0)
    with pytest.raises(ValueError, match="num_classes"):
        qdata_estimator(loss_fn, q, num_classes=0)
    with pytest.raises(ValueError, match="correction"):
        qdata_estimator(loss_fn, q, num_classes=CLASSES, correction="randk")
    with pytest.raises(ValueError, match="gate"):
        qdata_estimator(loss_fn, q, num_classes=CLASSES, gate=0.5)
    with pytest.raises(ValueError, match="quantizer"):
        qdata_estimator(loss_fn, None, num_classes=CLASSES)


# ----------------------------------------------------------------------------------------------
# Real-valued targets (num_classes=None): least squares f(w; x, y) = (w^T x + c - y)^2 / 2.

N_LS = 8


def ls_loss(params, x, y):
    return 0.5 * jnp.square(x @ params["w"] + params["c"] - y)


def _regression_problem(b, n=N_LS, seed=20, offset=0.0):
    """x in [0, 1]^n, y = x^T w_true + 0.3 noise (+ offset), and a parameter point away from w_true."""
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.uniform(k[0], (b, n))
    y = x @ jax.random.normal(k[1], (n,)) + 0.3 * jax.random.normal(k[2], (b,)) + offset
    params = {"w": 0.5 * jax.random.normal(k[3], (n,)), "c": jnp.float32(0.1)}
    return params, {"x": x, "y": y.astype(jnp.float32)}


@settings(max_examples=6)  # each example compiles a new shape (~2 s)
@given(
    bits=st.integers(1, 16),
    b=st.integers(1, 12),
    n=st.integers(1, 20),
    gate_kind=st.sampled_from(["none", "top", "bernoulli"]),
    dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 1000),
)
def test_uplink_bits_of_real_targets(bits, b, n, gate_kind, dtype, seed):
    # A real target costs exactly the bits of its wire type per transmitted sample (32 for fp32, 16
    # for fp16), whatever b and the gate; the other parts of the ledger are those of integer labels.
    params, batch = _regression_problem(b, n, seed)
    gate = {"none": no_gate(), "top": top_fraction_gate(0.5), "bernoulli": bernoulli_gate(0.4)}[gate_kind]
    est = qdata_estimator(ls_loss, stochastic_rounding(bits, 0.0, 1.0), num_classes=None, target_dtype=dtype,
                          gate=gate, correction=randk(2))
    message, _ = jax.jit(est.node_message)(jax.random.key(seed), params, batch, est.init(params))
    got = {key: int(v) for key, v in jax.jit(est.uplink_bits)(message).items()}
    m = _sent_rows(message, b, gate_kind != "none")
    width = {"float32": 32, "float16": 16}[dtype]
    assert message.samples["y"].values.dtype == np.dtype(dtype)
    assert got["labels"] == width * m
    assert got["data"] == m * 8 * math.ceil(n * bits / 8)
    assert got["weights"] == (16 * m if gate_kind == "bernoulli" else 0)
    assert got["correction"] == 2 * 32 + 8 * math.ceil(2 * max(1, math.ceil(math.log2(n + 1))) / 8)
    assert got["total"] == sum(v for key, v in got.items() if key != "total")


@pytest.mark.parametrize("gate", [no_gate(), top_fraction_gate(0.5), bernoulli_gate(0.4)], ids=["none", "top", "bern"])
def test_real_targets_round_trip(gate):
    # fp32 targets arrive bit for bit: the stream holds the transmitted ones first, in sample order,
    # then zeros; the learner reads y_j for every transmitted j and 0 for the others.
    params, batch = _regression_problem(B)
    est = qdata_estimator(ls_loss, stochastic_rounding(4, 0.0, 1.0), num_classes=None, gate=gate)
    message, _ = jax.jit(est.node_message)(jax.random.key(1), params, batch, est.init(params))
    (_, y, a), _ = jax.jit(est.received)(message, est.init_learner())
    mask = np.asarray(a) > 0
    m = _sent_rows(message, B, gate.rho < 1)
    assert mask.sum() == m and 0 < m <= B
    want = np.asarray(batch["y"])
    assert np.asarray(y).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(y)[mask], want[mask])
    assert np.all(np.asarray(y)[~mask] == 0)
    stream = np.asarray(message.samples["y"].values)
    np.testing.assert_array_equal(stream[:m], want[mask])
    assert np.all(stream[m:] == 0)


def test_fp16_targets_are_rounded_and_the_correction_compensates():
    # Targets near 1000 have an fp16 spacing of 0.5, so the rounding is visible. The learner reads
    # y rounded to fp16 (exactly), 16 bits each; with an exact (fp32) correction the node corrects
    # against that rounded y, so g equals the full-precision gradient at the *true* y, not the rounded.
    params, batch = _regression_problem(B, offset=1000.0)
    params = dict(params, c=jnp.float32(1000.0))  # residuals (and the gradient) of order 1
    y16 = np.asarray(batch["y"].astype(jnp.float16))
    assert np.any(y16.astype(np.float32) != np.asarray(batch["y"]))
    est = qdata_estimator(ls_loss, stochastic_rounding(8, 0.0, 1.0), num_classes=None, target_dtype=jnp.float16,
                          correction=fp32())
    message, _ = jax.jit(est.node_message)(jax.random.key(2), params, batch, est.init(params))
    (_, y, _), _ = jax.jit(est.received)(message, est.init_learner())
    assert np.asarray(y).dtype == np.float16
    np.testing.assert_array_equal(np.asarray(y), y16)
    assert int(est.uplink_bits(message)["labels"]) == 16 * B
    g = flat(jax.jit(functools.partial(node_gradient, est))(params, message))
    ref = flat(full_gradient(ls_loss)(params, batch["x"], batch["y"]))
    rounded = flat(full_gradient(ls_loss)(params, batch["x"], jnp.asarray(y16, jnp.float32)))
    # Residuals w^T x + c - y are differences of float32 numbers ~1000 (error ~1e-4 each, along
    # different paths on the two sides): 1e-3 of the largest coordinate. The rounding (up to 0.25 per
    # target) moves the gradient by more than 10 times that.
    tol = 1e-3 * np.abs(ref).max()
    np.testing.assert_allclose(g, ref, atol=tol)
    assert np.abs(rounded - ref).max() > 10 * tol


def test_correction_makes_the_estimate_unbiased_on_least_squares():
    # grad f(w; Q(x), y) = (w^T Q(x) + c - y) (Q(x), 1) is quadratic in Q(x): stochastic rounding
    # alone leaves a bias (E Q Q^T = x x^T + diag Var Q), which the correction removes.
    params, batch = _regression_problem(B)
    ref = flat(full_gradient(ls_loss)(params, batch["x"], batch["y"]))
    draws = 3000
    est = qdata_estimator(ls_loss, stochastic_rounding(2, 0.0, 1.0), num_classes=None, gate=bernoulli_gate(0.5),
                          correction=randk(4))
    g = gradient_draws(est, params, batch, draws)
    # As in test_correction_makes_the_estimate_unbiased: each of the 9 coordinates of the mean of 3000
    # i.i.d. draws within 5 empirical standard errors of the full gradient (two-sided normal tail 6e-7
    # per coordinate); and the band is narrow next to the gradient, so the check is not vacuous.
    assert max_standard_score(g, ref) <= 5.0
    assert 5 * np.linalg.norm(g.std(0, ddof=1) / np.sqrt(draws)) < 0.5 * np.linalg.norm(ref)
    # The statistic sees the bias of the same quantizer without the correction (and without the gate,
    # whose variance would hide it at this number of draws).
    plain = qdata_estimator(ls_loss, stochastic_rounding(2, 0.0, 1.0), num_classes=None)
    assert max_standard_score(gradient_draws(plain, params, batch, draws), ref) > 10.0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_with_real_targets(dtype):
    # The learner caches targets in the wire type; a sample already held costs its position only, and
    # with an exact correction every estimate equals the full-precision gradient at the true targets.
    shard, b = 20, 12
    params, shard_batch = _regression_problem(shard, seed=30)
    sx, sy = shard_batch["x"], shard_batch["y"]
    est = qdata_estimator(ls_loss, stochastic_rounding(4, 0.0, 1.0), num_classes=None, target_dtype=dtype,
                          correction=fp32(), cache_size=shard, sample_shape=(N_LS,))
    node, cache = est.init(params), est.init_learner()
    assert cache.rows["y"].dtype == np.dtype(dtype) and cache.rows["y"].shape == (shard,)
    node_message, learner = jax.jit(est.node_message), jax.jit(functools.partial(one_node_gradient, est))
    width = {"float32": 32, "float16": 16}[dtype]
    rng = np.random.default_rng(3)
    held = set()
    for step in range(3):
        pos = rng.integers(0, shard, b) if step else np.arange(b) % 7  # duplicates inside the batch
        batch = {"x": sx[pos], "y": sy[pos], "pos": jnp.asarray(pos, jnp.int32)}
        msg, node = node_message(jax.random.key(10 + step), params, batch, node)
        fresh = set(pos.tolist()) - held
        held |= fresh
        bits = est.uplink_bits(msg)
        assert int(bits["labels"]) == width * len(fresh)
        assert int(bits["data"]) == len(fresh) * 8 * (N_LS * 4 // 8)
        g, cache = learner(params, msg, cache)
        ref = full_gradient(ls_loss)(params, batch["x"], batch["y"])
        np.testing.assert_allclose(flat(g), flat(ref), rtol=1e-4, atol=1e-5 * np.abs(flat(ref)).max())
    # The learner holds exactly the targets ever sent, in the wire type, at their shard positions.
    labels = np.asarray(cache.rows["y"])
    assert labels.dtype == np.dtype(dtype)
    idx = sorted(held)
    np.testing.assert_array_equal(labels[idx], np.asarray(sy.astype(dtype))[idx])
    assert np.all(np.delete(labels, idx) == 0)
    # The same batch again: nothing but positions crosses the link.
    msg, node = node_message(jax.random.key(99), params, batch, node)
    bits = est.uplink_bits(msg)
    assert int(bits["labels"]) == 0 and int(bits["data"]) == 0


def test_real_targets_through_the_one_pass_learner():
    # qdata_method's learner takes one backward pass over all N*b received samples (y real here):
    # it must equal the mean of the per-node estimates.
    from qdata.methods import qdata_method

    nodes = 3
    params, _ = _regression_problem(B)
    xs = jax.random.uniform(jax.random.key(40), (nodes, B, N_LS))
    ys = jax.random.normal(jax.random.key(41), (nodes, B))
    est = qdata_estimator(ls_loss, stochastic_rounding(4, 0.0, 1.0), num_classes=None, gate=bernoulli_gate(0.5),
                          correction=randk(4))
    states = jax.jit(jax.vmap(lambda _: est.init(params)))(jnp.arange(nodes))
    keys = jax.random.split(jax.random.key(42), nodes)
    messages, _ = jax.jit(jax.vmap(est.node_message, in_axes=(0, None, 0, 0)))(keys, params, {"x": xs, "y": ys},
                                                                          states)
    method = qdata_method(est)
    g, _ = jax.jit(method.learner_gradient)(params, messages, method.init_learner(params, nodes))
    per_node = jax.jit(jax.vmap(functools.partial(node_gradient, est), in_axes=(None, 0)))(params, messages)
    np.testing.assert_allclose(flat(g), flat(jax.tree_util.tree_map(lambda v: v.mean(0), per_node)),
                               rtol=1e-5, atol=1e-6)


def test_real_target_input_checks():
    params, batch = _regression_problem(B)
    key = jax.random.key(0)
    est = qdata_estimator(ls_loss, stochastic_rounding(4, 0.0, 1.0), num_classes=None)
    state = est.init(params)
    # Integer targets are real values: cast, the same message as the float targets they equal.
    ints = {"x": batch["x"], "y": jnp.arange(B, dtype=jnp.int32) - 3}
    as_float = {"x": batch["x"], "y": ints["y"].astype(jnp.float32)}
    m_int, _ = est.node_message(key, params, ints, state)
    m_float, _ = est.node_message(key, params, as_float, state)
    for u, v in zip(jax.tree_util.tree_leaves(m_int), jax.tree_util.tree_leaves(m_float)):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"].at[2].set(jnp.inf)}, state)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"][:, None]}, state)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        est.node_message(key, params, {"x": batch["x"], "y": batch["y"] > 0}, state)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        jax.jit(est.node_message)(key, params, {"x": batch["x"], "y": batch["y"][:-1]}, state)
    half = qdata_estimator(ls_loss, stochastic_rounding(4, 0.0, 1.0), num_classes=None, target_dtype="float16")
    with pytest.raises(ValueError, match=r"batch\['y'\].*float16"):  # 1e5 would arrive as inf
        half.node_message(key, params, {"x": batch["x"], "y": batch["y"].at[0].set(1e5)}, state)
    # Float targets with num_classes set are refused (the existing integer-label contract).
    labelled = qdata_estimator(ls_loss, stochastic_rounding(4, 0.0, 1.0), num_classes=4)
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        labelled.node_message(key, params, batch, state)
    q = stochastic_rounding(4, 0.0, 1.0)
    with pytest.raises(ValueError, match="target_dtype"):
        qdata_estimator(ls_loss, q, num_classes=None, target_dtype=jnp.int32)
    with pytest.raises(ValueError, match="target_dtype"):
        qdata_estimator(ls_loss, q, num_classes=None, target_dtype="fp32")
    with pytest.raises(ValueError, match="target_dtype"):
        qdata_estimator(ls_loss, q, num_classes=4, target_dtype=jnp.float32)
