"""The local ledger submitter: in-process verification, used when no aggregator is set."""

from __future__ import annotations

from tops_job import hookimpl
from tops_job.delivery.ledger import LedgerSubmitter


@hookimpl
def tops_job_register_submitters(register):
    register("ledger", lambda config: LedgerSubmitter(config.ledger, min_opens=config.opens), schemes=("file",))
