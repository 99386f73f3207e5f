"""What every service shares, and the only part of `services` another service may import:
settings from the environment, auth, the run store, the wire contracts, the task queue, a
run's lifecycle, the watchdog and the scorer client."""
