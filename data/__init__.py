"""onegpu stage: data."""
