# MiniMax-M2 (transformers minimax_m2): sigmoid scores; the top-k of s + b, b a bias that only
# selects; gates s renormalised; no shared expert. docs/routers.md; tests/test_families.py.
#   python train.py config/families/minimax_m2.py
router = "sigmoid"
gate_renorm = True
top_k = 2
