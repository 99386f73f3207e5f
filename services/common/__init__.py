"""What every service shares: settings from the environment, auth, the run store."""
