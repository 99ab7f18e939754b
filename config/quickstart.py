# The CPU quickstart: a ~1M-parameter GPT on the bundled TinyStories sample, a few minutes on 2 cores.
#   python prepare.py --dataset=bundled && python train.py config/quickstart.py && python sample.py
out_dir = "out/quickstart"
data_dir = "data/bundled"
init_from = "auto"
device = "cpu"
dtype = "float32"

batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128

learning_rate = 2e-3
min_lr = 2e-4
max_iters = 600
warmup_iters = 50
eval_interval = 100
eval_iters = 10
log_interval = 20
