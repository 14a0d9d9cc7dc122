"""The plan: from headers alone, every tensor of the output and how it is made. Never imports torch."""
