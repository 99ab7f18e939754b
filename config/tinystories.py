# One GPU, the full TinyStories (python prepare.py), GPT-2 vocabulary: a 30M-parameter GPT
# (10.6M without embeddings), bf16, torch.compile.
#   python prepare.py && python train.py config/tinystories.py
#   torchrun --standalone --nproc_per_node=4 train.py config/tinystories.py   # same global batch
# The recipe takes what won on the CPU (docs/ablate.md) and is known to hold at GPU scale (modded-nanogpt,
# nanochat): Llama-style blocks with QK-norm, Muon for the blocks' matrices with q, k, v orthogonalised apart,
# and a warmup-stable-decay schedule. Not yet measured on a GPU (no GPU was available to this project).
# Left as the CPU runs do not carry over: weight decay 0.3-0.6 and AdamW's beta2 0.99 and doubled rate for the
# embedding (docs/ablate.md rounds 4-5 and 10-11) answer a 0.8M-token corpus seen many times, where a rare
# token's row is seldom in a batch; here the stories are seen about once and 131K tokens a step touch most rows.
out_dir = "out/tinystories"
data_dir = "data/tinystories"
init_from = "auto"

batch_size = 64
block_size = 512
gradient_accumulation_steps = 4  # 64 * 512 * 4 = 131,072 tokens per step
sampling = "epochs"  # every window once a pass: random offsets would leave ~37% of a single pass unread
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
pos = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True

optim = "muon"
muon_split = True
learning_rate = 1e-3
min_lr = 0.0
lr_schedule = "wsd"
cooldown = 0.4
max_iters = 10000
warmup_iters = 300
weight_decay = 0.1

eval_interval = 500
eval_iters = 50
log_interval = 20
compile = True
