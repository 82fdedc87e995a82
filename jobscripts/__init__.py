"""Job-script templates (package data)."""
