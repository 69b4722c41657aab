"""Process environment: distributed init, seeds, rank-aware logging."""
