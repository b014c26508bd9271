"""Model conversion and quantization, run as Ray tasks on the coordinator."""
