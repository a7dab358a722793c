"""Reading prompts, writing results."""
