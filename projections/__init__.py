"""Read models rebuilt from the log, each with a tracked position."""
