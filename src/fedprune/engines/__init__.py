"""fedprune.engines."""
