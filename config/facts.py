# The knowledge-capacity task (support/tasks.py, after Allen-Zhu & Li 2025): 8,192 people with 4
# attributes of 64 values each, 196,608 bits to memorise. A small model (2 layers, d=32), so that the
# table is far larger than what the dense model can hold; `course/demos.py capacity` compares it with
# MoE models of the same active compute (E = 4, 8, 16, top-2).
#   python train.py config/facts.py --n_experts=16
out_dir = "out-facts"
dataset = "facts"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 9          # a record is 10 tokens: 2 names, then 4 (attribute, value) pairs
n_experts = 8
top_k = 2
batch_size = 512        # people per step
max_iters = 2000        # ~125 passes over the table
eval_interval = 500
eval_iters = 10
log_interval = 500
warmup_iters = 100
learning_rate = 3e-3
min_lr = 3e-4
beta2 = 0.95            # set here, with dropout: the machine presets of train.py apply to what a config leaves out
dropout = 0.0
c_z = 0.0               # measured: with the z-loss at 1e-3 the 16-expert softmax router stored 23-33k bits
                        # instead of 98k on a smaller table (2 of 2 seeds); the z-loss pulls all logits down
c_sp = 0.0              # the regularisers are compared in `course/demos.py regularisers`
c_cp = 0.0
compile = False
num_samples = 0         # token ids, not text
