# gpt-oss (OpenAI 2025; transformers gpt_oss): a linear router with a bias; the top-k of its logits;
# gates the softmax of the k selected logits (= p renormalised); experts with biases and a clamped
# GLU, (up + 1) * g * sigmoid(1.702 g), g <= 7, |up| <= 7. docs/routers.md; tests/test_families.py.
#   python train.py config/families/gpt_oss.py
router = "softmax"
router_bias = True
gate_renorm = True
expert_act = "gpt_oss"
swiglu_limit = 7.0
expert_bias = True
n_experts = 8           # gpt-oss-20b: 32 experts, top-4; this project's scale: 8, top-4 (f = ffn_hidden / 4)
top_k = 4
