# ERNIE-4.5 (transformers ernie4_5_moe): softmax scores p; the top-k of p + b, b a bias that only
# selects (balanced per step here); gates p renormalised, the sum clamped at 1e-12; 2 shared experts.
# docs/routers.md; tests/test_families.py.
#   python train.py config/families/ernie4_5_moe.py
router = "softmax"
select_bias = True
gate_renorm = True
renorm_floor = 1e-12
n_shared = 2
top_k = 2
