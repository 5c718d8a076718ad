"""Flax models and the functions of (params, batch) built on them (qdata/models.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax.traverse_util import flatten_dict

from qdata import models as M

KEY = jax.random.PRNGKey(0)


def final_dense(params, h_dim, num_classes):
    """The (kernel, bias) of the layer mapping features h to logits, found by its shape."""
    found = [v for v in jax.tree_util.tree_leaves(params, is_leaf=lambda t: isinstance(t, dict) and "kernel" in t)
             if isinstance(v, dict) and v["kernel"].shape == (h_dim, num_classes)]
    assert len(found) >= 1
    return found[-1]["kernel"], found[-1]["bias"]


def random_params(model, sample_shape, seed=0):
    """Params of the right shapes without compiling the initializer (fast for large models)."""
    shapes = jax.eval_shape(lambda: M.init_params(model, KEY, sample_shape))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)


SMALL = [("logreg", (8, 8, 1), {}), ("mlp", (8, 8, 1), {"hidden": (32, 16)}), ("cnn", (8, 8, 1), {}),
         ("resnet20", (8, 8, 3), {})]
_INITIALIZED = {}


def small_model(name, shape, kwargs, num_classes=7):
    """(model, params), initialised once per configuration for the whole module."""
    key = (name, shape, tuple(kwargs.items()), num_classes)
    if key not in _INITIALIZED:
        model = M.make_model(name, num_classes, **kwargs)
        _INITIALIZED[key] = model, M.init_params(model, KEY, shape)
    return _INITIALIZED[key]


@pytest.mark.parametrize("name,shape,kwargs", SMALL)
def test_logits_features_and_last_layer(name, shape, kwargs):
    model, params = small_model(name, shape, kwargs)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2,) + shape)
    logits, h = jax.jit(M.logits_and_features(model))(params, x)
    assert logits.shape == (2, 7) and h.ndim == 2 and h.shape[0] == 2
    # h is the input of the final dense layer: logits = h W + c, which the gradient-norm score uses.
    kernel, bias = final_dense(params, h.shape[1], 7)
    np.testing.assert_allclose(h @ kernel + bias, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,shape,kwargs", SMALL)
def test_loss_is_per_sample(name, shape, kwargs):
    # No batch statistics: each sample's loss is the same alone as inside a batch (GroupNorm, no BatchNorm).
    model, params = small_model(name, shape, kwargs)
    x = jax.random.uniform(jax.random.PRNGKey(2), (3,) + shape)
    y = jnp.array([0, 3, 6])
    loss_fn = jax.jit(M.per_sample_loss(model))
    batch = loss_fn(params, x, y)
    assert batch.shape == (3,)
    alone = jnp.concatenate([loss_fn(params, x[j:j + 1], y[j:j + 1]) for j in range(3)])
    np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-5)
    logits = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(batch, -jax.nn.log_softmax(logits)[jnp.arange(3), y], rtol=1e-5, atol=1e-5)


def test_param_counts():
    n, c = 64, 10
    assert M.param_count(M.init_params(M.make_model("logreg", c), KEY, (8, 8, 1))) == n * c + c
    mlp = M.init_params(M.make_model("mlp", c, hidden=(32, 16)), KEY, (8, 8, 1))
    assert M.param_count(mlp) == (n * 32 + 32) + (32 * 16 + 16) + (16 * c + c)
    # He et al. (2016) report 0.27M for ResNet-20 and ~11.2M is the usual CIFAR ResNet-18 figure.
    r20 = jax.eval_shape(lambda: M.init_params(M.ResNet20(10), KEY, (32, 32, 3)))
    assert 0.26e6 <= M.param_count(r20) <= 0.28e6
    r18 = jax.eval_shape(lambda: M.init_params(M.ResNet18(10), KEY, (32, 32, 3)))
    assert 11.0e6 <= M.param_count(r18) <= 11.3e6
    # The ResNets pool globally: their params do not depend on the image size.
    r18_small = jax.eval_shape(lambda: M.init_params(M.ResNet18(10), KEY, (8, 8, 3)))
    assert M.param_count(r18_small) == M.param_count(r18)


def test_resnet18_forward_on_tiny_images():
    model = M.make_model("resnet18", 10)
    params = random_params(model, (8, 8, 3))
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 8, 8, 3))
    logits, h = jax.jit(M.logits_and_features(model))(params, x)
    assert logits.shape == (2, 10) and h.shape == (2, 512)
    assert np.all(np.isfinite(np.asarray(logits)))
    kernel, bias = final_dense(params, 512, 10)
    np.testing.assert_allclose(h @ kernel + bias, logits, rtol=1e-4, atol=1e-4)


def test_cross_entropy():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = jnp.array([0, 2])
    expected = [math.log(math.exp(2) + 1 + math.exp(-1)) - 2, math.log(3)]
    np.testing.assert_allclose(M.cross_entropy(logits, y), expected, rtol=1e-6)


def test_accuracy_batches_with_remainder():
    model = M.make_model("mlp", 4, hidden=(8,))
    params = M.init_params(model, KEY, (5,))
    rng = np.random.default_rng(0)
    x = rng.random((37, 5), dtype=np.float32)
    pred = np.asarray(jnp.argmax(model.apply({"params": params}, x), -1))
    y = np.where(rng.random(37) < 0.5, pred, (pred + 1) % 4).astype(np.int32)
    expected = np.mean(pred == y)
    for batch_size in (10, 37, 1000):
        assert M.accuracy(model, params, x, y, batch_size=batch_size) == pytest.approx(expected)
    with pytest.raises(ValueError, match="batch_size"):
        M.accuracy(model, params, x, y, batch_size=0)


def test_cnn_on_flat_vectors_is_a_clear_error():
    model = M.make_model("cnn", 10)
    with pytest.raises(ValueError, match=r"SmallCNN expects images of shape \(batch, H, W, C\), got x of shape \(1, 64\)"):
        M.init_params(model, KEY, (64,))
    params = M.init_params(model, KEY, (8, 8, 1))
    with pytest.raises(ValueError, match=r"\(2, 64\)"):
        model.apply({"params": params}, jnp.zeros((2, 64)))


@pytest.mark.parametrize("name,shape,bad", [
    ("logreg", (8, 8, 1), (28, 28, 1)),
    ("mlp", (8, 8, 1), (10,)),
    ("cnn", (8, 8, 1), (16, 16, 1)),
    ("resnet20", (8, 8, 3), (8, 8, 1)),
])
def test_mismatched_sample_shape(name, shape, bad):
    model = M.make_model(name, 3)
    params = M.init_params(model, KEY, shape)
    loss_fn = jax.jit(M.per_sample_loss(model))
    with pytest.raises(ValueError) as info:
        loss_fn(params, jnp.zeros((2,) + bad), jnp.zeros(2, jnp.int32))
    msg = str(info.value)
    assert str(bad) in msg and "params do not fit" in msg and "need" in msg


def test_factory_and_argument_errors():
    with pytest.raises(ValueError, match="logreg.*mlp.*cnn.*resnet20.*resnet18"):
        M.make_model("vgg", 10)
    with pytest.raises(ValueError, match="num_classes"):
        M.make_model("logreg", 0)
    with pytest.raises(ValueError, match="num_classes"):
        M.ResNet20(num_classes=-1)
    with pytest.raises(ValueError, match="hidden"):
        M.make_model("mlp", 10, hidden=())
    with pytest.raises(ValueError, match="norm_groups"):
        M.ResNet20(10, norm_groups=3)
    with pytest.raises(ValueError, match="sample_shape"):
        M.init_params(M.make_model("logreg", 10), KEY, (0, 3))


def norm_layers(params):
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if "GroupNorm" in jax.tree_util.keystr(path) or "BatchNorm" in jax.tree_util.keystr(path)}


def test_resnets_use_group_norm_or_none():
    for model in (M.ResNet20(4), M.ResNet18(4)):
        layers = norm_layers(jax.eval_shape(lambda: M.init_params(model, KEY, (4, 4, 3))))
        assert layers and all("GroupNorm" in name for name in layers)
    model = M.ResNet20(4, norm_groups=None)
    params = random_params(model, (4, 4, 3))
    assert not norm_layers(params)
    assert jax.jit(model.apply)({"params": params}, jnp.zeros((1, 4, 4, 3))).shape == (1, 4)


# ----------------------------------------------------------------------------------------------
# ResNet-18 stems


def shapes_by_path(params):
    return {"/".join(k): tuple(v.shape) for k, v in flatten_dict(params).items()}


def resnet18_param_count(stem_kernel, num_classes):
    """ResNet-18's parameters layer by layer (He et al. 2016, Table 1), bias-free convs, a scale and a
    bias per channel for every norm, 1x1 projection shortcuts where the shape changes."""
    conv = lambda k, cin, cout: k * k * cin * cout
    norm = lambda c: 2 * c
    total = conv(stem_kernel, 3, 64) + norm(64)
    cin = 64
    for c in (64, 128, 256, 512):
        for block in range(2):
            total += conv(3, cin, c) + norm(c) + conv(3, c, c) + norm(c)
            if cin != c:
                total += conv(1, cin, c) + norm(c)
            cin = c
    return total + 512 * num_classes + num_classes


def test_resnet18_imagenet_param_count_is_torchvisions():
    model = M.make_model("resnet18_imagenet", 1000)
    assert isinstance(model, M.ResNet18ImageNet) and model.stem == "imagenet"
    params = jax.eval_shape(lambda: M.init_params(model, KEY, (224, 224, 3)))
    # torchvision's resnet18 has 11,689,512 parameters: its BatchNorm layers hold a weight and a bias
    # per channel (running statistics are buffers), exactly the scale and bias of our GroupNorm.
    assert M.param_count(params) == resnet18_param_count(7, 1000) == 11_689_512
    norms = sum(math.prod(s) for path, s in shapes_by_path(params).items() if "GroupNorm" in path)
    assert norms == 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512) == 9_600
    assert shapes_by_path(params)["Conv_0/kernel"] == (7, 7, 3, 64)


def stage_inputs(model, sample_shape):
    """Abstract shapes of the logits, the stem's conv output and the first block's output."""
    params = jax.eval_shape(lambda: M.init_params(model, KEY, sample_shape))
    x = jax.ShapeDtypeStruct((1,) + sample_shape, jnp.float32)
    apply = lambda p, x: model.apply({"params": p}, x, capture_intermediates=True, mutable=["intermediates"])
    logits, state = jax.eval_shape(apply, params, x)
    seen = state["intermediates"]
    return logits.shape, seen["Conv_0"]["__call__"][0].shape, seen["_BasicBlock_0"]["__call__"][0].shape


def test_resnet18_imagenet_stem_reduces_224_to_56():
    logits, stem_conv, first_block = stage_inputs(M.make_model("resnet18_imagenet", 1000), (224, 224, 3))
    assert logits == (1, 1000)
    assert stem_conv == (1, 112, 112, 64)  # the 7x7 conv at stride 2
    assert first_block == (1, 56, 56, 64)  # after the 3x3 max-pool at stride 2; stage 1 keeps the size


def test_resnet18_cifar_stem_unchanged():
    model = M.make_model("resnet18", 10)
    assert model.stem == "cifar" and M.ResNet20(10).stem == "cifar"
    logits, stem_conv, first_block = stage_inputs(model, (32, 32, 3))
    assert logits == (1, 10) and stem_conv == first_block == (1, 32, 32, 64)
    cifar = shapes_by_path(jax.eval_shape(lambda: M.init_params(model, KEY, (32, 32, 3))))
    assert sum(map(math.prod, cifar.values())) == resnet18_param_count(3, 10) == 11_173_962
    # The two stems share every parameter name; only the first conv's kernel differs.
    imagenet = shapes_by_path(jax.eval_shape(
        lambda: M.init_params(M.make_model("resnet18_imagenet", 10), KEY, (32, 32, 3))))
    assert cifar.keys() == imagenet.keys()
    assert {k for k in cifar if cifar[k] != imagenet[k]} == {"Conv_0/kernel"}


def test_resnet18_imagenet_forward_on_small_images():
    model = M.make_model("resnet18_imagenet", 5)
    params = random_params(model, (16, 16, 3))
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 16, 16, 3))
    logits, h = jax.jit(M.logits_and_features(model))(params, x)
    assert logits.shape == (2, 5) and h.shape == (2, 512)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_bad_stem():
    with pytest.raises(ValueError, match=r"stem must be one of \('cifar', 'imagenet'\), got 'vgg'"):
        M.ResNet18(10, stem="vgg")


# ----------------------------------------------------------------------------------------------
# Stored samples


def test_integer_inputs_are_refused():
    model, params = small_model("mlp", (8, 8, 1), {"hidden": (32, 16)})
    with pytest.raises(ValueError, match="takes float inputs, got x of dtype uint8.*Dataset.to_float"):
        model.apply({"params": params}, jnp.zeros((2, 8, 8, 1), jnp.uint8))
    with pytest.raises(ValueError, match="takes float inputs"):
        M.accuracy(model, params, np.zeros((3, 8, 8, 1), np.uint8), np.zeros(3, np.int32))


def test_accuracy_converts_stored_samples_batch_by_batch():
    from qdata.data import to_float

    model, params = small_model("mlp", (8, 8, 1), {"hidden": (32, 16)})
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 7, 37).astype(np.int32)
    convert = lambda x: to_float(x, 255.0)
    expected = M.accuracy(model, params, convert(stored), y)
    assert M.accuracy(model, params, stored, y, batch_size=10, to_float=convert) == expected
