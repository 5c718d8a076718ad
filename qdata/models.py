"""Flax models: plain classifiers with no training logic, and the functions of (params, batch) built on them.

Every model maps a batch x of shape (b, *sample_shape) to logits of shape (b, C), and
``model.apply({'params': params}, x, return_features=True)`` returns ``(logits, h)`` where h is the
penultimate activation, the input of the final dense layer ``logits = h W + c``. For that layer the
per-sample gradient is ``(d loss / d logits) h^T`` and its exact norm is
``||d loss / d logits||_2 * sqrt(||h||_2^2 + 1)``, which the gradient-norm importance score of the gate
(DESIGN.md section 2, step 1) uses.

Normalisation: GroupNorm (Wu & He 2018) or none, never BatchNorm. qdata relies on the loss being a
sum of per-sample terms f(w; x_j, y_j): the gate reweights samples by a_j, the correction
delta_i = (1/b) sum_j a_j (grad f(w; x_j) - grad f(w; Q(x_j))) is computed with weighted batched
backward passes, and the learner recombines gradients computed on different batches. Batch statistics
would couple the samples of a batch (f would depend on the whole batch) and would differ between a
node and the learner, breaking that decomposition; GroupNorm normalises each sample on its own.

Inputs are checked before any layer runs: a model given inputs it cannot take (a CNN on flat
vectors, or params initialised for another sample shape) raises a ValueError naming the expected and
actual shapes instead of an error deep inside XLA, and integer inputs (stored pixels, 0..255, which a
float layer would silently take as values 255 times too large) are refused: models take the float
values ``Dataset.to_float(x)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict

from qdata.checks import is_concrete

__all__ = [
    "LogisticRegression", "MLP", "SmallCNN", "ResNet20", "ResNet18", "ResNet18ImageNet", "STEMS", "MODELS",
    "make_model",
    "init_params", "param_count", "cross_entropy", "per_sample_loss", "logits_and_features", "accuracy",
]

PyTree = Any

# He et al. (2015) initialisation for ReLU networks.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# ----------------------------------------------------------------------------------------------
# Input checks, shared by every model.


def _config(module: nn.Module) -> tuple:
    return tuple((f.name, getattr(module, f.name)) for f in dataclasses.fields(module)
                 if f.name not in ("parent", "name"))


@functools.lru_cache(maxsize=256)
def _expected_param_shapes(cls, config: tuple, sample_shape: tuple, dtype: str) -> dict:
    """Parameter shapes of ``cls(**config)`` for samples of ``sample_shape`` (abstract evaluation only)."""
    model = cls(**dict(config), parent=None)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + sample_shape, dtype)))
    return {k: tuple(v.shape) for k, v in flatten_dict(nn.unbox(shapes)["params"]).items()}


def _check_input(module: nn.Module, x, *, image: bool) -> None:
    name = type(module).__name__
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} takes float inputs, got x of dtype {jnp.dtype(x.dtype).name}: stored samples "
                         f"(uint8 pixels) must be converted to their values first, with Dataset.to_float(x)")
    if image and x.ndim != 4:
        raise ValueError(f"{name} expects images of shape (batch, H, W, C), got x of shape {tuple(x.shape)}")
    if not image and x.ndim < 2:
        raise ValueError(f"{name} expects x of shape (batch, *sample_shape), got x of shape {tuple(x.shape)}")
    if module.is_initializing() or "params" not in module.variables:
        return
    actual = {k: tuple(v.shape) for k, v in flatten_dict(nn.unbox(module.variables["params"])).items()}
    expected = _expected_param_shapes(type(module), _config(module), tuple(x.shape[1:]), jnp.dtype(x.dtype).name)
    if actual == expected:
        return
    wrong = [k for k in expected if actual.get(k) != expected[k]] or sorted(set(actual) ^ set(expected))
    path = wrong[0]
    hint = ""
    first = next((s for s in actual.values() if len(s) in (2, 4)), None)
    n = math.prod(x.shape[1:])
    if first is not None and len(first) == 2 and first[0] != n:
        hint = f" (its first layer takes n = {first[0]} values per sample; x has n = {n})"
    elif first is not None and len(first) == 4 and first[2] != x.shape[-1]:
        hint = f" (its first layer takes C = {first[2]} input channels; x has C = {x.shape[-1]})"
    raise ValueError(
        f"{name}: params do not fit samples of shape {tuple(x.shape[1:])} (x of shape {tuple(x.shape)}): "
        f"parameter {'/'.join(path)} has shape {actual.get(path)} but samples of this shape need "
        f"{expected.get(path)}; the params were initialised for another sample shape{hint}")


def _check_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def _norm(groups: int | None, channels: int) -> Callable:
    if groups is None:
        return lambda x: x
    if channels % groups:
        raise ValueError(f"norm_groups={groups} must divide the channel count {channels}")
    return nn.GroupNorm(num_groups=groups)


# ----------------------------------------------------------------------------------------------
# Models.


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = vec(x) W + c. Features h = vec(x)."""

    num_classes: int

    def __post_init__(self):
        _check_classes(self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        _check_input(self, x, image=False)
        h = x.reshape(x.shape[0], -1)
        logits = nn.Dense(self.num_classes)(h)
        return (logits, h) if return_features else logits


class MLP(nn.Module):
    """Fully connected ReLU network on vec(x); features h = the last hidden layer."""

    num_classes: int
    hidden: Sequence[int] = (256, 256)

    def __post_init__(self):
        _check_classes(self.num_classes)
        if not self.hidden or any(int(w) < 1 for w in self.hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive widths, got {self.hidden!r}")
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))
        super().__post_init__()

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        _check_input(self, x, image=False)
        h = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        logits = nn.Dense(self.num_classes)(h)
        return (logits, h) if return_features else logits


class SmallCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages (32, 64 channels), a 128-unit dense layer (features
    h), then the classifier. Takes images (b, H, W, C) of any size; the params depend on H and W."""

    num_classes: int
    channels: Sequence[int] = (32, 64)
    hidden: int = 128

    def __post_init__(self):
        _check_classes(self.num_classes)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        super().__post_init__()

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        _check_input(self, x, image=True)
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), kernel_init=_conv_init)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        h = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(self.num_classes)(h)
        return (logits, h) if return_features else logits


class _BasicBlock(nn.Module):
    """He et al. (2016) basic residual block: two 3x3 convs, each followed by the norm."""

    channels: int
    strides: int
    norm_groups: int | None
    shortcut: str  # "pad": parameter-free option A of He et al.; "projection": 1x1 conv (option B)

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = nn.Conv(self.channels, (3, 3), s, use_bias=False, kernel_init=_conv_init)(x)
        y = nn.relu(_norm(self.norm_groups, self.channels)(y))
        y = nn.Conv(self.channels, (3, 3), use_bias=False, kernel_init=_conv_init)(y)
        y = _norm(self.norm_groups, self.channels)(y)
        if self.strides != 1 or x.shape[-1] != self.channels:
            if self.shortcut == "pad":
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.channels - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                x = nn.Conv(self.channels, (1, 1), s, use_bias=False, kernel_init=_conv_init)(x)
                x = _norm(self.norm_groups, self.channels)(x)
        return nn.relu(x + y)


STEMS = ("cifar", "imagenet")


class _ResNet(nn.Module):
    num_classes: int
    stage_channels: Sequence[int]
    blocks_per_stage: int
    norm_groups: int | None
    shortcut: str
    stem: str = "cifar"  # one of STEMS

    def __post_init__(self):
        _check_classes(self.num_classes)
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        object.__setattr__(self, "stage_channels", tuple(int(c) for c in self.stage_channels))
        if self.norm_groups is not None and any(c % self.norm_groups for c in self.stage_channels):
            raise ValueError(f"norm_groups={self.norm_groups} must divide every stage width {self.stage_channels}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        _check_input(self, x, image=True)
        c0 = self.stage_channels[0]
        if self.stem == "imagenet":
            # He et al. (2016), Table 1: a 7x7 conv at stride 2, then a 3x3 max-pool at stride 2
            # (224 -> 112 -> 56 before the first stage); paddings 3 and 1 as in torchvision.
            x = nn.Conv(c0, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, kernel_init=_conv_init)(x)
            x = nn.relu(_norm(self.norm_groups, c0)(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            # CIFAR stem: one 3x3 conv at stride 1, no max-pool (small images keep their resolution).
            x = nn.Conv(c0, (3, 3), use_bias=False, kernel_init=_conv_init)(x)
            x = nn.relu(_norm(self.norm_groups, c0)(x))
        for stage, c in enumerate(self.stage_channels):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(c, strides, self.norm_groups, self.shortcut)(x)
        h = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes)(h)
        return (logits, h) if return_features else logits


class ResNet20(_ResNet):
    """CIFAR ResNet-20 (He et al. 2016, section 4.2): a 3x3 conv, then 3 stages of 3 basic blocks with
    16, 32, 64 channels (stride 2 at the start of stages 2 and 3), global average pooling (features h,
    64-d) and the classifier; parameter-free "option A" shortcuts; ~0.27M parameters.

    GroupNorm with 2 groups replaces BatchNorm, as in Hsieh et al. (2020), "The non-IID data quagmire
    of decentralized machine learning" (see the module docstring for why BatchNorm is excluded).
    """

    stage_channels: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 3
    norm_groups: int | None = 2
    shortcut: str = "pad"


class ResNet18(_ResNet):
    """ResNet-18 (He et al. 2016) with the CIFAR stem (3x3 conv at stride 1, no max-pool): 4 stages of
    2 basic blocks with 64, 128, 256, 512 channels, 1x1 projection shortcuts, global average pooling
    (features h, 512-d); ~11.2M parameters for 10 classes. GroupNorm with 32 groups (Wu & He 2018)
    replaces BatchNorm (see the module docstring). ``stem="imagenet"`` (:class:`ResNet18ImageNet`)
    gives the ImageNet stem."""

    stage_channels: Sequence[int] = (64, 128, 256, 512)
    blocks_per_stage: int = 2
    norm_groups: int | None = 32
    shortcut: str = "projection"


class ResNet18ImageNet(ResNet18):
    """ResNet-18 with the ImageNet stem of He et al. (2016), Table 1: a 7x7 conv at stride 2, the norm,
    ReLU and a 3x3 max-pool at stride 2, so a 224x224 image enters the first stage at 56x56; the rest
    is :class:`ResNet18`. 11,689,512 parameters for 1000 classes, torchvision's ``resnet18`` figure:
    GroupNorm has the same scale and bias per channel as BatchNorm, whose running statistics are
    buffers, not parameters."""

    stem: str = "imagenet"


MODELS = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet20": ResNet20,
    "resnet18": ResNet18,
    "resnet18_imagenet": ResNet18ImageNet,
}


def make_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """The model called ``name`` (one of :data:`MODELS`) with ``num_classes`` outputs; ``kwargs`` go to
    its constructor (e.g. ``hidden=(128,)`` for ``"mlp"``). The MLP's widths can also be given in the
    name, as on the command line: ``"mlp:128"``, ``"mlp:256x256"``."""
    if name.startswith("mlp:") and "hidden" not in kwargs:
        widths = name.split(":", 1)[1]
        try:
            hidden = tuple(int(w) for w in widths.split("x"))
        except ValueError:
            hidden = ()
        if not hidden or min(hidden) < 1:
            raise ValueError(f"model {name!r}: the MLP's hidden widths must be positive integers, e.g. 'mlp:128x64'")
        name, kwargs = "mlp", {**kwargs, "hidden": hidden}
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    _check_classes(num_classes)
    return MODELS[name](num_classes=int(num_classes), **kwargs)


# ----------------------------------------------------------------------------------------------
# Functions of (params, batch).


def init_params(model: nn.Module, key: jax.Array, sample_shape: Sequence[int]) -> PyTree:
    """Initial parameters w_0 of ``model`` for samples of shape ``sample_shape`` (the 'params' collection)."""
    shape = tuple(sample_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive integers, got {sample_shape!r}")
    init = lambda k: model.init(k, jnp.zeros((1,) + shape, jnp.float32))["params"]
    # Inside jit / eval_shape (where even a fresh constant is a tracer) there is nothing to compile here.
    if not (is_concrete(key) and is_concrete(jnp.zeros(()))):
        return init(key)
    # One compiled program (run eagerly, every initializer would compile on its own). It runs once, so
    # on CPU it is compiled without backend optimisation: a ResNet's init then compiles ~5x faster.
    lowered = jax.jit(init).lower(key)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(options)(key)


def param_count(params: PyTree) -> int:
    """d, the number of scalar parameters."""
    return int(sum(math.prod(jnp.shape(p)) for p in jax.tree_util.tree_leaves(params)))


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample cross-entropy f(w; x_j, y_j) = logsumexp(z_j) - z_j[y_j] of logits z, shape (b,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def per_sample_loss(model: nn.Module) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
    """``loss_fn(params, x, y) -> (b,)`` per-sample cross-entropy of ``model`` (jit/vmap/grad-able)."""

    def loss_fn(params, x, y):
        return cross_entropy(model.apply({"params": params}, x), y)

    return loss_fn


def logits_and_features(model: nn.Module) -> Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]]:
    """``fn(params, x) -> (logits (b, C), h (b, m))``, h the input of the final dense layer."""

    def fn(params, x):
        return model.apply({"params": params}, x, return_features=True)

    return fn


@functools.lru_cache(maxsize=64)
def _correct_count(model: nn.Module):
    @jax.jit
    def count(params, x, y, valid):
        pred = jnp.argmax(model.apply({"params": params}, x), axis=-1)
        return jnp.sum((pred == y) & valid)

    return count


def accuracy(model: nn.Module, params: PyTree, x, y, batch_size: int = 1024,
             to_float: Callable | None = None) -> float:
    """Share of samples whose arg-max logit is the label, evaluated in jitted batches.

    The last batch is padded to ``batch_size`` (padding masked out) so one compilation serves all.

    Args:
      model, params: the classifier and its parameters w.
      x, y: the samples and their labels.
      batch_size: samples per jitted batch.
      to_float: applied to each batch of ``x`` before the model sees it, e.g. ``Dataset.to_float``
        for samples stored as uint8: the float values then exist one batch at a time.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"x of shape {x.shape} and y of shape {y.shape} must hold the same number of samples")
    total = x.shape[0]
    if total == 0:
        raise ValueError("accuracy needs at least one sample")
    size = min(int(batch_size), total)
    count = _correct_count(model)
    correct = 0
    for start in range(0, total, size):
        xb, yb = x[start:start + size], y[start:start + size]
        if to_float is not None:
            xb = to_float(xb)
        valid = np.ones(size, bool)
        if xb.shape[0] < size:
            pad = size - xb.shape[0]
            valid[xb.shape[0]:] = False
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, axis=0)])
        correct += int(count(params, xb, yb, valid))
    return correct / total
