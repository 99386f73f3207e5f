"""The trainer: a Celery worker on the `train` queue, one stage job at a time per GPU."""
