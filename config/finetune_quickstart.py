# LoRA fine-tuning of the CPU quickstart model (config/quickstart.py) into an instruct model that follows
# TinyStories-style instructions ("Write a story that uses the words: ..."), a few minutes on 2 cores.
#   python finetune.py --make_data                       # data/instruct/{train,val}.jsonl from the bundled stories
#   python finetune.py config/finetune_quickstart.py     # then the instruction eval: base against fine-tuned
#   python sample.py --out_dir=out/chat --chat --start="Write a story that uses the words: dog, ball, happy."
out_dir = "out/chat"
base_dir = "out/quickstart"
data = "data/instruct/train.jsonl"
val_data = "data/instruct/val.jsonl"  # instructions from the stories prepare.py held out of pretraining
init_from = "auto"  # rerunning continues (or just evaluates) the run in out_dir
device = "cpu"
dtype = "float32"

mode = "lora"
lora_r = 16
lora_alpha = 32.0
lora_targets = "attn,mlp"

batch_size = 16
learning_rate = 3e-3
min_lr = 3e-4
max_iters = 600
warmup_iters = 30
eval_interval = 100
eval_iters = 10
log_interval = 50
