# The recipe study: the previous (GPT-2-style) quickstart recipe, 3 minutes of 2 CPU cores a cell, one change a cell.
#   python ablate.py config/ablate_recipe.py
name = "recipe"
base = ["config/quickstart_gpt2.py"]
budget = 3.0
cells = [
    ("baseline", {}),
    ("muon", {"optim": "muon"}),
    ("llama", {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}),
    ("muon_llama", {"optim": "muon", "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}),
    ("lr_3e-3", {"learning_rate": 3e-3, "min_lr": 3e-4}),
    ("vocab_2048", {"vocab_size": 2048}),
    ("vocab_8192", {"vocab_size": 8192}),
    ("width_192", {"n_embd": 192, "n_head": 6}),
    ("depth_6", {"n_layer": 6}),
    ("block_256", {"block_size": 256, "batch_size": 8}),
    ("llama_lr_3e-3", {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "learning_rate": 3e-3, "min_lr": 3e-4}),
    ("llama_vocab_8192", {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "vocab_size": 8192}),
    ("muon_llama_lr_3e-3", {"optim": "muon", "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                            "learning_rate": 3e-3, "min_lr": 3e-4}),
]
