"""The GRPO/RLOO tests' programmatic reward (`--reward_funcs short_reward.short`): shorter completions score
higher, a signal any policy can move."""


def short(completions, **kwargs):
    return [-float(len(c if isinstance(c, str) else str(c))) for c in completions]
