"""onegpu stage: sweeps."""
