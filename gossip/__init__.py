"""Learning and averaging over an abstract network: matchmaking, secure all-reduce, baselines.

``gossip`` stands on ``floor``, ``dp`` and ``mpc`` and never imports the real network (``p2p``),
the simulator or aiohttp. Its averaging protocols are sans-IO machines (``gossip.machine``),
driven by ``gossip.driver`` on an event loop and by ``simulator`` on ticks; ``gossip.spec`` is
the one description of a run and ``gossip.run`` the one place that assembles a peer from it.

Import from the modules (``from gossip.learner import Learner``): this file imports nothing, so
that ``gossip.spec`` stays light for the command-line tools.
"""

__all__: list[str] = []
