"""virtq."""
