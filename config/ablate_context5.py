# The context of the 5-minute quickstart: config/ablate_context10.py found 256-token windows better than 128 at
# 10 minutes (0.9675 against 0.9805 on the whole val split, at 16 x 256 tokens a step). At 5 minutes there are
# half the steps to share, so both batch sizes again, against config/quickstart.py itself:
#   python ablate.py config/ablate_context5.py      # about 17 minutes: run nothing else meanwhile
name = "context5"
base = ["config/quickstart.py"]
budget = 5.0
cells = [
    ("base", {}),
    ("block_256", {"block_size": 256, "batch_size": 8}),  # the same 2,048 tokens a step
    ("block_256_batch_16", {"block_size": 256, "batch_size": 16}),  # twice the tokens a step, half the steps
]
