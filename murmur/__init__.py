"""Murmur: decentralized, private training of PyTorch models.

The Python API, in a few lines (``murmur.api``, ``murmur.api_peer``, ``murmur.api_sim``)::

    import murmur

    training = murmur.Training(model=make_model, data=loader, lr=0.1,
                               averaging=murmur.SecureGroups(size=4),
                               privacy=murmur.Privacy(epsilon=8.0, delta=1e-5))

    async with murmur.Peer(listen="0.0.0.0:7070", bootstrap=["10.0.0.2:7070"]) as peer:
        async for report in peer.train(training):    # one RoundReport per round
            print(report.round, report.accuracy, report.epsilon)

    result = murmur.simulate(training, peers=50)     # the same description, simulated

The API's names are exported lazily (PEP 562): ``import murmur`` and ``import floor.errors``
(used by every layer, including ``dp`` and ``mpc``) import neither torch nor the network code.
"""

from __future__ import annotations

from floor import __version__
from floor.errors import MurmurError
from murmur.api import (
    MIN_GROUP_SIZE,
    Averaging,
    Baseline,
    Privacy,
    SecureGroups,
    Training,
    as_tensors,
)
from murmur.api_peer import Peer, RoundReport, SyncPeer, train
from murmur.api_sim import compare, plot, scenario_for, simulate

__all__ = [
    "MIN_GROUP_SIZE",
    "Averaging",
    "Baseline",
    "MurmurError",
    "Peer",
    "Privacy",
    "RoundReport",
    "SecureGroups",
    "SyncPeer",
    "Training",
    "__version__",
    "as_tensors",
    "compare",
    "plot",
    "scenario_for",
    "simulate",
    "train",
]
