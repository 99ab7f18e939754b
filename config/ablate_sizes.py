# Data size against model size: where does more data stop helping each width? 3 minutes a cell.
#   python ablate.py config/ablate_sizes.py
name = "sizes"
base = ["config/quickstart.py"]
budget = 3.0
axes = [
    ("train_fraction", [0.125, 0.25, 0.5, 1.0]),
    ("n_embd", [64, 128, 256]),
]
