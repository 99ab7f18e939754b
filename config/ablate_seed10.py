# A second seed for round 4's lead (config/ablate_regularise10.py): weight decay 0.6 against the 0.3 of
# config/cpu_10min.py, both at 2,600 steps, with other initial weights and batches (seed 1338 instead of 1337).
# A lead that holds on both seeds becomes the 10-minute default.
#   python ablate.py config/ablate_seed10.py
name = "seed10"
base = ["config/cpu_10min.py", "--weight_decay=0.3", "--block_size=128"]  # cpu_10min.py as it was then
iters = 2600
jobs = 2
cells = [
    ("base_seed_1338", {"seed": 1338}),
    ("weight_decay_0.6_seed_1338", {"weight_decay": 0.6, "seed": 1338}),
]
