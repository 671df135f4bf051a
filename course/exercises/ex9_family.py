"""
Exercise 9: a family's router as this project's settings (docs/routers.md, the router atlas).

Task: ERNIE-4.5's MoE block (transformers' Ernie4_5_MoeSparseMoeBlock) routes like this: the scores
are p = softmax(x W^T); the k experts of largest p + b are selected, b a bias that only selects (it
never enters the gates, and it is balanced after every step); the gates are p of the selected
experts divided by max(their sum, 1e-12); two always-on shared experts, each as wide as a routed
expert, are added to every token's output. Return the settings of families.FamilyConfig (the core's
GPTConfig of model.py, "the MoE blocks", plus each family's own) that make this project's MoE block
compute exactly that. families.py says what each family changes in the core: a short mixin class
per difference, its setting in the table at the top. Leave out the sizes (n_embd, n_experts, top_k,
expert_hidden): the grader sets them, builds the model with families.build(FamilyConfig(...)) and
compares its block with transformers' on random weights.

Hint: four or five settings; one you leave out keeps its default.
"""


def settings():
    raise NotImplementedError
