"""onegpu stage: eval."""
