# Ten minutes on the CPU: config/quickstart.py's recipe (a 1.4M-parameter Llama-style GPT with QK-norm, Muon
# with q, k, v apart, warmup-stable-decay) given 10 minutes of wall-clock, the budget of issue 13's targets and
# of bench/bench_quality.py's default run, with twice the quickstart's weight decay (docs/ablate.md, round 5),
# twice its context and tokens a step (rounds 7 and 8), and AdamW tuned for the embedding (rounds 10 and 11).
#   python prepare.py --dataset=bundled --vocab_size=4096
#   python train.py config/cpu_10min.py
#   python sample.py --out_dir=out/cpu_10min --start="Once upon a time"
# No dropout: in config/ablate_tune10.py it made each step 19% slower and the model worse at the same step
# (1.128 against 1.116 bits/byte at step 1,400 of 2,600).
out_dir = "out/cpu_10min"
data_dir = "data/bundled_bpe4096"
init_from = "auto"  # rerunning continues (or just finishes) the run in out_dir
device = "cpu"
dtype = "float32"

batch_size = 16
sampling = "epochs"  # every window once a pass, in a random order: 0.903 against 0.942 for random offsets (round 15)
block_size = 256  # most of a ~210-token story in view: 0.9675 against 0.9805 for 128 (docs/ablate.md, round 7)
n_layer = 4
n_head = 4
n_embd = 128
pos = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True

optim = "muon"  # Muon for the blocks' matrices (float32 on the CPU), AdamW for embeddings and gains
muon_split = True  # q, k, v (and SwiGLU's gate, up) orthogonalised as the separate matrices they are
learning_rate = 6e-3  # AdamW's: the token embedding (also the output head) and the gains; 3e-3 and 1.2e-2 lost
muon_lr = 3e-3  # Muon's, for the blocks' matrices
beta2 = 0.99  # AdamW's second moment: a rare token's row is not given a full step each time it turns up
weight_decay = 0.6  # the training tokens are seen 5-7 times in 10 minutes: 0.6 beat 0.3 on two seeds
lr_schedule = "wsd"  # the peak rates until the last 40% of the run, then linearly to 0
cooldown = 0.4
min_lr = 0.0
max_time = 10.0  # minutes; max_iters is then fixed from the first steps' timing
warmup_iters = 50
eval_interval = 200
eval_iters = 10
log_interval = 50
