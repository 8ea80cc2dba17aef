"""The errors the protocol library raises. Pure: the job maps them onto its error classes
and exit codes (tops_job.errors); a third-party verifier catches them directly."""

from __future__ import annotations


class SpecError(Exception):
    """Base of every error the protocol library raises on purpose."""


class ReceiptInvalid(SpecError):
    """A receipt failed verification. `code` is stable (the aggregator's `error` field)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class SignatureError(SpecError):
    """Signing failed (a bad key, a KMS failure), or a signature does not recover."""
