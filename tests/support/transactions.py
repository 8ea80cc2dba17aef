"""Counting a store's write transactions, for the tests of what shares one."""

from __future__ import annotations

from typing import Any


def count_transactions(store: Any) -> list[int]:
    """Wraps `store.transaction` (a Store of either engine) so that each write transaction it
    runs appends 1 to the returned list."""
    transactions: list[int] = []
    own_transaction = store.transaction

    def counted(conn: Any) -> Any:
        transactions.append(1)
        return own_transaction(conn)

    store.transaction = counted
    return transactions
