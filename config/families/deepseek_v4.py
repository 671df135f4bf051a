# DeepSeek-V4 (transformers deepseek_v4): scores s = sqrt(softplus(x W^T)); the top-k of s + b, b a
# bias that only selects, balanced per step; gates s renormalised, times the routed scale; the first
# layers are hash layers (a fixed token-id table selects, the learned scores still weight); experts
# and the shared expert with a clamped SwiGLU (limit 10). docs/routers.md; tests/test_families.py.
#   python train.py config/families/deepseek_v4.py
router = "sigmoid"
score_fn = "sqrt_softplus"
gate_renorm = True
routed_scale = 1.5
hash_layers = 1         # DeepSeek-V4: 3 of its layers; here 1 of the CPU preset's 4
swiglu_limit = 10.0
n_shared = 1
top_k = 2
