# The CPU quickstart: a 1.4M-parameter Llama-style GPT (rotary positions, RMSNorm, SwiGLU) trained with Muon
# on the bundled TinyStories sample with a 4,096-token BPE vocabulary trained on it (prepare.py
# --vocab_size=4096),
# for 4.5 minutes of wall-clock on whatever CPU runs it (max_time: the iteration count is fixed from the
# first steps' pace, so a slower machine takes fewer steps, not more minutes).
#   python prepare.py --dataset=bundled --vocab_size=4096
#   python train.py config/quickstart.py
#   python sample.py --start="Once upon a time"
# A small vocabulary is what makes this fast on a CPU: with GPT-2's 50,257 tokens the output layer
# alone would cost 12 times the compute of this whole model. The recipe (Llama-style blocks, Muon, learning
# rate 3e-3) won the 3-minute ablation in docs/ablate.md: 1.15 against 1.37 bits/byte for the GPT-2-style one.
out_dir = "out/quickstart"
data_dir = "data/bundled_bpe4096"
init_from = "auto"  # rerunning continues (or just finishes) the run in out_dir
device = "cpu"
dtype = "float32"

batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
pos = "rope"
norm = "rmsnorm"
mlp = "swiglu"

optim = "muon"  # Muon for the blocks' matrices (float32 on the CPU), AdamW for embeddings and gains
learning_rate = 3e-3
min_lr = 3e-4
max_time = 4.5  # minutes; max_iters is then fixed from the first steps' timing
warmup_iters = 50
eval_interval = 200
eval_iters = 10
log_interval = 50
