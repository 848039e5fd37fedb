"""What must happen before torch loads, so each script imports this module first: the
threads' settings (OpenMP reads its environment once, as torch loads)."""
