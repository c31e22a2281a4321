"""The one exception tree of Murmur, used by every package.

Every error Murmur raises on purpose is a ``MurmurError``. Leaves also inherit the builtin they
resemble, so ``except TimeoutError`` or ``except ValueError`` keeps working for callers that do
not know our names. Errors that refuse a message carry a ``RefusalCode`` so that a refusal can
cross the wire as a number with a fixed meaning.

    MurmurError
    ├── ConfigError (ValueError)            bad flag, config file, scenario or argument
    ├── KeyFileError (OSError)              identity key file missing, unsafe, truncated, corrupt
    ├── CheckpointError (OSError)           training checkpoint corrupt, unreadable, of another run
    ├── ProtocolError                       a message was refused; carries .code
    │   ├── MessageTooLarge                   size cap exceeded
    │   ├── MalformedMessage (ValueError)     undecodable bytes, wrong field types, bad schema
    │   ├── UnknownMessageType                type tag not in the closed union
    │   ├── UnsupportedVersion                envelope version we do not speak
    │   ├── WrongRecipient                    addressed to another peer
    │   ├── StaleMessage                      timestamp outside the accepted window
    │   ├── ReplayedMessage                   nonce already seen within the window
    │   ├── BadSignature                      Ed25519 signature does not verify
    │   ├── BadSeal                           Box / MAC authentication failed
    │   ├── Unauthorized (PermissionError)    network key or allowlist refused the peer
    │   ├── OutOfStage                        protocol message at the wrong stage
    │   ├── DuplicateMessage                  second message where one is allowed
    │   ├── InconsistentMessage (ValueError)  contradicts earlier messages (shares, keys, sizes)
    │   ├── Overloaded                        over an in-flight budget or a rate limit (BUSY)
    │   └── NoRoute                           a relay does not serve the recipient
    ├── NetworkError (ConnectionError)
    │   ├── PeerUnreachable                   could not connect / peer went away
    │   ├── Timeout (TimeoutError)            a network wait ran past its deadline
    │   ├── TransportClosed                   we closed it (vs. the peer broke it: PeerUnreachable)
    │   └── RemoteRefused                     the peer answered with a refusal code
    ├── PrivacyError
    │   ├── BudgetExhausted                   the next contribution would exceed (eps_max, delta)
    │   ├── AccountingError (ValueError)      invalid accounting arguments
    │   └── BudgetStateError (OSError)        persisted budget state missing or corrupt
    ├── AggregationError
    │   ├── AggregationAborted                fewer than the threshold of members survived
    │   │   └── SumRejected                     the group's result failed a check (names the blamed)
    │   ├── GroupFormationFailed              no group of the minimum size formed in time
    │   └── RingOverflow (OverflowError)      values could overflow the fixed-point ring
    └── TrainingError (RuntimeError)          model/data/optimizer misuse in the learner
"""

from __future__ import annotations

import enum

__all__ = [
    "AccountingError",
    "AggregationAborted",
    "AggregationError",
    "BadSeal",
    "BadSignature",
    "BudgetExhausted",
    "BudgetStateError",
    "CheckpointError",
    "ConfigError",
    "DuplicateMessage",
    "GroupFormationFailed",
    "InconsistentMessage",
    "KeyFileError",
    "MalformedMessage",
    "MessageTooLarge",
    "MurmurError",
    "NetworkError",
    "NoRoute",
    "OutOfStage",
    "Overloaded",
    "PeerUnreachable",
    "PrivacyError",
    "ProtocolError",
    "RefusalCode",
    "RemoteRefused",
    "ReplayedMessage",
    "RingOverflow",
    "StaleMessage",
    "SumRejected",
    "Timeout",
    "TrainingError",
    "TransportClosed",
    "Unauthorized",
    "UnknownMessageType",
    "UnsupportedVersion",
    "WrongRecipient",
]


class RefusalCode(enum.IntEnum):
    """Why a message was refused. The numbers are part of the wire protocol: never reuse one."""

    TOO_LARGE = 1  # the message exceeds the size cap
    MALFORMED = 2  # the bytes do not decode, or fields have the wrong types or values
    UNKNOWN_TYPE = 3  # the type tag is not a known message type
    UNSUPPORTED_VERSION = 4  # the envelope version is not spoken by this peer
    WRONG_RECIPIENT = 5  # the envelope is addressed to another peer
    STALE = 6  # the timestamp is outside the accepted window
    REPLAYED = 7  # the nonce was already seen within the window
    BAD_SIGNATURE = 8  # the Ed25519 signature does not verify
    BAD_SEAL = 9  # the Box seal or MAC does not verify
    UNAUTHORIZED = 10  # no valid network key, or the peer is not on the allowlist
    OUT_OF_STAGE = 11  # a protocol message arrived at a stage that does not accept it
    DUPLICATE = 12  # a second message where only one is allowed
    INCONSISTENT = 13  # the message contradicts what the sender said before
    INTERNAL = 14  # the peer failed while handling a valid message
    BUSY = 15  # the peer is over its in-flight byte budget or a rate limit: retry later
    NO_ROUTE = 16  # a relay holds no stream for the envelope's recipient


class MurmurError(Exception):
    """Root of every error Murmur raises on purpose."""


class ConfigError(MurmurError, ValueError):
    """A flag, config file, scenario or argument is invalid. The message names the field."""


class KeyFileError(MurmurError, OSError):
    """An identity key file is missing, readable by others, truncated or corrupt."""


class CheckpointError(MurmurError, OSError):
    """A training checkpoint cannot be used: unreadable, corrupt (its checksum fails), or
    written for another model or run; never answered by a silent fresh start."""


class ProtocolError(MurmurError):
    """A message was refused. ``code`` says why, in a form that can cross the wire."""

    code: RefusalCode = RefusalCode.MALFORMED

    def __init__(self, message: str = "", *, code: RefusalCode | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        if code is not None:
            self.code = code


class MessageTooLarge(ProtocolError):
    """The message exceeds the size cap."""

    code = RefusalCode.TOO_LARGE


class MalformedMessage(ProtocolError, ValueError):
    """The bytes do not decode, or a field has the wrong type or value."""

    code = RefusalCode.MALFORMED


class UnknownMessageType(ProtocolError):
    """The type tag is not part of the closed message union."""

    code = RefusalCode.UNKNOWN_TYPE


class UnsupportedVersion(ProtocolError):
    """The envelope version is not one this peer speaks."""

    code = RefusalCode.UNSUPPORTED_VERSION


class WrongRecipient(ProtocolError):
    """The envelope is addressed to another peer."""

    code = RefusalCode.WRONG_RECIPIENT


class StaleMessage(ProtocolError):
    """The envelope timestamp is outside the accepted window (too old or in the future)."""

    code = RefusalCode.STALE


class ReplayedMessage(ProtocolError):
    """The envelope nonce was already seen within the window."""

    code = RefusalCode.REPLAYED


class BadSignature(ProtocolError):
    """The Ed25519 signature does not verify for the claimed sender."""

    code = RefusalCode.BAD_SIGNATURE


class BadSeal(ProtocolError):
    """The authenticated-encryption seal or MAC does not verify."""

    code = RefusalCode.BAD_SEAL


class Unauthorized(ProtocolError, PermissionError):
    """The peer presented no valid network key, or is not on the allowlist."""

    code = RefusalCode.UNAUTHORIZED


class OutOfStage(ProtocolError):
    """A protocol message arrived at a stage that does not accept it."""

    code = RefusalCode.OUT_OF_STAGE


class DuplicateMessage(ProtocolError):
    """A second message arrived where only one is allowed."""

    code = RefusalCode.DUPLICATE


class InconsistentMessage(ProtocolError, ValueError):
    """The message contradicts what its sender or the group said before."""

    code = RefusalCode.INCONSISTENT


class Overloaded(ProtocolError):
    """The peer holds as many in-flight bytes (or answers as many requests) as it takes."""

    code = RefusalCode.BUSY


class NoRoute(ProtocolError):
    """A relay was handed an envelope for a peer it does not (or no longer) relay for."""

    code = RefusalCode.NO_ROUTE


class NetworkError(MurmurError, ConnectionError):
    """A network operation failed."""


class PeerUnreachable(NetworkError):
    """The peer could not be reached, or broke the connection (the peer broke it, not us)."""


class Timeout(NetworkError, TimeoutError):
    """A network wait ran past its deadline."""


class TransportClosed(NetworkError):
    """The transport was closed by us; no further sends or receives are possible."""


class RemoteRefused(NetworkError):
    """The peer answered with a refusal. ``code`` is the peer's ``RefusalCode``."""

    def __init__(self, message: str, *, code: RefusalCode) -> None:
        super().__init__(message)
        self.code = code


class PrivacyError(MurmurError):
    """A differential-privacy rule would be broken."""


class BudgetExhausted(PrivacyError):
    """The next contribution would exceed the peer's privacy budget (eps_max, delta)."""


class AccountingError(PrivacyError, ValueError):
    """Privacy accounting was asked something invalid (negative noise, delta not in (0, 1))."""


class BudgetStateError(PrivacyError, OSError):
    """The persisted privacy-budget state is missing where expected, or corrupt."""


class AggregationError(MurmurError):
    """Secure aggregation failed."""


class AggregationAborted(AggregationError):
    """Fewer than the threshold of members survived a stage; nothing was revealed.

    ``group``: the id of the group whose round aborted and ``members`` its members (raw ids),
    where the raiser knows them (metrics count aborted groups by them)."""

    def __init__(
        self, message: str = "", *, group: bytes | None = None, members: tuple[bytes, ...] = ()
    ) -> None:
        super().__init__(message)
        self.group = group
        self.members = members


class SumRejected(AggregationAborted):
    """A member checked the group's result and refused it (a weight slot, a range, a chunk sum
    or a secret share that cannot be right); ``blamed`` is the raw id of the member whose
    message failed the check, where one can be named (None: the lie cannot be pinned)."""

    def __init__(self, message: str, blamed: bytes | None = None) -> None:
        super().__init__(message)
        self.blamed = blamed


class GroupFormationFailed(AggregationError):
    """No group of at least the minimum size formed by the deadline; the peer keeps its model."""


class RingOverflow(AggregationError, OverflowError):
    """Encoded values could overflow the fixed-point ring for the given group size."""


class TrainingError(MurmurError, RuntimeError):
    """The model, data or optimizer given to the learner cannot be used as given."""
