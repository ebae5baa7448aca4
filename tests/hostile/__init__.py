"""Hostile-client tests (issue 14): each module attacks real ``syncnode run`` processes the way an
outsider or a bad minority could, and asserts the node's memory and disk stay within the bounds
SECURITY.md states, that an honest client's request keeps its latency, and that joins complete."""
