"""GPU benchmarks: each module measures ours vs a baseline side by side in one run."""
