# Regularising for 10 minutes: config/cpu_10min.py's recipe given 2,600 optimizer steps (about what 10 minutes of
# 2 cores run), where the 0.79M training tokens are seen ~7 times and train loss ends 0.7 nats under val:
# does stronger weight decay, or a longer cooldown, turn that memorising into a better val score?
#   python ablate.py config/ablate_regularise10.py
name = "regularise10"
base = ["config/cpu_10min.py", "--weight_decay=0.3", "--block_size=128"]  # cpu_10min.py as it was then
iters = 2600
jobs = 2
cells = [
    ("base", {}),
    ("weight_decay_1.0", {"weight_decay": 1.0}),
    ("weight_decay_0.6", {"weight_decay": 0.6}),
    ("cooldown_0.6", {"cooldown": 0.6}),
]
