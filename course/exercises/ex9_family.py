"""
Exercise 9: a family's router as this project's settings (docs/routers.md, the router atlas).

Task: ERNIE-4.5's MoE block (transformers' Ernie4_5_MoeSparseMoeBlock) routes like this: the scores
are p = softmax(x W^T); the k experts of largest p + b are selected, b a bias that only selects (it
never enters the gates, and it is balanced after every step); the gates are p of the selected
experts divided by max(their sum, 1e-12); two always-on shared experts, each as wide as a routed
expert, are added to every token's output. Return the GPTConfig settings (model.py: "the MoE
blocks" and "the switches other MoE families combine") that make this project's MoE block compute
exactly that. Leave out the sizes (n_embd, n_experts, top_k, expert_hidden): the grader sets them
and compares your block with transformers' on random weights.

Hint: four or five settings; one you leave out keeps its default.
"""


def settings():
    raise NotImplementedError
