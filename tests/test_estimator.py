"""Tests of qdata.estimator: unbiasedness, the bias bound without correction, the bit ledger, jit/vmap.

The model throughout is a small flax MLP, 8 inputs -> 16 tanh units -> 10 logits (314 parameters),
with softmax cross-entropy; inputs live in the box [0, 1]^8, the range of the dataset-wide quantizers.
"""

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
from qdata.estimator import NodeMessage, full_gradient, qdata_estimator
from qdata.gate import bernoulli_gate, no_gate, top_fraction_gate

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
    """learner_gradient(node_message(key)) for `draws` keys, flattened: (draws, d)."""
    state = est.init(params)

    def one(key):
        message, _ = est.node_message(key, params, batch, state)
        return ravel_pytree(est.learner_gradient(params, message))[0]

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
    g = flat(jax.jit(est.learner_gradient)(params, message))

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
    bias = np.linalg.norm(flat(jax.jit(est.learner_gradient)(params, message)) - ref)
    err = np.mean(np.linalg.norm(np.asarray(x) - np.asarray(q.decode(message.data)), axis=1))
    assert bias <= lx * err
    assert bias > 1e-3 * np.linalg.norm(ref)  # the bias is real, not float noise
    # A tighter, empirical (not certified) version of the same inequality: L_x taken as 1.5 times the
    # largest Jacobian norm on a 5-point grid of each segment x_j -> Q(x_j) (the margin 1.5 covers the
    # variation between grid points of this smooth model). The certified L_x is ~10x looser, so this
    # is the check a wrong weight, label or decode would trip first.
    x_hat = np.asarray(q.decode(message.data))

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
        biases.append(np.linalg.norm(flat(est.learner_gradient(params, message)) - ref))
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
    grads = jax.jit(jax.vmap(est.learner_gradient, in_axes=(None, 0)))(params, messages)
    bits = jax.jit(jax.vmap(est.uplink_bits))(messages)
    node_message, learner_gradient, uplink_bits = (
        jax.jit(est.node_message), jax.jit(est.learner_gradient), jax.jit(est.uplink_bits))
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
    for row in jax.tree_util.tree_leaves(message.data.rows):
        assert np.all(np.asarray(row)[mask == 0] == 0)
    # The label stream holds the transmitted labels, in order, then zeros.
    stream = np.asarray(message.labels.arrays["labels"])
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
