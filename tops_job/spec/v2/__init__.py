"""tops-receipt/2 (docs/spec/receipt-v2.md): commit → challenge → open, and the
grinding-bounded fiat-shamir receipt for offline use. Pure: no I/O, no threads."""

from .encoding import canonical_bytes, parse_json
from .header import (
                     CHALLENGE,
                     COST_CAP,
                     FIAT_SHAMIR,
                     G_FS,
                     K_MAX,
                     K_MIN,
                     MN_MAX,
                     S_DEFAULT,
                     S_FS,
                     S_MAX,
                     S_MIN,
                     SCHEMA,
                     TILE_MAX,
                     attempt_seed,
                     build_header,
                     check_cost,
                     check_header,
                     cost_of,
                     digest_of,
                     header_of,
                     leaf_columns,
                     leaf_count,
                     max_tile_for,
                     nonce_from_challenge,
                     ops_of,
                     seed_of,
)
from .leaves import challenge_leaves, fs_leaves
from .openings import KeptCommitment, check_openings, make_openings
from .verify import (
    Committed,
    Verified,
    VerifierBusy,
    check_commitment,
    check_opened,
    recorded_commitment,
    verify_challenge_transcript,
    verify_fs_receipt,
)

__all__ = [
    "CHALLENGE", "COST_CAP", "FIAT_SHAMIR", "G_FS", "K_MAX", "K_MIN", "MN_MAX", "S_DEFAULT", "S_FS", "S_MAX",
    "S_MIN", "SCHEMA", "TILE_MAX", "Committed", "KeptCommitment", "Verified", "VerifierBusy", "attempt_seed",
    "build_header", "canonical_bytes", "challenge_leaves", "check_commitment", "check_cost", "check_header",
    "check_opened", "check_openings", "cost_of", "digest_of", "fs_leaves", "header_of", "leaf_columns",
    "leaf_count", "make_openings", "max_tile_for", "nonce_from_challenge", "ops_of", "parse_json",
    "recorded_commitment", "seed_of", "verify_challenge_transcript", "verify_fs_receipt",
]
