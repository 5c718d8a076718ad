"""qdata: learn from distributed data by quantizing the data, not the gradients.

Where things are: what crosses a link and its exact bits in :mod:`qdata.codecs`; the importance gate
in :mod:`qdata.gate`; the correction in :mod:`qdata.correction`; one node's estimator (gate, sample
codec, correction) and what the learner reads off its message in :mod:`qdata.estimator`; the training
methods in :mod:`qdata.methods`; the round loop over nodes, devices and processes in
:mod:`qdata.engine`; a run from a config to a results file in :mod:`qdata.run`.
"""
from qdata.correction import Correction, no_correction
from qdata.estimator import Estimator, NodeMessage, NodeState, full_gradient
from qdata.gate import (
    Gate, Selection, bernoulli_gate, gradient_norm_score, loss_score, no_gate, top_fraction_gate, water_fill,
)
from qdata.methods.qdata import qdata_estimator

__all__ = [
    "Estimator", "NodeMessage", "NodeState", "full_gradient", "qdata_estimator",
    "Correction", "no_correction",
    "Gate", "Selection", "bernoulli_gate", "gradient_norm_score", "loss_score", "no_gate",
    "top_fraction_gate", "water_fill",
]
