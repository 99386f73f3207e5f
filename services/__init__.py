"""The services: thin doors onto the `mates` library (DESIGN.md §2).

`api` (FastAPI control plane and run store), `scorer` (HTTP batch scoring),
`worker` (Celery tasks: fit, score shards, select) and `trainer` (Celery
worker on the `train` queue). None holds a copy of the science.
"""
