"""Array ops shared by scoring and training (log-probs, losses)."""
