# The full TinyStories with a vocabulary trained on it: python prepare.py --vocab_size=8192
# (writes data/tinystories_bpe8192 and its tokenizer.tiktoken). An 8,192-token vocabulary puts the
# parameters in the transformer instead of the embedding table: here 19.5M without embeddings, 23M in all.
# Llama-style blocks (rotary positions, RMSNorm, SwiGLU).
#   python prepare.py --vocab_size=8192 && python train.py config/tinystories_bpe.py
out_dir = "out/tinystories_bpe"
data_dir = "data/tinystories_bpe8192"
init_from = "auto"

batch_size = 64
block_size = 512
gradient_accumulation_steps = 4
n_layer = 8
n_head = 8
n_embd = 448
pos = "rope"
norm = "rmsnorm"
mlp = "swiglu"
tie_embeddings = True

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 10000
warmup_iters = 300

eval_interval = 500
eval_iters = 50
log_interval = 20
compile = True
