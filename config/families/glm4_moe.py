# GLM-4.5 (transformers glm4_moe; Kimi K2 and DeepSeek-V3 route the same way): sigmoid scores; the
# top-k of s + b within the topk_group best of n_group groups (a group scored by its two best s + b);
# gates s renormalised, times the routed scale; a shared expert; the first layers dense.
# docs/routers.md; tests/test_families.py.
#   python train.py config/families/glm4_moe.py
router = "sigmoid"
n_group = 4             # GLM-4.5: 1 group; DeepSeek-V3 and Kimi K2: 8 groups, 4 picked
topk_group = 2
gate_renorm = True
routed_scale = 2.5
n_shared = 1
first_dense_layers = 1
top_k = 2
