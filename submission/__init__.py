"""onegpu stage: submission."""
