"""
Exercise 7: the sigmoid router's bias update (DeepSeek-V3, auxiliary-loss-free balancing).

Task: after an optimizer step the router knows the load of the step, counts (E,) = pairs routed to
each expert. Every expert whose load is below the mean gets its bias raised by `rate`, every
expert above the mean gets it lowered by `rate`, an expert exactly at the mean keeps it. Return
the new bias (E,). (The bias is only added to the scores that choose the experts, never to the gates.)

Hint: torch.sign.
"""

import torch


def bias_update(bias, counts, rate):
    raise NotImplementedError
