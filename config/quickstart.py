# The CPU quickstart: a 1.4M-parameter Llama-style GPT (rotary positions, RMSNorm, SwiGLU, QK-norm) trained with
# Muon on the bundled TinyStories sample with a 4,096-token BPE vocabulary trained on it (prepare.py
# --vocab_size=4096), for 5 minutes of wall-clock on whatever CPU runs it (max_time: the iteration count is
# fixed from the first steps' pace, so a slower machine takes fewer steps, not more minutes).
#   python prepare.py --dataset=bundled --vocab_size=4096
#   python train.py config/quickstart.py
#   python sample.py --start="Once upon a time"
# A small vocabulary is what makes this fast on a CPU: with GPT-2's 50,257 tokens the output layer
# alone would cost 12 times the compute of this whole model. Every choice below won an ablation in
# docs/ablate.md at a fixed budget: Llama-style blocks, Muon and learning rate 3e-3 (3 minutes: 1.15 against
# 1.37 bits/byte for the GPT-2-style recipe), then the warmup-stable-decay schedule with Muon orthogonalising
# q, k and v apart (1,200 steps: 1.050 against 1.082), QK-norm and weight decay 0.3, then AdamW tuned for the
# embedding (1,250 steps: 1.004 against 1.028 over the whole val split), then the text read in epochs (on the
# bundled corpus with its extra stories: 0.972 against 0.998).
out_dir = "out/quickstart"
data_dir = "data/bundled_bpe4096"
init_from = "auto"  # rerunning continues (or just finishes) the run in out_dir
device = "cpu"
dtype = "float32"

batch_size = 16
block_size = 128
sampling = "epochs"  # every window once a pass, in a random order (docs/ablate.md, rounds 15 and 16)
n_layer = 4
n_head = 4
n_embd = 128
pos = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True

optim = "muon"  # Muon for the blocks' matrices (float32 on the CPU), AdamW for embeddings and gains
muon_split = True  # q, k, v (and SwiGLU's gate, up) orthogonalised as the separate matrices they are
learning_rate = 6e-3  # AdamW's: the token embedding (also the output head) and the gains
muon_lr = 3e-3  # Muon's, for the blocks' matrices
beta2 = 0.99  # AdamW's second moment: a rare token's row is not given a full step each time it turns up
weight_decay = 0.3  # the 0.99M training tokens are seen ~2.5 times in 5 minutes
lr_schedule = "wsd"  # the peak rates until the last 40% of the run, then linearly to 0
cooldown = 0.4
min_lr = 0.0
max_time = 5.0  # minutes; max_iters is then fixed from the first steps' timing
warmup_iters = 50
eval_interval = 200
eval_iters = 10
log_interval = 50
