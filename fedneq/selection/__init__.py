"""Which neurons a device trains: velocity (NEq), the budgeted selection rule and its
selectors, and the static Sparse Update schemes."""
