"""What an S3 request's failure means, read from botocore's exception (shared by the
profile store and the outbox)."""

from __future__ import annotations


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _status(exc: Exception) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def lost_race(exc: Exception) -> bool:
    """412: the condition did not hold; 409 ConditionalRequestConflict: another conditional
    write to the key was in progress (S3 answers one of them so)."""
    return _status(exc) in (409, 412) or _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict")


def sdk_errors() -> tuple[type[Exception], ...]:
    """What botocore raises for a failed request: a ClientError carries S3's answer (which
    `missing` and `lost_race` read); any other BotoCoreError (no connection, a timeout) has
    none, so those two say False for it. Imported on first use: an idle
    plugin does not load botocore."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def missing(exc: Exception) -> bool:
    return _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound")
