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
    ring_add_,
    ring_dtype,
    ring_sub,
    ring_sub_,
)
from mpc.graph import GRAPH_LABEL, default_degree, mask_graph
from mpc.kdf import PAIR_SEED_LABEL, derive, pair_seed, u64
from mpc.keys import (
    KEY_BYTES,
    RoundKeys,
    advertisement_message,
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
    View,
)
from mpc.prg import (
    CHUNK_BYTES,
    SEED_BYTES,
    add_mask_,
    add_masks_,
    keystream,
    keystream_into,
    mask,
    masked,
    new_seed,
)
from mpc.protocol import Member, Outgoing, Stage, default_threshold
from mpc.shamir import MAX_SHARES, PRIME, SECRET_BYTES, SHARE_BYTES, Share, combine, split
from murmur.errors import AggregationAborted

__all__ = [
    "CHUNK_BYTES",
    "DROP_STAGES",
    "GRAPH_LABEL",
    "KEY_BYTES",
    "MAX_SHARES",
    "MESSAGE_TYPES",
    "PAIR_SEED_LABEL",
    "PRIME",
    "SECRET_BYTES",
    "SEED_BYTES",
    "SHARE_BYTES",
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
    "View",
    "add_mask_",
    "add_masks_",
    "advertisement_message",
    "agree",
    "check_capacity",
    "combine",
    "decode",
    "default_degree",
    "default_threshold",
    "derive",
    "encode",
    "keystream",
    "keystream_into",
    "mask",
    "mask_graph",
    "masked",
    "max_scale",
    "new_round_keys",
    "new_seed",
    "open_from",
    "pair_seed",
    "ring_add",
    "ring_add_",
    "ring_dtype",
    "ring_sub",
    "ring_sub_",
    "run_group",
    "seal_to",
    "secure_sum",
    "secure_sum_ring",
    "sign_advertisement",
    "split",
    "u64",
    "verify_advertisement",
]
