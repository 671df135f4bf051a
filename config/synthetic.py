# The synthetic mixture task (data.SyntheticMixture): 4 token sources over partly overlapping
# ranges of a 256-token vocabulary, segments of 32 tokens. The right expert split is known, so
# eval logs NMI(top-1 expert, source) per layer. Small enough to train in minutes on a CPU.
out_dir = "out-synthetic"
dataset = "synthetic"
vocab_size = 256
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
n_experts = 4
top_k = 2
batch_size = 16
max_iters = 600
eval_interval = 100
eval_iters = 10
log_interval = 50
warmup_iters = 50
learning_rate = 2e-3
min_lr = 2e-4
compile = False
beta2 = 0.95            # set here, with dropout: the machine presets of train.py apply to what a config leaves out
dropout = 0.0
