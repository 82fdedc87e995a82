"""Training: set-up of a run (setup), the step (step), calibration, LR schedule, progress, the loop (run)."""
