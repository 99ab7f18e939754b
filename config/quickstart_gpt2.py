# The previous CPU quickstart (until 2026-12-04), kept as the baseline of the ablations and benchmarks: a
# 1.3M-parameter GPT-2-style GPT on the bundled TinyStories sample with a 4,096-token BPE vocabulary trained
# on it (prepare.py --vocab_size=4096), 1,400 iterations, about 5 minutes on 2 cores.
#   python prepare.py --dataset=bundled --vocab_size=4096
#   python train.py config/quickstart_gpt2.py
#   python sample.py --start="Once upon a time"
# A small vocabulary is what makes this fast on a CPU: with GPT-2's 50,257 tokens the output layer
# alone would cost 12 times the compute of this whole model.
out_dir = "out/quickstart_gpt2"
data_dir = "data/bundled_bpe4096"
init_from = "auto"  # rerunning continues (or just finishes) the run in out_dir
device = "cpu"
dtype = "float32"

batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128

learning_rate = 2e-3
min_lr = 2e-4
max_iters = 1400
warmup_iters = 50
eval_interval = 200
eval_iters = 10
log_interval = 50
