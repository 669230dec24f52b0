"""``RewardFault``: what a reward function returns for a row it could not score (no torch needed)."""


class RewardFault(str):
    """A reward function may return this (with the reason) for a row instead of a number: the row
    is a counted fault, not a score (e.g. ``code_reward`` for malformed tests or a spent time budget)."""
