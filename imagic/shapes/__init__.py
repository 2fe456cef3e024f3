"""The built-in shapes world: scenes with known truth, its attribute classifier, and the small model trained on it."""
