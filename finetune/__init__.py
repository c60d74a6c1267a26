"""onegpu stage: finetune."""
