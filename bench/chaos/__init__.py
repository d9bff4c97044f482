"""Fault tolerance: `chaos` kills `rl-train` at random moments and in each phase, resumes it, checks."""
