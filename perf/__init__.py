"""Performance logs, FLOP accounting, machine peaks and reports (never imports the model)."""
