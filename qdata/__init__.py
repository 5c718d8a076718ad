"""qdata: learn from distributed data by quantizing the data, not the gradients."""
from qdata.estimator import Estimator, NodeMessage, full_gradient, qdata_estimator
from qdata.gate import (
    Gate, Selection, bernoulli_gate, gradient_norm_score, loss_score, no_gate, top_fraction_gate, water_fill,
)
