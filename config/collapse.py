# A deliberate routing collapse on the synthetic task: the softmax router with no balancing loss,
# top-1 routing with gates = p (no renormalisation, as in Switch: with k=1 renormalised gates are
# all 1 and the router would get no gradient from the LM loss at all), 16 experts and a high
# learning rate. The rich get richer: in our run one layer sends almost every token to one
# expert (load CV near sqrt(E-1), E-1 dead experts). Its counterparts, same everything else:
#   python train.py config/collapse.py                                           # collapses
#   python train.py config/collapse.py --c_lb=0.01 --out_dir=out-collapse-lb     # balanced by L_lb
#   python train.py config/collapse.py --router=ermoe --out_dir=out-collapse-ermoe
#   python tools/analyze.py out-collapse   (and the other two) -> load_history.png shows the difference
out_dir = "out-collapse"
dataset = "synthetic"
vocab_size = 256
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
n_experts = 16
top_k = 1
gate_renorm = False
c_lb = 0.0
c_z = 0.0
c_sp = 0.0
c_cp = 0.0
max_iters = 300
eval_interval = 50
eval_iters = 4
log_interval = 50
warmup_iters = 50
learning_rate = 1e-2
min_lr = 1e-3
compile = False
beta2 = 0.95            # set here, with dropout: the machine presets of train.py apply to what a config leaves out
dropout = 0.0
