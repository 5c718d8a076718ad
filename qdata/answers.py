"""Who answered: the host's exact account of a run with faulty nodes or checked messages.

With a :class:`qdata.engine.Link` on, each compiled round reports per node whether its messages
were applied (``answered``) and how many the integrity check refused (``rejected``). From those,
and the fault schedule, this module keeps the run's per-node totals and its downlink exactly:

* the model broadcast (when the method's nodes need it) goes to every node still in the run (a
  dropped node is sent the model and fails to answer; a node that has left is sent nothing);
* the learner's replies within the round go to the nodes that sent, and with integrity on so does
  the 1-bit accept / reject (:data:`qdata.integrity.ACK_BITS`).

Without a link the downlink is the fixed ``per node per round x N x rounds`` of
:func:`qdata.engine.downlink_bits_per_round`, as before.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qdata import faults as qfaults
from qdata.integrity import ACK_BITS


class Answers(NamedTuple):
    """Exact totals over rounds: per node, rounds whose messages were applied and messages refused;
    all nodes' downlink bits (a Python int)."""

    answered: tuple
    rejected: tuple
    downlink: int

    @classmethod
    def empty(cls, num_nodes: int) -> "Answers":
        return cls((0,) * num_nodes, (0,) * num_nodes, 0)

    @classmethod
    def from_ledger(cls, saved: dict) -> "Answers":
        return cls(tuple(int(v) for v in saved["answered"]), tuple(int(v) for v in saved["rejected"]),
                   int(saved["downlink"]))

    def to_ledger(self) -> dict:
        return {"answered": list(self.answered), "rejected": list(self.rejected), "downlink": self.downlink}


def account(schedule: qfaults.FaultSchedule, answered: np.ndarray, rejected: np.ndarray, first_round: int,
            model_bits: int, reply_bits: int, integrity: bool) -> Answers:
    """The :class:`Answers` of consecutive rounds ``first_round, first_round + 1, ...``.

    Args:
      answered, rejected: the rounds' per-node counts, shape (rounds, N) (the engine's ``LINK_COUNTS``).
      model_bits: the model broadcast to one node in one round (0 when nodes do not need the model).
      reply_bits: the learner's replies to one node in one round.
    """
    answered, rejected = np.asarray(answered, np.int64), np.asarray(rejected, np.int64)
    rounds, num_nodes = answered.shape
    index = np.arange(first_round, first_round + rounds)[:, None]
    present = qfaults.present(schedule, index, np.arange(num_nodes)[None, :])
    sent = (answered > 0) | (rejected > 0)
    down = model_bits * int(present.sum()) + (reply_bits + (ACK_BITS if integrity else 0)) * int(sent.sum())
    return Answers(tuple(int(v) for v in answered.sum(0)), tuple(int(v) for v in rejected.sum(0)), down)


def add(a: Answers, b: Answers) -> Answers:
    return Answers(tuple(x + y for x, y in zip(a.answered, b.answered)),
                   tuple(x + y for x, y in zip(a.rejected, b.rejected)), a.downlink + b.downlink)
