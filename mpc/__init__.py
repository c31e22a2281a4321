"""Secure aggregation (pairwise masks, Shamir dropout recovery, SecAgg+), sans-IO.

``Member`` is one member's state machine (``mpc.protocol``); the messages it exchanges are in
``mpc.messages``; ``secure_sum`` runs a whole group in memory (``mpc.driver``). The primitives
(fixed point, mask PRG, KDF, Shamir, pair keys, mask graphs) are re-exported here too.
"""

from floor.errors import AggregationAborted
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
from mpc.kdf import PAIR_KEYS_LABEL, PAIR_SEED_LABEL, derive, pair_keys, pair_seed, u64
from mpc.keys import (
    KEY_BYTES,
    PAIR_ROOT_LABEL,
    open_with,
    pair_root,
    seal_with,
)
from mpc.messages import (
    MESSAGE_TYPES,
    ChunkSum,
    Input,
    Message,
    ReassignedChunk,
    Receipt,
    Reveal,
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
from mpc.state import warm_pair_roots

__all__ = [
    "CHUNK_BYTES",
    "DROP_STAGES",
    "GRAPH_LABEL",
    "KEY_BYTES",
    "MAX_SHARES",
    "MESSAGE_TYPES",
    "PAIR_KEYS_LABEL",
    "PAIR_ROOT_LABEL",
    "PAIR_SEED_LABEL",
    "PRIME",
    "SECRET_BYTES",
    "SEED_BYTES",
    "SHARE_BYTES",
    "AggregationAborted",
    "Bits",
    "ChunkSum",
    "GroupRun",
    "Input",
    "Member",
    "Message",
    "Outgoing",
    "ReassignedChunk",
    "Receipt",
    "Reveal",
    "Share",
    "Stage",
    "View",
    "add_mask_",
    "add_masks_",
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
    "new_seed",
    "open_with",
    "pair_keys",
    "pair_root",
    "pair_seed",
    "ring_add",
    "ring_add_",
    "ring_dtype",
    "ring_sub",
    "ring_sub_",
    "run_group",
    "seal_with",
    "secure_sum",
    "secure_sum_ring",
    "split",
    "u64",
    "warm_pair_roots",
]
