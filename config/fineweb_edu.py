# A GPT-2-small-shaped MoE on FineWeb-Edu (docs/data.md): prepare the shards first with
#   python tools/prepare.py fineweb-edu/sample/10BT fineweb_edu
# Sized for about an hour on one H100 from an assumed throughput (~220k tokens/s); not yet run on a GPU.
out_dir = "out-fineweb-edu"
dataset = "fineweb_edu"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
n_experts = 8
top_k = 2
batch_size = 32
gradient_accumulation_steps = 4   # 131,072 tokens a step
max_iters = 6000                  # 0.79B tokens
eval_interval = 500
eval_iters = 50
log_interval = 50
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 300
beta2 = 0.95
dropout = 0.0
