"""The services: thin doors onto the `mates` library (docs/design.md §2).

`api` (FastAPI control plane and run store), `scorer` (HTTP batch scoring), `worker`
(Celery tasks: fit, score shards, select), `trainer` (Celery worker on the `train` queue)
and `common` (what they share, the only part of `services` one service may import).
None holds a copy of the science.
"""
