"""Scorer heads and the scorer. `base` holds what heads build on, `heads` the implementations,
`scorer` loads them from the repository; imports run one way (scorer -> heads -> base).
"""
