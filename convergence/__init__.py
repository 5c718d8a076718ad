"""Theory checks (DESIGN.md section 6): synthetic objectives with known constants, the rate bounds for
SGD with the qdata estimator, and the empirical check of both (``python -m convergence``).

* :mod:`convergence.objectives`: least squares, ridge, logistic regression, a sigmoid-loss classifier and a
  small tanh network, with L, mu, w*, F*, L_x, L_xx and the sampling variance computed from the data.
* :mod:`convergence.bounds`: the convex, strongly convex and non-convex bounds (with bias), the noise
  model of the qdata estimator and the steps each bound prescribes.
* :mod:`convergence.check`: runs the real estimators and compares, writes a JSON report
  (``report.json``); the communication claim (bits per round and rounds to accuracy as d is lifted).
* :mod:`convergence.figures`: the figures, drawn from ``report.json`` alone (so they can be redrawn).
"""
from convergence.bounds import (
    NoiseModel, bound_at, compressed_gradient_noise, convex_bound, nonconvex_bound, prescribed_steps,
    qdata_noise, strongly_convex_bound,
)
from convergence.objectives import (
    Objective, identity_features, least_squares, logistic_regression, random_features, ridge,
    sigmoid_classifier, tanh_network,
)

__all__ = [
    "NoiseModel", "bound_at", "compressed_gradient_noise", "convex_bound", "nonconvex_bound", "prescribed_steps",
    "qdata_noise", "strongly_convex_bound", "Objective", "identity_features", "least_squares",
    "logistic_regression", "random_features", "ridge", "sigmoid_classifier", "tanh_network",
]
