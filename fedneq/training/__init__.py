"""How a device trains: the one masked training loop, freezing, the budgeted backward,
gradient filtering, and upstream pretraining."""
