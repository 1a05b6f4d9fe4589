"""Model passes: one technique per module, each with a typed config."""
