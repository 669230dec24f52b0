"""A reward that varies within groups even for the random-init tiny model (whose task rewards are all
0), so a short multi-rank run has non-zero advantages and fills the sample buffer. Test helper."""


def length_reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]
