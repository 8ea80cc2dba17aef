"""The reference aggregator (spec §9): `tops-job aggregator serve`.

`app.py` is the WSGI application (verification and policy), `store.py` the SQLite (WAL)
store of accepted receipts and issued challenges, `cli.py` the click group that serves the
app with waitress.
"""
