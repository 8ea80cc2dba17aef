"""The reference aggregator (spec §9): `tops-job aggregator serve`.

`app.py` is the WSGI application (verification and policy), `guard.py` what keeps it standing
under hostile clients (costs, caps, slots, challenge limits, the step-free clock), `store.py`
the SQLite (WAL) store of accepted receipts and issued challenges and `store_pg.py` the same on
PostgreSQL, `migrations.py` their one versioned schema, `group_commit.py` many receipts to a
transaction, `fleet.py` the fleet view (/dids, /fleet), `metrics.py` /metrics, `serve.py` the
guarded waitress server in one or several processes, `service.py` all of it put together, and
`cli.py` the click group.
"""
