"""Exceptions mirroring the aclnn status codes of the Ascend operators.

Every aclnn operator checks its parameters in ``XxxGetWorkspaceSize`` and returns a status
code. mc2sim raises one exception class per code; each carries the code and a message that
names the parameter, the value seen and the rule broken::

    ParamInvalidError("antiquant_group_size", 48, "must be 0 or a multiple of 32 in [32, k-1]")
    # -> "antiquant_group_size=48: must be 0 or a multiple of 32 in [32, k-1]"

The exceptions pickle faithfully, so one rank's error can be sent to every other rank and
raised there with the same class, code and message.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AclnnError",
    "AclnnRuntimeError",
    "ParamInvalidError",
    "ParamNullptrError",
    "error_for_code",
]

_MAX_VALUE_REPR = 200


def _short_repr(value: object) -> str:
    """Return ``repr(value)``, shortened for large values such as tensors."""
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


class AclnnError(Exception):
    """Base class of mc2sim's operator errors; ``code`` is the aclnn status code.

    Args:
        param: the parameter (input, attribute or option) that broke the rule.
        value: the value seen; it is stored as given and shown by ``repr`` in the message.
        rule: the rule that was broken, in words.

    """

    code: ClassVar[int] = 0
    """The aclnn status code this class stands for."""

    rank: int | None
    """The rank whose check raised this error, when ranks agreed on it (``comm.agree``)."""

    def __init__(self, param: str, value: object, rule: str) -> None:
        self.param = param
        self.value = value
        self.rule = rule
        self.rank = None
        super().__init__(f"{param}={_short_repr(value)}: {rule}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default pickling calls cls(*self.args) with the one message argument,
        # which does not match __init__; keep the three parts instead. A value that does not
        # pickle (a tensor on another device, say) travels as its repr.
        return (_rebuild, (type(self), self.param, _picklable(self.value), self.rule, str(self)))

    def __str__(self) -> str:
        return str(self.args[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, {self.args[0]!r})"


class ParamNullptrError(AclnnError):
    """A required input, output or attribute is missing (ACLNN_ERR_PARAM_NULLPTR, 161001)."""

    code: ClassVar[int] = 161001


class ParamInvalidError(AclnnError, ValueError):
    """A dtype, format, shape, rank or attribute is out of range (ACLNN_ERR_PARAM_INVALID).

    Also a ``ValueError``, so generic callers that catch bad values catch it.
    """

    code: ClassVar[int] = 161002


class AclnnRuntimeError(AclnnError, RuntimeError):
    """A failure while running, such as a failed copy (ACLNN_ERR_RUNTIME_ERROR, 361001)."""

    code: ClassVar[int] = 361001


_BY_CODE: dict[int, type[AclnnError]] = {
    cls.code: cls for cls in (ParamNullptrError, ParamInvalidError, AclnnRuntimeError)
}


def error_for_code(code: int) -> type[AclnnError]:
    """Return the exception class for an aclnn status code.

    Args:
        code: 161001, 161002 or 361001.

    Returns:
        The matching subclass of :class:`AclnnError`.

    Raises:
        ParamInvalidError: ``code`` is not one of the three.

    """
    try:
        return _BY_CODE[code]
    except KeyError:
        raise ParamInvalidError("code", code, f"must be one of {sorted(_BY_CODE)}") from None


def _rebuild(
    cls: type[AclnnError], param: str, value: object, rule: str, message: str
) -> AclnnError:
    """Recreate a pickled error with its original message, even if ``value`` was shortened."""
    error = cls(param, value, rule)
    error.args = (message,)
    return error


def _picklable(value: object) -> object:
    """Return ``value`` when it is a plain builtin, else its shortened repr."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (tuple, list)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    ):
        return value
    return _short_repr(value)
