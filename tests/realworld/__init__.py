"""Real-world-style KS layers (user code ksfx never sees) and their expected chains."""
