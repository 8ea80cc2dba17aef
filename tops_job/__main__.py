"""`python -m tops_job`: the same CLI as the `tops-job` command."""

from tops_job.cli import main

main()
