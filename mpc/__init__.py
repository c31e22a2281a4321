"""Secure aggregation (pairwise masks, Shamir dropout recovery, SecAgg+), sans-IO.

``Member`` is one member's state machine (``mpc.protocol``); the messages it exchanges are in
``mpc.messages``; ``secure_sum`` runs a whole group in memory (``mpc.driver``). The primitives
(fixed point, mask PRG, KDF, Shamir, per-round keys, mask graphs) are re-exported here too.
"""

from mpc.driver import DROP_STAGES, GroupRun, run_group, secure_sum, secure_sum_ring
from mpc.fixedpoint import (
    Bits,
    check_capacity,
    decode,
    encode,
    max_scale,
    ring_add,
    ring_dtype,
    ring_sub,
)
from mpc.graph import default_degree, mask_graph
from mpc.kdf import derive, pair_seed
from mpc.keys import (
    RoundKeys,
    agree,
    new_round_keys,
    open_from,
    seal_to,
    sign_advertisement,
    verify_advertisement,
)
from mpc.messages import (
    MESSAGE_TYPES,
    AdvertiseKeys,
    ChunkSum,
    MaskedChunk,
    Message,
    ReassignedChunk,
    Receipt,
    Reveal,
    ShareKeys,
)
from mpc.prg import add_mask_, add_masks_, keystream, mask, masked, new_seed
from mpc.protocol import Member, Outgoing, Stage, default_threshold
from mpc.shamir import Share, combine, split
from murmur.errors import AggregationAborted

__all__ = [
    "DROP_STAGES",
    "MESSAGE_TYPES",
    "AdvertiseKeys",
    "AggregationAborted",
    "Bits",
    "ChunkSum",
    "GroupRun",
    "MaskedChunk",
    "Member",
    "Message",
    "Outgoing",
    "ReassignedChunk",
    "Receipt",
    "Reveal",
    "RoundKeys",
    "Share",
    "ShareKeys",
    "Stage",
    "add_mask_",
    "add_masks_",
    "agree",
    "check_capacity",
    "combine",
    "decode",
    "default_degree",
    "default_threshold",
    "derive",
    "encode",
    "keystream",
    "mask",
    "mask_graph",
    "masked",
    "max_scale",
    "new_round_keys",
    "new_seed",
    "open_from",
    "pair_seed",
    "ring_add",
    "ring_dtype",
    "ring_sub",
    "run_group",
    "seal_to",
    "secure_sum",
    "secure_sum_ring",
    "sign_advertisement",
    "split",
    "verify_advertisement",
]
