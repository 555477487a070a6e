"""The error tree. Library code raises these; the CLI turns each into one line plus what to do next."""

from __future__ import annotations


class RerankerError(Exception):
    """Base: ``message`` says what went wrong, ``hint`` what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class ConfigError(RerankerError):
    exit_code = 2


class ModelNotFound(RerankerError):
    exit_code = 4


class DownloadError(RerankerError):
    exit_code = 5


class ConvertError(RerankerError):
    exit_code = 6


class ParityError(ConvertError):
    exit_code = 7


class MissingExtra(RerankerError):
    exit_code = 8


class AlreadyRunning(RerankerError):
    exit_code = 9


class ServerStartError(RerankerError):
    exit_code = 10


class PortInUse(ServerStartError):
    exit_code = 11


class StopError(RerankerError):
    exit_code = 12


class ReloadError(RerankerError):
    exit_code = 13


class Unreachable(RerankerError):
    """Nothing answers at the address a command was pointed at."""

    exit_code = 14


def missing_extra(extra: str, exc: BaseException) -> MissingExtra:
    return MissingExtra(
        f"this needs the optional '{extra}' dependencies ({exc.__class__.__name__}: {exc})",
        f"install them with: pip install 'rerankctl[{extra}]'",
    )
