# Round 10: the optimizers' learning rates and AdamW's second moment for config/cpu_10min.py (16 x 256 tokens a
# step, weight decay 0.6), at the 1,240 optimizer steps it runs in 10 minutes. With tied embeddings AdamW trains
# only the token embedding (input and output head at once) and the gains; Muon trains the blocks' matrices.
# These settings do not change what a step costs, so the cells compare at equal steps, two at a time.
#   python ablate.py config/ablate_tune256.py
name = "tune256"
base = ["config/cpu_10min.py"]
iters = 1240
jobs = 2
cells = [
    ("base", {}),
    ("adamw_lr_6e-3", {"learning_rate": 0.006, "muon_lr": 0.003}),
    ("adamw_lr_1.5e-3", {"learning_rate": 0.0015, "muon_lr": 0.003}),
    ("beta2_0.99", {"beta2": 0.99}),
]
