"""vlmfast benchmark suite: every comparison side by side in one run, as ratios against a baseline."""
