"""`tops-job verify` on tops-receipt/2 (and v1's hardening), as a user meets it: issue 11's
attack table at the CLI level, and what each acceptance says it proves."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.spec.v2_helpers import make, resigned
from tests.support import VECTORS_DIR, read_jsonl
from tops_job.cli import cli
from tops_job.spec.v2 import FIAT_SHAMIR, challenge_leaves, fs_leaves

V2 = VECTORS_DIR / "v2"
KEY = bytes(range(32))


def _verify(tmp_path, value, *args):
    path = tmp_path / "receipt.json"
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return CliRunner().invoke(cli, ["verify", str(path), *args])


def _transcript(made, s=64):
    leaves = challenge_leaves(KEY, made.digest, s, len(made.data))
    return {"commitment": made.commitment, "opened": made.opened(leaves), "verifier_key": KEY.hex(), "s": s}


def test_fiat_shamir_receipt_is_accepted_and_said_to_be_grinding_bounded(tmp_path):
    made = make(mode=FIAT_SHAMIR, challenge=None, m=4, n=16, tile=4)
    receipt = dict(made.commitment, openings=made.opened(fs_leaves(made.digest, 16))["openings"])
    result = _verify(tmp_path, receipt)
    assert result.exit_code == 0, result.output
    assert "grinding-bounded (fiat-shamir, s=256)" in result.output


def test_challenge_transcript_is_accepted_with_its_bound(tmp_path):
    result = _verify(tmp_path, _transcript(make()))
    assert result.exit_code == 0 and "soundness: (1-f)^64" in result.output


def test_v1_receipt_is_said_to_be_grinding_bounded(tmp_path):
    receipt = read_jsonl(VECTORS_DIR / "valid.jsonl")[0]
    result = _verify(tmp_path, receipt)
    assert result.exit_code == 0 and "grinding-bounded (v1" in result.output


def test_the_v2_vector_files_verify_line_by_line(tmp_path):
    lines = []
    for vector in read_jsonl(V2 / "valid.jsonl"):
        if vector["kind"] == "fiat-shamir":
            lines.append(vector["commitment"])
        else:
            lines.append({"commitment": vector["commitment"], "opened": vector["opened"],
                          "verifier_key": vector["verifier_key"], "s": vector["s"]})
    result = _verify(tmp_path, "\n".join(json.dumps(line) for line in lines) + "\n")
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok tops-receipt/2") == len(lines)


@pytest.mark.parametrize("change, code", [
    ({"k": 1}, "bad_shape"),  # cheap shape
    ({"device": ""}, "bad_string"),
    ({"did": ""}, "bad_did"),
    ({"m": 1, "n": 8, "k": 262144, "tile": 8}, "cost_over_cap"),  # amplification
])
def test_attacks_on_the_header_are_rejected(tmp_path, change, code):
    made = make()
    transcript = dict(_transcript(made), commitment=resigned(made, **change))
    result = _verify(tmp_path, transcript)
    assert result.exit_code == 1 and f"invalid: {code}" in result.output


def test_half_skipped_c_is_rejected(tmp_path):
    result = _verify(tmp_path, _transcript(make(skip_rows=4)))
    assert result.exit_code == 1 and "invalid: wrong_product" in result.output


def test_path_entry_with_spaces_is_rejected(tmp_path):
    transcript = _transcript(make())
    node = transcript["opened"]["openings"][0]["path"][0]
    transcript["opened"]["openings"][0]["path"][0] = " ".join(node[i:i + 2] for i in range(0, 62, 2))
    result = _verify(tmp_path, transcript)
    assert result.exit_code == 1 and "invalid: bad_path" in result.output


def test_v1_amplification_header_is_refused_from_the_header(tmp_path):
    receipt = dict(read_jsonl(VECTORS_DIR / "valid.jsonl")[0], m=1, n=8, k=262144, tile=8, opens=256)
    result = _verify(tmp_path, receipt)
    assert result.exit_code == 1 and "invalid: cost_over_cap" in result.output


def _as_input(vector):
    if vector["kind"] == "fiat-shamir":
        return vector["commitment"]
    return {"commitment": vector["commitment"], "opened": vector.get("opened"),
            "verifier_key": vector["verifier_key"], "s": vector["s"]}


def test_every_invalid_vector_is_rejected_by_the_cli_with_its_code(tmp_path):
    vectors = [v for v in read_jsonl(V2 / "invalid.jsonl") if "commitment_bytes_hex" not in v]
    result = _verify(tmp_path, "\n".join(json.dumps(_as_input(v)) for v in vectors) + "\n")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if ": invalid: " in line]
    assert len(lines) == len(vectors)
    for vector, line in zip(vectors, lines):
        assert f"invalid: {vector['expect']}:" in line, (vector["name"], line)


def test_a_wrong_transcript_gets_the_same_verdict_every_time(tmp_path):
    transcript = _transcript(make(skip_rows=2))
    outputs = {_verify(tmp_path, transcript).output for _ in range(4)}
    assert len(outputs) == 1 and "invalid: wrong_product" in outputs.pop()


def test_utf16_file_is_rejected(tmp_path):
    path = tmp_path / "utf16.json"
    path.write_bytes(json.dumps(_transcript(make())).encode("utf-16"))
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 1 and "invalid: malformed_json" in result.output
