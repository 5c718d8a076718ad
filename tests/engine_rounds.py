"""Drive the engine for a test: a config's experiment, placed on a mesh of ``devices`` devices, run for
a number of rounds over the config's link (its faults and integrity checks, as the run loop builds it),
without the run loop's records or checkpoints."""

from qdata import engine
from qdata import faults as qfaults
from qdata.config import RunConfig
from qdata.run import Experiment


def engine_rounds(config: RunConfig, rounds: int = 1, devices: int = 1):
    """``(experiment, state, bits, diagnostics)`` after ``rounds`` rounds of ``config``'s method, its
    nodes spread over ``devices`` devices; ``bits`` and ``diagnostics`` are per round
    (:func:`qdata.engine.run_rounds`)."""
    exp = Experiment(config)
    mesh = engine.node_mesh(devices)
    shards = engine.place_shards(mesh, exp.dataset.x_train, exp.dataset.y_train, exp.index, exp.count)
    state = engine.place_state(mesh, engine.init_state(exp.method, exp.optimizer, exp.params, config.num_nodes,
                                                        config.seed))
    link = engine.Link(qfaults.parse_faults(config.faults), config.integrity)
    one = engine.make_round(exp.method, exp.optimizer, mesh, batch_size=config.batch_size, state_template=state,
                            to_float=exp.dataset.to_float, link=link)
    state, bits, diagnostics = engine.run_rounds(one, state, shards, rounds)
    return exp, state, bits, diagnostics
