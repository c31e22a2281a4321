"""Learning and averaging over an abstract network: matchmaking, secure all-reduce, baselines.

The public names below are exported lazily (PEP 562): ``import gossip`` imports nothing else,
and ``gossip.Learner`` imports ``gossip.learner`` on first use. This keeps the package light and
avoids an import cycle: ``p2p.messages`` imports ``gossip.messages`` (the wire union), which runs
this file first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from murmur._lazy import lazy_exports as _lazy_exports

if TYPE_CHECKING:
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

_EXPORTS: dict[str, str] = {
    # learner
    "BudgetLike": "gossip.learner",
    "Contribution": "gossip.learner",
    "Learner": "gossip.learner",
    "TrainConfig": "gossip.learner",
    # privacy
    "PrivacyConfig": "gossip.privacy",
    "PrivacyPlan": "gossip.privacy",
    "PrivacyUnit": "gossip.privacy",
    "plan_privacy": "gossip.privacy",
    # tasks and data
    "TASK_NAMES": "gossip.tasks",
    "Evaluation": "gossip.tasks",
    "Task": "gossip.tasks",
    "accuracy": "gossip.tasks",
    "credit_task": "gossip.tasks",
    "digits_task": "gossip.tasks",
    "make_task": "gossip.tasks",
    "roc_auc": "gossip.tasks",
    "partition": "gossip.data",
    "peer_shards": "gossip.data",
    # model vectors
    "Layout": "gossip.model",
    "LayoutEntry": "gossip.model",
    "flatten": "gossip.model",
    "restore": "gossip.model",
    # reference averaging and batched training
    "IdealResult": "gossip.ideal",
    "RoundMetrics": "gossip.ideal",
    "build_learners": "gossip.ideal",
    "run_ideal": "gossip.ideal",
    "train_centralized": "gossip.ideal",
    "weighted_mean": "gossip.ideal",
    "local_update_many": "gossip.batched",
    # the network interface
    "GossipHandler": "gossip.network",
    "Network": "gossip.network",
    "StaticView": "gossip.network",
    "TransportNetwork": "gossip.network",
    # groups and averaging
    "Group": "gossip.matchmaking",
    "GroupFormer": "gossip.matchmaking",
    "HashMatchmaker": "gossip.matchmaking",
    "MatchConfig": "gossip.matchmaking",
    "Matchmaker": "gossip.matchmaking",
    "AllReduceConfig": "gossip.allreduce",
    "AllReduceStats": "gossip.allreduce",
    "AverageResult": "gossip.allreduce",
    "Averager": "gossip.allreduce",
    "GroupAllReduce": "gossip.allreduce",
    "GroupAverager": "gossip.allreduce",
    "AVERAGERS": "gossip.baselines",
    "Dpsgd": "gossip.baselines",
    "PairwiseGossip": "gossip.baselines",
    "PushSum": "gossip.baselines",
    "build_averager": "gossip.baselines",
    "metropolis_weights": "gossip.baselines",
    "topology": "gossip.baselines",
    # one peer's round loop
    "Evaluate": "gossip.service",
    "InlineExecutor": "gossip.service",
    "RoundReport": "gossip.service",
    "RoundStatus": "gossip.service",
    "TrainingSession": "gossip.service",
    "load_state": "gossip.service",
    "save_model": "gossip.service",
}

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


__getattr__, __dir__ = _lazy_exports("gossip", _EXPORTS, globals())
