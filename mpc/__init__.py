"""Secure aggregation (pairwise masks, Shamir dropout recovery, SecAgg+), sans-IO."""
