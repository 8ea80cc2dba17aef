"""The receipt protocol (docs/spec/receipt-v1.md), pure: no I/O, no threads, and no import
from the rest of tops_job. The worker, the aggregator and third-party verifiers stand on it."""
