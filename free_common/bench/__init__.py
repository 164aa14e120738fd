"""`free-bench`: the research and benchmark command line (data, zoo, runs)."""
