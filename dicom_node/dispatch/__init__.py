"""Sending results: the C-STORE SCU, the routing of a job's results, and the dispatcher."""
