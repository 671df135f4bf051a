# The routing task (support/tasks.py): 4,096 people, each named by a 12-digit binary ID, one attribute
# of 256 values (32,768 bits). Every record is written with three token ids (the digits 0 and 1 and the
# attribute), so hash routing, which fixes the experts of a token id, can only ever use the experts of
# those three ids; a learned router can spread the people over all 16 experts. `course/demos.py
# routing` compares them here and on the synthetic mixture, where hash routing is competitive.
#   python train.py config/facts_binary.py --router=hash
out_dir = "out-facts-binary"
dataset = "facts_binary"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 13         # a record is 14 tokens: 12 digits, the attribute, its value
n_experts = 16
top_k = 2
batch_size = 256
max_iters = 4000        # at 2,000 one seed of the learned router had not settled: doubled after that look,
                        # for every arm
eval_interval = 500
eval_iters = 10
log_interval = 500
warmup_iters = 100
learning_rate = 3e-3
min_lr = 3e-4
beta2 = 0.95            # set here, with dropout: the machine presets of train.py apply to what a config leaves out
dropout = 0.0
c_z = 0.0               # as in config/facts.py
c_sp = 0.0
c_cp = 0.0
compile = False
num_samples = 0
