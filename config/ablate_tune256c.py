# Round 13: AdamW's second moment further along round 10's trend (0.95 -> 0.99 gained 0.8%), on config/cpu_10min.py
# as it is now (AdamW 6e-3, Muon 3e-3, beta2 0.99), at its 1,240 steps, two cells at a time; round 11's
# adamw_lr_6e-3_beta2_0.99 cell (0.9564 on the whole split) is the reference.
#   python ablate.py config/ablate_tune256c.py
name = "tune256c"
base = ["config/cpu_10min.py"]
iters = 1240
jobs = 2
cells = [
    ("beta2_0.995", {"beta2": 0.995}),
    ("beta2_0.999", {"beta2": 0.999}),
]
