"""Decoders do not trust their payload (issue 12, 'Found'): a payload of other parameters or another
codec, or with its codes cut short, is a ValueError naming why, not a silent wrong decode or an
error from inside JAX; NaN data encoded under jit is counted as clipped, not hidden."""

import jax
import jax.numpy as jnp
import pytest

from qdata.codecs import compressors as C
from qdata.codecs import quantizers as Q
from qdata.codecs.payloads import Payload

X = jnp.linspace(0.0, 1.0, 12).reshape(3, 4)
TREE = {"w": jnp.linspace(-1.0, 1.0, 20)}


@pytest.mark.parametrize("other, said", [(Q.stochastic_rounding(8, 0.0, 1.0), "bits=4; this decoder has bits=8"),
                                         (Q.stochastic_rounding(4, 0.0, 10.0), "hi=1.0; this decoder has hi=10.0"),
                                         (Q.per_sample_range(4), "not produced by per_sample_range")])
def test_a_quantizer_refuses_a_payload_of_other_parameters(other, said):
    payload = Q.stochastic_rounding(4, 0.0, 1.0).encode(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match=said):
        other.decode(payload)


@pytest.mark.parametrize("make, others", [(C.qsgd(4), [C.topk(3), C.fp32(), C.terngrad(), C.scaled_sign()]),
                                           (C.terngrad(), [C.topk(3), C.fp32(), C.qsgd(4), C.scaled_sign()])],
                         ids=["qsgd", "terngrad"])
def test_a_compressor_refuses_another_codecs_payload_and_truncated_codes(make, others):
    payload, _ = make.encode(jax.random.PRNGKey(0), TREE, make.init(TREE))
    for other in others:
        with pytest.raises(ValueError, match="payload was not produced by"):
            other.decode(payload)
    cut = Payload(arrays={**payload.arrays, "codes": payload.arrays["codes"][:1]}, meta=payload.meta)
    with pytest.raises(ValueError, match="too short for 20 codes"):
        make.decode(cut)


def test_nan_encoded_under_jit_is_counted_as_clipped():
    payload = jax.jit(Q.stochastic_rounding(4, 0.0, 1.0).encode)(jax.random.PRNGKey(0), X.at[0, 0].set(jnp.nan))
    assert int(payload.info["clipped"].sum()) == 1


@pytest.mark.parametrize("make", [C.qsgd(2), C.qsgd(2, bucket_size=2), C.terngrad(), C.qsgd(4, coding="elias")],
                         ids=["qsgd", "qsgd-buckets", "terngrad", "qsgd-elias"])
@pytest.mark.parametrize("peak", [9e37, 3e38])
def test_a_huge_finite_value_is_not_decoded_as_zeros(make, peak):
    """Above about 8.5e37, 1 / value is subnormal and XLA's division (a multiply by it) flushed it to
    zero: the whole vector decoded as zeros. The largest value keeps its own magnitude (terngrad sends
    it exactly; QSGD's 2 levels give norm * l / 2 with l >= 1) and the others stay finite. (A vector
    whose 2-norm itself exceeds float32's largest value, 3.4e38, cannot be sent as QSGD's fp32 norm.)"""
    tree = {"w": jnp.array([peak, 1.0, -peak / 3, 0.0], jnp.float32)}
    for fn in (make.encode, jax.jit(make.encode)):
        payload, _ = fn(jax.random.PRNGKey(1), tree, make.init(tree))
        out = make.decode(payload)["w"]
        assert bool(jnp.all(jnp.isfinite(out))) and float(out[0]) >= peak / 2, out
