"""The HTTP submitter for AGGREGATOR_URL=http(s)://…: spec §9 over a keep-alive session."""

from __future__ import annotations

from tops_job import hookimpl


def _factory(config):
    from tops_job.delivery.http_submitter import HttpSubmitter

    return HttpSubmitter(config.aggregator_url, connect_timeout=config.connect_timeout,
                         read_timeout=config.read_timeout)


@hookimpl
def tops_job_register_submitters(register):
    register("http", _factory, schemes=("http", "https"))
