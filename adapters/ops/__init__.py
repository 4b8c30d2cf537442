"""Batched low-rank ops."""
