# Llama 4 (transformers llama4): a linear router; top-1 of the logits; the gate is sigmoid of the
# selected logit, not renormalised, and it scales the expert's input (Llama 4 computes FFN_e(g x), not
# g FFN_e(x)); an always-on shared expert of the experts' width. docs/routers.md; tests/test_families.py.
#   python train.py config/families/llama4.py
router = "sigmoid"      # top-k of sigmoid(x W^T) = top-k of x W^T; gates sigmoid of the selected
gate_renorm = False
bias_update_rate = 0.0  # no balancing bias
gate_input = True
top_k = 1
n_shared = 1
