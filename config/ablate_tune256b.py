# Round 11: round 10's two leads together (AdamW's rate 6e-3 with Muon's kept at 3e-3; AdamW's beta2 0.99), AdamW's
# rate pushed further, and two settings that leave a step's cost (nearly) as it is: two heads of 64 instead of four
# of 32, and no gradient clipping. The same 1,240 steps of config/cpu_10min.py, two cells at a time; round 10's
# cells are the reference (the same seed, batches and steps: a cell run twice gives the same number to the last
# digit, as round 10's base did bench_quality.py's).
#   python ablate.py config/ablate_tune256b.py
name = "tune256b"
base = ["config/cpu_10min.py", "--learning_rate=0.006", "--muon_lr=0.003", "--beta2=0.99"]
iters = 1240
jobs = 2
cells = [
    ("adamw_lr_6e-3_beta2_0.99", {}),
    ("adamw_lr_1.2e-2", {"learning_rate": 0.012}),
    ("n_head_2", {"n_head": 2}),
    ("grad_clip_0", {"grad_clip": 0.0}),
]
