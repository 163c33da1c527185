"""fedprune.core."""
