# LongCat-Flash (transformers longcat_flash): softmax scores over the experts and the zero-compute
# experts; the top-k of p + b, b a bias that only selects; gates p times the routed scale, not
# renormalised; a pair on a zero-compute expert returns the token itself, gated, and computes nothing.
# docs/routers.md; tests/test_families.py.
#   python train.py config/families/longcat_flash.py
router = "softmax"
select_bias = True
gate_renorm = False
routed_scale = 6.0
zero_experts = 4        # LongCat-Flash: 256 zero-compute experts beside 512 real ones
top_k = 2
