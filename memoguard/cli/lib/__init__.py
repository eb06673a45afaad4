"""What the commands share, by what it is: reading their inputs (inputs), running batched jobs that survive a
failure (jobs), splitting them over processes (sharding) and writing their results (reporting). Commands
import these, never each other."""
