# An hour on the CPU: a 3.4M-parameter model (6 layers, 192 wide, 256-token context) with the quickstart's
# recipe (Llama-style blocks with QK-norm, Muon with q, k, v apart, AdamW tuned for the embedding as in
# config/cpu_10min.py, warmup-stable-decay, weight decay 0.3) and dropout, since in an hour the bundled
# sample's 0.99M training tokens are seen ~15 times.
#   python prepare.py --dataset=bundled --vocab_size=4096
#   python train.py config/cpu_1hour.py
#   python sample.py --out_dir=out/cpu_1hour --start="Once upon a time"
# With the full TinyStories (python prepare.py --vocab_size=4096, a download) set
# data_dir="data/tinystories_bpe4096" and dropout=0.0: an hour then sees every story at most once.
# Its size follows the 3- and 10-minute ablations (docs/ablate.md) to a longer budget; the hour itself has
# not been measured yet.
out_dir = "out/cpu_1hour"
data_dir = "data/bundled_bpe4096"
init_from = "auto"  # rerunning continues (or just finishes) the run in out_dir
device = "cpu"
dtype = "float32"

batch_size = 16
block_size = 256
sampling = "epochs"  # every window once a pass (docs/ablate.md, round 15)
n_layer = 6
n_head = 6
n_embd = 192
dropout = 0.1
pos = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True

optim = "muon"
muon_split = True
learning_rate = 6e-3  # AdamW's (embedding, gains), with Muon's at 3e-3 and beta2 0.99: config/cpu_10min.py's
muon_lr = 3e-3
beta2 = 0.99
weight_decay = 0.3
lr_schedule = "wsd"
cooldown = 0.4
min_lr = 0.0
max_time = 60.0  # minutes; max_iters is then fixed from the first steps' timing
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 50
