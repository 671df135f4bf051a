# Qwen3-Next (transformers qwen3_next): softmax scores; the top-k of p; gates p renormalised; a shared
# expert whose output is scaled by sigmoid(x w) per token. docs/routers.md; tests/test_families.py.
#   python train.py config/families/qwen3_next.py
router = "softmax"
gate_renorm = True
n_shared = 1
shared_gate = True
top_k = 2
