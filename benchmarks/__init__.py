"""Speed and memory targets, each measured against an anchor in the same run (``make bench``)."""
