# Round 12: rounds 10 and 11's optimizer settings (AdamW's rate 6e-3 for the embedding with Muon's kept at 3e-3,
# AdamW's beta2 0.99) for the 5-minute quickstart, at the 1,250 steps config/quickstart.py runs in its 5 minutes,
# two cells at a time (these settings do not change what a step costs).
#   python ablate.py config/ablate_tune5.py
name = "tune5"
base = ["config/quickstart.py"]
iters = 1250
jobs = 2
cells = [
    ("base", {}),
    ("adamw_lr_6e-3_beta2_0.99", {"learning_rate": 0.006, "muon_lr": 0.003, "beta2": 0.99}),
]
