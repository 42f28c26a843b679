"""The study's database riding out an outage (PostgreSQL restarted, a failover, a network cut).

Optuna's RDBStorage has no retry of its own: a write while the database is down ends in its misleading
"invalid data in the commit, e.g. exceeding max length". SQLAlchemy's `pool_pre_ping` finds a pooled connection
that the restart closed before Optuna uses it, and a `do_connect` hook (SQLAlchemy's way to customise how
connections are made) waits for the database with core/storage_retry.ride_out's backoff, up to
`dist.storage_retry_seconds`; then StorageLost names the database. The search driver is the study's only
writer, and it touches the database only between trials (ask, tell), where no transaction is open: waiting
for a connection is the whole of riding out an outage there.
"""
from __future__ import annotations

import optuna
import sqlalchemy

from glmc_ray.core.storage import RETRY_SETTING
from glmc_ray.core.storage_retry import ride_out


class StudyStorage(optuna.storages.RDBStorage):
    """RDBStorage at `url` whose connections are waited for up to `retry_seconds`; pickled with its window
    (Tune saves the searcher, and a resumed search restores it)."""

    def __init__(self, url: str, retry_seconds: float):
        self.retry_seconds = retry_seconds
        super().__init__(url, engine_kwargs={"pool_pre_ping": True})
        self._wait_for_connections()

    def __setstate__(self, state) -> None:
        super().__setstate__(state)  # makes a new engine, without the hook
        self._wait_for_connections()

    def _wait_for_connections(self) -> None:
        dbapi_error = self.engine.dialect.loaded_dbapi.OperationalError
        database = self.engine.url.render_as_string(hide_password=True)

        def connect(dialect, record, cargs, cparams):
            return ride_out(lambda: dialect.connect(*cargs, **cparams), lambda err: isinstance(err, dbapi_error),
                            self.retry_seconds, f"the study database {database}", "connecting", RETRY_SETTING)

        sqlalchemy.event.listen(self.engine, "do_connect", connect)
