"""Secure aggregation: SecAgg+ (pairwise masks, Shamir sharing) and its primitives."""
