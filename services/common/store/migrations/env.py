"""Alembic's environment for the run store: always run on the connection `engine.migrate`
hands over (no URL of its own, no logging set-up), against `schema.metadata`."""

from alembic import context

from services.common.store.schema import metadata

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=metadata,
    render_as_batch=True,
)  # SQLite alters a table by copying it
with context.begin_transaction():
    context.run_migrations()
