# Round 14: more text. The bundled corpus's train split with the ~790 stories of the shipped
# valid_blankline_separated.txt added (train only: 0.79M -> 0.99M tokens; the val split is the same 387 stories),
# and untied embeddings, each on config/cpu_10min.py at its 1,240 steps, two cells at a time; round 11's
# adamw_lr_6e-3_beta2_0.99 cell (0.9564 on the whole split) is the reference.
#   python prepare.py --dataset=bundled --vocab_size=4096 --name=bundled_plus_bpe4096
#   python ablate.py config/ablate_data10.py
name = "data10"
base = ["config/cpu_10min.py"]
iters = 1240
jobs = 2
cells = [
    ("more_text", {"data_dir": "data/bundled_plus_bpe4096"}),
    ("untied", {"tie_embeddings": False}),
]
