"""Learning and averaging over an abstract network: matchmaking, secure all-reduce, baselines."""
