"""Celery over Redis: the pipeline's tasks (fit, score shards, select) and run control."""
