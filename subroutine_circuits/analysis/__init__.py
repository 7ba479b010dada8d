"""Statistics over experiment results: verdicts, base-model level inference, agreement nulls."""
