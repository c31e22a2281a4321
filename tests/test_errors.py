"""The exception tree: one root, leaves that also behave like the builtin they resemble."""

from __future__ import annotations

import inspect

import pytest

import floor.errors as errors
from floor.errors import MurmurError, ProtocolError, RefusalCode


def _all_error_classes() -> list[type[BaseException]]:
    return [
        obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
    ]


def test_every_error_has_one_root() -> None:
    for cls in _all_error_classes():
        assert issubclass(cls, MurmurError), cls


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.KeyFileError, OSError),
        (errors.MalformedMessage, ValueError),
        (errors.Timeout, TimeoutError),
        (errors.PeerUnreachable, ConnectionError),
        (errors.Unauthorized, PermissionError),
        (errors.AccountingError, ValueError),
        (errors.RingOverflow, OverflowError),
        (errors.TrainingError, RuntimeError),
    ],
)
def test_leaves_inherit_their_builtin(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, builtin)


def test_protocol_errors_carry_distinct_codes() -> None:
    leaves = [
        c for c in _all_error_classes() if issubclass(c, ProtocolError) and c is not ProtocolError
    ]
    codes = [c.code for c in leaves]
    assert len(set(codes)) == len(codes)
    assert all(isinstance(c, RefusalCode) for c in codes)


def test_code_override_and_default_message() -> None:
    err = ProtocolError(code=RefusalCode.INTERNAL)
    assert err.code is RefusalCode.INTERNAL
    assert str(errors.BadSignature()) != ""
