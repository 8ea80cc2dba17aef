"""Exit codes and error classes: what a scheduler keys its retry policy on."""

from __future__ import annotations

import errno

import pytest

from tops_job.errors import ErrorClass, ExitCode, ReceiptInvalid, SignatureError, StorageError, TopsJobError, error_class_of, exit_code_of


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_a_full_or_failing_disk_is_a_storage_error_schedulers_retry(number):
    error = StorageError("cannot write to outbox", OSError(number, "x"))
    assert exit_code_of(error) is ExitCode.STORAGE_ERROR and error_class_of(error) is ErrorClass.STORAGE


@pytest.mark.parametrize("number", [errno.ENOTDIR, errno.EACCES, errno.EISDIR])
def test_a_path_that_cannot_work_is_a_config_error(number):
    error = StorageError("cannot open ledger", OSError(number, "x"))
    assert exit_code_of(error) is ExitCode.CONFIG_ERROR and error_class_of(error) is ErrorClass.CONFIG


def test_protocol_errors_are_classified_without_knowing_the_job():
    assert error_class_of(ReceiptInvalid("bad_hex", "x")) is ErrorClass.VALIDATION
    assert error_class_of(SignatureError("x")) is ErrorClass.SIGNATURE
    assert exit_code_of(SignatureError("x")) is ExitCode.INTERNAL_ERROR
    assert error_class_of(ValueError("a bug")) is ErrorClass.INTERNAL
    assert exit_code_of(TopsJobError("x")) is ExitCode.INTERNAL_ERROR


def test_exit_codes_are_distinct_and_stable():
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3, 4, 5, 6, 130, 143]
