"""Train one configuration with coder='fixed' and coder='ans' (tests of the entropy coders of data codes)."""

import jax
import numpy as np

from qdata.run import final_params, train


def train_both_coders(base, tmp_path):
    """Train ``base`` with each coder; assert the two runs end with bitwise equal parameters (the coders
    are lossless) and return each coder's last record."""
    records, params = {}, {}
    for coder in ("fixed", "ans"):
        config = base.replace(coder=coder, name=coder)
        records[coder] = train(config, tmp_path / coder)
        params[coder] = final_params(tmp_path / coder, config)
    for a, b in zip(jax.tree_util.tree_leaves(params["fixed"]), jax.tree_util.tree_leaves(params["ans"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return records
