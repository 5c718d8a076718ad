"""Bits per sample against accuracy for the data codes (issue 10, section 2).

Run ``python -m experiments.data_codes --out results/data_codes`` (``--dataset digits`` for the
embedded set, ``--epochs``, ``--seeds``, ``--max-train`` for a subset, ``--codes`` to pick rows by
name). For each code: the exact bits per sample of a ``--message``-sample payload (fixed length,
read off its packed arrays), the setup sent once (PCA basis, ranges, widths) and its share per
sample over the node's data, the ANS-coded bits per sample (constriction, real words, decoded back
and checked) with the coder's model (sent once) and the model's cross-entropy (an estimate, labelled),
the reconstruction MSE on the training samples and the test accuracy of the 784-256-256-10 MLP
trained centrally on the *decoded* training samples, one fresh encoding per epoch (as a node
re-sending its samples would). The learning rate of each code is chosen on a validation split
carved from the training set (the test split only reports). One node holds the whole training split
(so the setup is amortized over all of it; with N nodes each pays its own setup, N times the share).

Writes ``data_codes.json`` and ``data_codes.png`` (accuracy vs bits per sample, log x) under ``--out``;
``--plot-only`` redraws the figure from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdata import data, models
from qdata.codecs import entropy, stochastic_rounding, subtractive_dither, transform_codes

# name -> (family, keyword arguments); transform budgets are code bits per sample.
CODES = {
    "raw-fp32": ("raw", {}),
    "pixel-sr-4b": ("pixel", {"bits": 4, "rounding": "stochastic"}),
    "pixel-sr-2b": ("pixel", {"bits": 2, "rounding": "stochastic"}),
    "pixel-dither-2b": ("pixel", {"bits": 2, "rounding": "dither"}),
    "pixel-sr-1b": ("pixel", {"bits": 1, "rounding": "stochastic"}),
    "pixel-dither-1b": ("pixel", {"bits": 1, "rounding": "dither"}),
    "dct-sr-200": ("dct", {"budget": 200, "rounding": "stochastic"}),
    "dct-sr-400": ("dct", {"budget": 400, "rounding": "stochastic"}),
    "dct-sr-800": ("dct", {"budget": 800, "rounding": "stochastic"}),
    "pca-sr-100": ("pca", {"budget": 100, "rounding": "stochastic"}),
    "pca-sr-200": ("pca", {"budget": 200, "rounding": "stochastic"}),
    "pca-sr-400": ("pca", {"budget": 400, "rounding": "stochastic"}),
    "pca-sr-800": ("pca", {"budget": 800, "rounding": "stochastic"}),
    "pca-dither-200": ("pca", {"budget": 200, "rounding": "dither"}),
    "pca-dither-400": ("pca", {"budget": 400, "rounding": "dither"}),
    "pca-sr-1b-200": ("pca", {"budget": 200, "rounding": "stochastic", "max_width": 1, "allocation": "uniform"}),
    "pca-dither-1b-200": ("pca", {"budget": 200, "rounding": "dither", "max_width": 1, "allocation": "uniform"}),
    "pca-dither-2b-400": ("pca", {"budget": 400, "rounding": "dither", "max_width": 2, "allocation": "uniform"}),
}


@dataclasses.dataclass
class Config:
    dataset: str = "fashion_mnist"
    epochs: int = 4
    seeds: tuple = (0,)
    learning_rates: tuple = (1e-3, 3e-3)
    batch_size: int = 128
    validation: float = 0.1
    message: int = 64
    max_train: int | None = None
    codes: tuple = tuple(CODES)


# ----------------------------------------------------------------------------------------------
# Codes.


class Built:
    """A code ready to run: ``roundtrip(key, x) -> (x_hat, payload)``, its setup bits, its codes."""

    def __init__(self, quantizer, setup_bits: int, codes_of, alphabet, setup=None):
        self.quantizer, self.setup_bits, self.codes_of, self.alphabet = quantizer, setup_bits, codes_of, alphabet
        self.setup = setup

    def bias_mse(self, x: np.ndarray, chunk: int = 6000) -> float:
        """Mean squared truncation bias per coordinate, ``mean ||E[x_hat] - x||^2 / n`` (0 for pixel codes,
        which are unbiased inside their range)."""
        if self.setup is None:
            return 0.0
        total = sum(float(jnp.sum(transform_codes.truncation_bias(self.setup, x[a:b]) ** 2))
                    for a, b in _chunks(x.shape[0], chunk))
        return total / x.size

    def roundtrip(self, key, x):
        payload = self.quantizer.encode(key, x)
        return self.quantizer.decode(payload), payload


def build(name: str, x_train: np.ndarray, lo: float, hi: float) -> Built | None:
    """The code ``name`` of :data:`CODES`, fitted on the node's training samples where it is fitted."""
    family, kw = CODES[name]
    n = math.prod(x_train.shape[1:])
    if family == "raw":
        return None
    if family == "pixel":
        factory = stochastic_rounding if kw["rounding"] == "stochastic" else subtractive_dither
        return Built(factory(kw["bits"], lo, hi), 0, entropy.quantizer_codes, [1 << kw["bits"]] * n)
    setup = transform_codes.fit_transform_code(x_train, kw["budget"], basis=family, rounding=kw["rounding"],
                                               max_width=kw.get("max_width", transform_codes.MAX_WIDTH),
                                               allocation=kw.get("allocation", "waterfill"))
    widths = transform_codes.transform_state(setup).widths
    return Built(transform_codes.transform_code(setup), transform_codes.setup_bits(setup),
                 lambda p: transform_codes.payload_codes(setup, p), [1 << int(w) for w in widths], setup)


def _chunks(total: int, size: int):
    return [(a, min(total, a + size)) for a in range(0, total, size)]


def decoded_epoch(built: Built | None, key, x: np.ndarray, chunk: int = 6000) -> tuple[np.ndarray, list]:
    """One fresh encoding of every training sample, decoded; and the payloads (for bits and coding)."""
    if built is None:
        return x, []
    out, payloads = [], []
    for i, (a, b) in enumerate(_chunks(x.shape[0], chunk)):
        x_hat, payload = built.roundtrip(jax.random.fold_in(key, i), jnp.asarray(x[a:b]))
        out.append(np.asarray(x_hat))
        payloads.append(payload)
    return np.concatenate(out), payloads


def measure_bits(built: Built | None, x: np.ndarray, payloads: list, message: int) -> dict:
    """Fixed-length bits of a message, setup share, and the ANS-coded bits of a whole fresh encoding
    (the model is fitted on the codes of ``payloads``, an earlier encoding, and sent once)."""
    n_train = x.shape[0]
    if built is None:
        return {"bits_per_sample": 32 * math.prod(x.shape[1:]), "setup_bits": 0}
    probe = built.quantizer.encode(jax.random.key(0), jnp.asarray(x[:message]))
    fixed = built.quantizer.bits(probe) / message
    model = entropy.fit_categorical(np.concatenate([built.codes_of(p) for p in payloads]), built.alphabet)
    codes = np.concatenate([built.codes_of(p) for p in decoded_epoch(built, jax.random.key(20_000), x)[1]])
    coder = entropy.entropy_coder(model)
    coded, start = 0, time.perf_counter()
    for a, b in _chunks(n_train, message):
        words = coder.encode(codes[a:b])
        coded += coder.bits(words)
        if a == 0 and not np.array_equal(coder.decode(words, b - a), codes[a:b]):
            raise AssertionError("the ANS words do not decode to the codes")
    estimate = entropy.cross_entropy_bits(model, codes) / n_train
    return {"bits_per_sample": fixed, "setup_bits": built.setup_bits, "setup_per_sample": built.setup_bits / n_train,
            "coded_bits_per_sample": coded / n_train, "model_bits": entropy.model_bits(model),
            "model_per_sample": entropy.model_bits(model) / n_train, "entropy_estimate_per_sample": estimate,
            "coding_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# Training (plain optax loop, centrally, on the decoded samples).


def _trainer(model, batch_size: int, lr: float):
    opt = optax.adam(lr)
    loss_fn = models.per_sample_loss(model)

    @jax.jit
    def epoch(state, x, y, order):
        def step(carry, idx):
            params, opt_state = carry
            grad = jax.grad(lambda p: jnp.mean(loss_fn(p, x[idx], y[idx])))(params)
            updates, opt_state = opt.update(grad, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, state, order)[0]

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

    return opt, epoch, accuracy


def train(model, epochs_x, y, evals: dict, lr: float, cfg: Config, seed: int) -> dict:
    """Adam at ``lr`` for ``cfg.epochs`` epochs; ``epochs_x(e)`` gives epoch e's (decoded) samples."""
    opt, epoch, accuracy = _trainer(model, cfg.batch_size, lr)
    key = jax.random.key(seed)
    params = models.init_params(model, key, y.shape[:0] + evals["val"][0].shape[1:])
    state = (params, opt.init(params))
    steps = y.shape[0] // cfg.batch_size
    rng = np.random.default_rng(seed)
    for e in range(cfg.epochs):
        order = rng.permutation(y.shape[0])[: steps * cfg.batch_size].reshape(steps, cfg.batch_size)
        state = epoch(state, jnp.asarray(epochs_x(e)), jnp.asarray(y), jnp.asarray(order))
    return {k: float(accuracy(state[0], jnp.asarray(x), jnp.asarray(t))) for k, (x, t) in evals.items()}


# ----------------------------------------------------------------------------------------------
# The measurement.


def load(cfg: Config):
    try:
        ds = data.load_dataset(cfg.dataset, max_train=cfg.max_train)
    except data.DatasetUnavailableError as err:
        print(f"{cfg.dataset} unavailable ({err}); falling back to digits")
        ds = data.load_dataset("digits", max_train=cfg.max_train)
    train_ds, x_val, y_val = data.split_validation(ds, cfg.validation, seed=0)
    f = lambda a: np.asarray(ds.to_float(a), np.float32)
    return ds, f(train_ds.x_train), train_ds.y_train, {"val": (f(x_val), y_val), "test": (f(ds.x_test), ds.y_test)}


def run_code(name: str, cfg: Config, ds, x, y, evals) -> dict:
    start = time.perf_counter()
    built = build(name, x, *ds.value_range)
    first, payloads = decoded_epoch(built, jax.random.key(10_000), x)
    row = {"code": name, "family": CODES[name][0], **CODES[name][1], **measure_bits(built, x, payloads, cfg.message)}
    row["mse"] = float(np.mean((first - x) ** 2))
    row["bias_mse"] = 0.0 if built is None else built.bias_mse(x)
    model = models.make_model("mlp", ds.num_classes)
    runs = []
    for seed in cfg.seeds:
        for lr in cfg.learning_rates:
            epochs_x = lambda e: first if e == 0 else decoded_epoch(built, jax.random.key(seed * 1000 + e), x)[0]
            runs.append({"seed": seed, "lr": lr, **train(model, epochs_x, y, evals, lr, cfg, seed)})
    best_lr = max(cfg.learning_rates, key=lambda lr: np.mean([r["val"] for r in runs if r["lr"] == lr]))
    chosen = [r for r in runs if r["lr"] == best_lr]
    row.update(runs=runs, lr=best_lr, test_accuracy=float(np.mean([r["test"] for r in chosen])),
               test_accuracy_range=[min(r["test"] for r in chosen), max(r["test"] for r in chosen)],
               seconds=time.perf_counter() - start)
    return row


def caption(results: dict) -> str:
    cfg = results["config"]
    return (f"{results['dataset']}, MLP 784-256-256-10 (Adam, lr from {cfg['learning_rates']} on validation), "
            f"{cfg['epochs']} epochs on decoded samples (fresh encoding each epoch), seeds {cfg['seeds']}")


def table(results: dict) -> str:
    head = (f"{'code':<20}{'bits/s':>8}{'+setup':>8}{'ANS':>8}{'+model':>8}{'H est':>8}"
            f"{'mse':>10}{'bias mse':>10}{'lr':>8}{'test acc':>10}  range")
    legend = ("bits/s: fixed-length payload bits per sample (exact, read off a message's arrays); +setup, +model: "
              "the setup and the ANS model (sent once) per training sample of the one node; ANS: constriction-coded "
              "bits per sample of a fresh encoding in messages of the config's size; H est: cross-entropy (an "
              "estimate, not a coded length); mse: E||x_hat - x||^2 / n; bias mse: ||E[x_hat] - x||^2 / n "
              "(truncation); test acc: mean over seeds [min, max] at the lr chosen on validation")
    lines = [caption(results), textwrap.fill(legend, 110), head]
    for r in results["rows"]:
        ans = r.get("coded_bits_per_sample")
        fmt = lambda v, w=8, p=0: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
        lines.append(f"{r['code']:<20}{fmt(r['bits_per_sample'])}{fmt(r.get('setup_per_sample', 0.0), 8, 1)}"
                     f"{fmt(ans, 8, 1)}{fmt(r.get('model_per_sample'), 8, 1)}"
                     f"{fmt(r.get('entropy_estimate_per_sample'), 8, 1)}{r['mse']:>10.5f}{fmt(r.get('bias_mse'), 10, 5)}"
                     f"{r['lr']:>8.0e}{100 * r['test_accuracy']:>10.2f}"
                     f"  [{100 * r['test_accuracy_range'][0]:.2f}, {100 * r['test_accuracy_range'][1]:.2f}]")
    return "\n".join(lines)


def plot(results_path: str, figure_path: str, caption_line: str | None = None) -> None:
    """Accuracy against bits per sample (log x) from the results file alone, ``caption_line`` (default
    :func:`caption`) printed under it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as f:
        results = json.load(f)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    raw = [r for r in results["rows"] if r["family"] == "raw"]
    markers = {"pixel": "o", "dct": "s", "pca": "^"}
    for family, marker in markers.items():
        rows = [r for r in results["rows"] if r["family"] == family]
        if not rows:
            continue
        acc = [100 * r["test_accuracy"] for r in rows]
        ax.scatter([r["bits_per_sample"] for r in rows], acc, marker=marker, label=f"{family}, fixed length")
        ax.scatter([r["coded_bits_per_sample"] for r in rows], acc, marker=marker, facecolors="none",
                   edgecolors="k", label=f"{family}, ANS-coded")
        for r in rows:
            ax.annotate(r["code"], (r["bits_per_sample"], 100 * r["test_accuracy"]), fontsize=6)
    if raw:
        ax.axhline(100 * raw[0]["test_accuracy"], color="gray", ls="--", label="raw fp32 samples")
        ax.axhline(100 * raw[0]["test_accuracy"] - 1, color="gray", ls=":", label="raw - 1 point")
    ax.axvline(800, color="r", lw=0.8, label="800 bits (target)")
    ax.set_xscale("log")
    ax.set_xlabel("bits per sample (exact, per-sample payload; setup and model excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    lines = textwrap.wrap(caption_line or caption(results), 140)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7)
    fig.tight_layout(rect=(0, max(0.06, (0.13 * len(lines) + 0.05) / 5.5), 1, 1))  # room for every caption line
    fig.savefig(figure_path, dpi=150)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/data_codes")
    p.add_argument("--dataset", default=Config.dataset)
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--seeds", default="0")
    p.add_argument("--lrs", default=",".join(str(v) for v in Config.learning_rates))
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--codes", default=",".join(CODES))
    p.add_argument("--plot-only", action="store_true")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results_path, figure_path = os.path.join(a.out, "data_codes.json"), os.path.join(a.out, "data_codes.png")
    if not a.plot_only:
        unknown = [c for c in a.codes.split(",") if c not in CODES]
        if unknown:
            raise SystemExit(f"unknown codes {unknown}; known: {', '.join(CODES)}")
        cfg = Config(dataset=a.dataset, epochs=a.epochs, seeds=tuple(int(s) for s in a.seeds.split(",")),
                     learning_rates=tuple(float(v) for v in a.lrs.split(",")), max_train=a.max_train,
                     codes=tuple(a.codes.split(",")))
        ds, x, y, evals = load(cfg)
        results = {"config": dataclasses.asdict(cfg), "dataset": ds.name, "num_train": int(x.shape[0]), "rows": []}
        for name in cfg.codes:
            results["rows"].append(run_code(name, cfg, ds, x, y, evals))
            print(f"{name}: {results['rows'][-1]['seconds']:.0f} s", flush=True)
            with open(results_path, "w") as f:
                json.dump(results, f, indent=1)
    with open(results_path) as f:
        print(table(json.load(f)))
    plot(results_path, figure_path)


if __name__ == "__main__":
    main()
