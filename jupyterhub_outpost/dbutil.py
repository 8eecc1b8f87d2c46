"""Schema management: create, check and upgrade the database with alembic."""

import os
import sqlite3
from contextlib import contextmanager
from datetime import datetime
from tempfile import TemporaryDirectory

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect

from . import orm

_here = os.path.dirname(os.path.abspath(__file__))
ALEMBIC_DIR = os.path.join(_here, "alembic")
ALEMBIC_INI_TEMPLATE = os.path.join(_here, "alembic.ini")


class DatabaseSchemaMismatch(Exception):
    """The database's schema is not the one this version needs"""


@contextmanager
def alembic_config(db_url):
    """An alembic Config for ``db_url``, from a temporary alembic.ini"""
    with open(ALEMBIC_INI_TEMPLATE) as f:
        template = f.read()
    with TemporaryDirectory() as td:
        ini = os.path.join(td, "alembic.ini")
        with open(ini, "w") as f:
            f.write(
                template.format(
                    alembic_dir=ALEMBIC_DIR, db_url=str(db_url).replace("%", "%%")
                )
            )
        yield Config(ini)


def head_revision():
    with alembic_config("sqlite://") as cfg:
        return ScriptDirectory.from_config(cfg).get_current_head()


def known_revision(revision):
    """True if ``revision`` is one of this version's migrations"""
    with alembic_config("sqlite://") as cfg:
        try:
            return ScriptDirectory.from_config(cfg).get_revision(revision) is not None
        except CommandError:
            return False


def current_revision(engine):
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def sqlite_path(db_url):
    """The file of a SQLite URL, or None for other databases and memory"""
    if not db_url.startswith("sqlite:///"):
        return None
    path = db_url[len("sqlite:///") :].split("?", 1)[0]
    return path or None


def backup_sqlite(db_url, log):
    path = sqlite_path(db_url)
    if not path or not os.path.exists(path):
        return None
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M%S")
    backup = f"{path}.{stamp}.bak"
    log.info("Backing up %s to %s before the upgrade", path, backup)
    # sqlite's backup API, not a file copy: in WAL mode the newest
    # transactions may still be in the -wal file (after a crash, say)
    source = sqlite3.connect(path)
    try:
        target = sqlite3.connect(backup)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    return backup


def upgrade(db_url, revision="head"):
    with alembic_config(db_url) as cfg:
        command.upgrade(cfg, revision)


def prepare_database(db_url, log, auto_upgrade=None):
    """Make the database ready for this version, before the service listens.

    - empty database: create all tables at the newest revision;
    - older revision: upgrade it (SQLite: after a backup copy) when
      ``auto_upgrade`` (default: for SQLite only), else refuse with a message
      that names ``jupyterhub-outpost upgrade-db``;
    - newer or unknown revision: refuse.
    """
    if auto_upgrade is None:
        auto_upgrade = db_url.startswith("sqlite")
    engine = orm.new_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        head = head_revision()
        if "servers" not in tables:
            log.info("Creating the database tables (schema revision %s)", head)
            upgrade(db_url)
            return
        current = current_revision(engine)
        if current == head:
            return
        if current is None:
            raise DatabaseSchemaMismatch(
                "The database has tables but no schema revision: "
                "it was not created by jupyterhub-outpost."
            )
        if not known_revision(current):
            raise DatabaseSchemaMismatch(
                f"The database schema is at revision {current}, which this version "
                f"does not know (it needs {head}): the database was written by a "
                "newer jupyterhub-outpost or by another application."
            )
        if not auto_upgrade:
            raise DatabaseSchemaMismatch(
                f"The database schema is at revision {current}, this version needs "
                f"{head}. Back up the database, then run `jupyterhub-outpost upgrade-db`."
            )
        backup_sqlite(db_url, log)
        log.info("Upgrading the database schema from %s to %s", current, head)
        upgrade(db_url)
    finally:
        engine.dispose()
