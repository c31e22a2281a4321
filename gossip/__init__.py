"""Learning and averaging over an abstract network: matchmaking, secure all-reduce, baselines.

``gossip`` stands on ``floor``, ``dp`` and ``mpc`` and never imports the real network (``p2p``),
the simulator or aiohttp. Its protocols are sans-IO machines driven by ``gossip.driver`` on an
event loop, and by ``simulator`` on ticks.
"""

from __future__ import annotations

from gossip.allreduce import (
    AllReduceConfig,
    AllReduceStats,
    Averager,
    AverageResult,
    GroupAllReduce,
    GroupAverager,
)
from gossip.baselines import (
    AVERAGERS,
    Dpsgd,
    PairwiseGossip,
    PushSum,
    build_averager,
    metropolis_weights,
    topology,
)
from gossip.batched import local_update_many
from gossip.data import partition, peer_shards
from gossip.ideal import (
    IdealResult,
    RoundMetrics,
    build_learners,
    run_ideal,
    train_centralized,
    weighted_mean,
)
from gossip.learner import BudgetLike, Contribution, Learner, TrainConfig
from gossip.matchmaking import Group, GroupFormer, HashMatchmaker, MatchConfig, Matchmaker
from gossip.model import Layout, LayoutEntry, flatten, restore
from gossip.network import GossipHandler, Network, StaticView, TransportNetwork
from gossip.privacy import PrivacyConfig, PrivacyPlan, PrivacyUnit, plan_privacy
from gossip.service import (
    Evaluate,
    InlineExecutor,
    RoundReport,
    RoundStatus,
    TrainingSession,
    load_state,
    save_model,
)
from gossip.tasks import (
    TASK_NAMES,
    Evaluation,
    Task,
    accuracy,
    credit_task,
    digits_task,
    make_task,
    roc_auc,
)

__all__ = [
    "AVERAGERS",
    "TASK_NAMES",
    "AllReduceConfig",
    "AllReduceStats",
    "AverageResult",
    "Averager",
    "BudgetLike",
    "Contribution",
    "Dpsgd",
    "Evaluate",
    "Evaluation",
    "GossipHandler",
    "Group",
    "GroupAllReduce",
    "GroupAverager",
    "GroupFormer",
    "HashMatchmaker",
    "IdealResult",
    "InlineExecutor",
    "Layout",
    "LayoutEntry",
    "Learner",
    "MatchConfig",
    "Matchmaker",
    "Network",
    "PairwiseGossip",
    "PrivacyConfig",
    "PrivacyPlan",
    "PrivacyUnit",
    "PushSum",
    "RoundMetrics",
    "RoundReport",
    "RoundStatus",
    "StaticView",
    "Task",
    "TrainConfig",
    "TrainingSession",
    "TransportNetwork",
    "accuracy",
    "build_averager",
    "build_learners",
    "credit_task",
    "digits_task",
    "flatten",
    "load_state",
    "local_update_many",
    "make_task",
    "metropolis_weights",
    "partition",
    "peer_shards",
    "plan_privacy",
    "restore",
    "roc_auc",
    "run_ideal",
    "save_model",
    "topology",
    "train_centralized",
    "weighted_mean",
]
